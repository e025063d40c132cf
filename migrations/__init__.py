"""Alembic migrations of the CA database (run through `ca_server.db.migrate`, no alembic.ini
needed). `env.py` is the Alembic environment, `versions/` holds one file per revision."""
