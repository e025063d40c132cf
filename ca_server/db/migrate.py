"""Schema migrations of the CA database, driven from Python (no alembic.ini): the Alembic
configuration is built here and points at the `migrations` package shipped with meshtls.

    upgrade(url) -> revisions applied     current_revision(url) -> revision or None
    pending_revisions(url) -> to apply    head_revision() -> newest revision

Also a small command line for operators and developers:
``python -m ca_server.db.migrate {upgrade,current,pending,revision} --url URL``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine

import migrations
from ca_server.db.failures import translate_errors
from ca_server.db.session import TX_KIND_OPTION, TX_READ, TX_WRITE, make_engine, redact_url

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(migrations.__file__).resolve().parent

# Alembic keeps its running environment in module globals: one command at a time per
# process. (Separate processes are serialised by the database, see `upgrade`.)
_ALEMBIC_LOCK = threading.Lock()


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic configuration for the shipped migrations, bound to `connection`."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = connection
    return config


def _scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


def head_revision() -> str:
    """The newest revision shipped with this version of meshtls."""
    head = _scripts().get_current_head()
    if head is None:
        raise RuntimeError(f"no migration revisions found in {MIGRATIONS_DIR}")
    return head


def all_revisions() -> list[str]:
    """Every shipped revision, oldest first (what `upgrade` applies to an empty database)."""
    return [script.revision for script in reversed(list(_scripts().walk_revisions()))]


@contextmanager
def _engine(engine_or_url: Engine | str) -> Iterator[Engine]:
    """Use the given engine, or a temporary one for a URL (disposed afterwards)."""
    if isinstance(engine_or_url, Engine):
        yield engine_or_url
        return
    engine = make_engine(engine_or_url, pool_size=1)
    try:
        yield engine
    finally:
        engine.dispose()


def current_revision(engine_or_url: Engine | str) -> str | None:
    """The revision the database is at (None for an empty database)."""
    with _engine(engine_or_url) as engine, translate_errors(), engine.connect() as connection:
        connection.execution_options(**{TX_KIND_OPTION: TX_READ})
        return MigrationContext.configure(connection).get_current_revision()


def pending_revisions(engine_or_url: Engine | str) -> list[str]:
    """Revisions `upgrade` would apply, in the order it would apply them."""
    current = current_revision(engine_or_url)
    steps = _scripts().iterate_revisions("heads", current)
    return [script.revision for script in reversed(list(steps))]


def upgrade(engine_or_url: Engine | str, target: str = "heads") -> list[str]:
    """Bring the database up to `target` (default: the newest revision) in a single
    transaction, and return the revisions applied (empty when it was up to date).
    Concurrent callers are serialised (SQLite write lock, PostgreSQL advisory lock)."""
    with _engine(engine_or_url) as engine:
        with _ALEMBIC_LOCK, translate_errors(), engine.connect() as connection:
            connection.execution_options(**{TX_KIND_OPTION: TX_WRITE})
            config = alembic_config(connection)
            with connection.begin():
                command.upgrade(config, target)
        applied: list[str] = list(config.attributes.get("applied_revisions", []))
        log.info(
            "database migrated" if applied else "database schema up to date",
            extra={
                "database": redact_url(engine.url),
                "applied_revisions": applied,
                "revision": applied[-1] if applied else current_revision(engine),
            },
        )
        return applied


def _new_revision(url: str, message: str) -> None:
    """Autogenerate a new revision file from the difference between the models and the
    database at `url` (which must be at the head revision)."""
    with _ALEMBIC_LOCK, _engine(url) as engine, engine.connect() as connection:
        connection.execution_options(**{TX_KIND_OPTION: TX_WRITE})
        with connection.begin():
            command.revision(alembic_config(connection), message=message, autogenerate=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ca_server.db.migrate", description="meshtls CA database schema"
    )
    parser.add_argument(
        "action",
        choices=["upgrade", "current", "pending", "head", "revision"],
        help="revision: autogenerate a new revision file (developers)",
    )
    parser.add_argument("--url", help="database URL, e.g. sqlite:////var/lib/meshtls/ca.db")
    parser.add_argument("-m", "--message", default="change", help="revision message")
    args = parser.parse_args(argv)
    if args.action == "head":
        print(head_revision())
        return 0
    if not args.url:
        parser.error(f"{args.action} needs --url")
    if args.action == "upgrade":
        print(" ".join(upgrade(args.url)) or "up to date")
    elif args.action == "current":
        print(current_revision(args.url) or "empty database")
    elif args.action == "pending":
        print(" ".join(pending_revisions(args.url)) or "none")
    else:
        _new_revision(args.url, args.message)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(main())
