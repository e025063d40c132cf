"""Engine factory and URL helpers."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import text

from ca_server.db import make_engine, migrate, redact_url, sqlite_url
from ca_server.db.session import TX_KIND_OPTION, TX_READ, normalize_url, scrub_secrets
from ca_server.db.store import Store
from ca_server.errors import ConfigError


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "postgresql+psycopg://ca:hunter2@db:5432/meshtls",
            "postgresql+psycopg://ca:***@db:5432/meshtls",
        ),
        ("postgresql://ca@db/meshtls?password=hunter2", "postgresql://ca@db/meshtls?password=***"),
        ("sqlite:////var/lib/meshtls/ca.db", "sqlite:////var/lib/meshtls/ca.db"),
        ("not a url with password=hunter2", "not a url with password=***"),
    ],
)
def test_redact_url_hides_passwords(url: str, expected: str) -> None:
    assert redact_url(url) == expected
    assert "hunter2" not in redact_url(url)


def test_scrub_secrets_in_driver_messages() -> None:
    message = "connection to postgresql://u:pw@h/db failed; dsn password='a b' host=h"
    assert scrub_secrets(message) == (
        "connection to postgresql://u:***@h/db failed; dsn password=*** host=h"
    )


def test_sqlite_url_is_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert sqlite_url(Path("ca.db")) == f"sqlite+pysqlite:///{tmp_path.resolve()}/ca.db"


def test_driver_is_pinned() -> None:
    assert normalize_url("postgresql://u@h/d").drivername == "postgresql+psycopg"
    assert normalize_url("postgres://u@h/d").drivername == "postgresql+psycopg"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("mysql://u:pw@h/d", "unsupported database URL 'mysql://u:\\*\\*\\*@h/d'"),
        ("postgresql+psycopg2://u@h/d", "unsupported database URL"),
        ("sqlite://", "in-memory SQLite"),
        ("sqlite:///:memory:", "in-memory SQLite"),
        ("sqlite:////nonexistent-dir/ca.db", "directory '/nonexistent-dir' does not exist"),
        ("::nonsense", "invalid database URL"),
    ],
)
def test_bad_urls_are_config_errors(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make_engine(url)


def test_sqlite_connections_are_tuned(tmp_path: Path) -> None:
    engine = make_engine(sqlite_url(tmp_path / "ca.db"), sqlite_busy_timeout=3)
    try:
        with engine.connect().execution_options(**{TX_KIND_OPTION: TX_READ}) as conn:
            pragmas = {
                name: conn.execute(text(f"PRAGMA {name}")).scalar_one()
                for name in ("journal_mode", "synchronous", "foreign_keys", "busy_timeout")
            }
    finally:
        engine.dispose()
    assert pragmas == {
        "journal_mode": "wal",
        "synchronous": 1,
        "foreign_keys": 1,
        "busy_timeout": 3000,
    }


def test_sqlite_connections_switch_mode_only_when_the_kind_of_transaction_changes(
    tmp_path: Path,
) -> None:
    """Setting query_only makes SQLite drop every statement the connection prepared, so a
    pooled connection keeps its read or write mode until a transaction of the other kind
    needs it; writers run with busy_timeout 0 (BEGIN IMMEDIATE is retried by the CA)."""
    engine = make_engine(sqlite_url(tmp_path / "ca.db"), sqlite_busy_timeout=3, pool_size=1)
    migrate.upgrade(engine)
    store = Store(engine)
    statements: list[str] = []
    try:
        with store.read() as tx:  # the pool's only connection, from here on
            raw = tx._conn.connection.dbapi_connection
            assert raw is not None
            raw.set_trace_callback(statements.append)
        kinds = ["write", "write", "read", "read", "write", "read"]
        for kind in kinds:
            statements.append(f"-- {kind}")
            if kind == "write":
                with store.transaction() as tx:
                    tx.bump_bundle_version()
                    assert tx._conn.exec_driver_sql("PRAGMA busy_timeout").scalar_one() == 0
            else:
                with store.read() as tx:
                    tx.bundle_version()
    finally:
        store.close()
    pragmas = [s for s in statements if s.startswith(("-- ", "PRAGMA query_only"))]
    assert pragmas == [
        "-- write",
        "PRAGMA query_only=OFF",
        "-- write",
        "-- read",
        "PRAGMA query_only=ON",
        "-- read",
        "-- write",
        "PRAGMA query_only=OFF",
        "-- read",
        "PRAGMA query_only=ON",
    ]
