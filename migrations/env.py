"""Alembic environment for the CA database. Normally driven by `ca_server.db.migrate`,
which passes an open connection (inside a transaction) through ``config.attributes``.
The whole upgrade runs in that one transaction; on PostgreSQL an advisory lock makes
replicas that start together migrate one after the other."""

from __future__ import annotations

from typing import Any

from alembic import context
from sqlalchemy import Connection, text

from ca_server.db.models import metadata
from ca_server.db.session import make_engine

# Any constant shared by every meshtls process: the key of the migration advisory lock.
MIGRATION_LOCK_KEY = 0x6D657368544C53  # "meshTLS"


def _record_applied(applied: list[str]) -> Any:
    def on_version_apply(*, step: Any, **_kwargs: Any) -> None:
        if step.is_upgrade and step.up_revision_id is not None:
            applied.append(str(step.up_revision_id))

    return on_version_apply


def run_migrations(connection: Connection) -> None:
    config = context.config
    applied: list[str] = config.attributes.setdefault("applied_revisions", [])
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        transactional_ddl=True,
        compare_type=True,
        on_version_apply=_record_applied(applied),
    )
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
    with context.begin_transaction():
        context.run_migrations()


def main() -> None:
    if context.is_offline_mode():
        raise SystemExit(
            "offline (--sql) migrations are not supported: run `meshtls-ca` with the "
            "database reachable, or ca_server.db.migrate.upgrade(url)"
        )
    connection = context.config.attributes.get("connection")
    if connection is not None:
        run_migrations(connection)
        return
    url = context.config.get_main_option("sqlalchemy.url")
    if not url:
        raise SystemExit(
            "no database to migrate: run the migrations through ca_server.db.migrate "
            "(python -m ca_server.db.migrate upgrade --url URL)"
        )
    engine = make_engine(url)
    try:
        with engine.connect() as own_connection, own_connection.begin():
            run_migrations(own_connection)
    finally:
        engine.dispose()


main()
