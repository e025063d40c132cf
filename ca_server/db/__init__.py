"""The CA's database layer (SQLAlchemy 2 + Alembic, on SQLite or PostgreSQL).

The rest of the CA uses only `Store` / `Tx` (domain dataclasses in and out), `make_engine`
and the URL helpers, and `migrate.upgrade` at startup. Table models stay in here.
"""

from ca_server.db.failures import ReadOnlyTransactionError
from ca_server.db.session import make_engine, redact_url, sqlite_url
from ca_server.db.store import Store
from ca_server.db.tx import Tx

__all__ = ["ReadOnlyTransactionError", "Store", "Tx", "make_engine", "redact_url", "sqlite_url"]
