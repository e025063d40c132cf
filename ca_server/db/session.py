"""Engine factory for the CA database: SQLite (default, one file in WAL mode) or PostgreSQL
(production, psycopg 3), plus URL helpers that never leak passwords into logs.

SQLite transactions are driven by SQLAlchemy, not by the sqlite3 module (the documented
pysqlite event recipe): write transactions start with ``BEGIN IMMEDIATE`` so two writers
never deadlock on a SHARED -> RESERVED lock upgrade; read transactions start with a plain
``BEGIN`` and run with ``PRAGMA query_only`` on. A pooled connection keeps its read or write
mode between transactions and switches only when the other kind needs it.
"""

from __future__ import annotations

import logging
import re
import sqlite3
import time
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry

from ca_server.errors import ConfigError

log = logging.getLogger(__name__)

# Execution option naming the kind of transaction a Connection is about to begin.
TX_KIND_OPTION = "meshtls_tx"
TX_READ = "read"
TX_WRITE = "write"
# A write transaction that does not wait for SQLite's write lock (see `WriteLockBusy`).
TX_WRITE_NOWAIT = "write-nowait"
# Seconds a write transaction waits for SQLite's write lock before failing as unavailable.
SQLITE_BUSY_TIMEOUT = 10.0

SQLITE_DRIVER = "sqlite+pysqlite"
POSTGRES_DRIVER = "postgresql+psycopg"


class WriteLockBusy(Exception):
    """A no-wait write transaction (`TX_WRITE_NOWAIT`) found SQLite's write lock held by
    another connection. Nothing was started; try again later."""


def sqlite_url(path: Path) -> str:
    """The SQLAlchemy URL of an SQLite database file (absolute path)."""
    return f"{SQLITE_DRIVER}:///{path.expanduser().resolve()}"


_PASSWORD_IN_TEXT = re.compile(r"(?i)(password\s*=\s*)('[^']*'|[^\s&;]+)")
_USERINFO_IN_TEXT = re.compile(r"(://[^:/@\s]*:)[^@\s]*@")


def scrub_secrets(text: str) -> str:
    """Remove anything that looks like a password from free text (URLs, libpq strings)."""
    text = _USERINFO_IN_TEXT.sub(r"\1***@", text)
    return _PASSWORD_IN_TEXT.sub(r"\1***", text)


def redact_url(url: str | URL) -> str:
    """The URL as text with its password (and any ``password=`` query value) hidden, for
    logs and status pages."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        return scrub_secrets(str(url))
    return scrub_secrets(parsed.render_as_string(hide_password=True))


def normalize_url(url: str | URL) -> URL:
    """Parse a database URL and pin the driver: ``sqlite://`` -> pysqlite,
    ``postgres(ql)://`` -> psycopg 3. Raises ConfigError for anything else."""
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise ConfigError(
            f"invalid database URL {scrub_secrets(str(url))!r}: "
            "use sqlite:////abs/path/ca.db or postgresql://user@host:5432/dbname"
        ) from exc
    backend, _, driver = parsed.drivername.partition("+")
    if backend == "sqlite" and driver in ("pysqlite", ""):
        parsed = parsed.set(drivername=SQLITE_DRIVER)
    elif backend in ("postgresql", "postgres") and driver in ("psycopg", ""):
        parsed = parsed.set(drivername=POSTGRES_DRIVER)
    else:
        raise ConfigError(
            f"unsupported database URL {redact_url(parsed)!r}: meshtls supports "
            "sqlite:///<path> and postgresql+psycopg://user@host:port/dbname"
        )
    if parsed.get_backend_name() == "sqlite":
        _check_sqlite_path(parsed)
    return parsed


def _check_sqlite_path(url: URL) -> None:
    database = url.database or ""
    if database in ("", ":memory:") or database.startswith("file::memory:"):
        raise ConfigError(
            "an in-memory SQLite database cannot be shared by the CA's connections: "
            "give a file path, e.g. sqlite:////var/lib/meshtls/ca.db"
        )
    parent = Path(database).expanduser().parent
    if not parent.is_dir():
        raise ConfigError(
            f"SQLite database directory {str(parent)!r} does not exist: create it "
            "(the CA creates the database file itself) or fix the database URL"
        )


def make_engine(
    url: str | URL,
    *,
    pool_size: int = 10,
    sqlite_busy_timeout: float = SQLITE_BUSY_TIMEOUT,
    connect_timeout: float = 5.0,
) -> Engine:
    """Create the engine for `url` (see `normalize_url`), tuned for the CA's workload.

    SQLite: WAL journal, ``synchronous=NORMAL``, ``foreign_keys=ON``, a busy timeout of
    `sqlite_busy_timeout` seconds and SQLAlchemy-driven BEGIN (IMMEDIATE for writes).
    PostgreSQL: psycopg 3, a pool of `pool_size` (+ the same overflow) connections,
    pre-ping on checkout, and a `connect_timeout` so a dead server fails fast.
    """
    parsed = normalize_url(url)
    if parsed.get_backend_name() == "sqlite":
        engine = _sqlite_engine(parsed, pool_size, sqlite_busy_timeout)
    else:
        engine = create_engine(parsed, **_postgres_options(pool_size, connect_timeout))
    log.info(
        "database engine created",
        extra={"database": redact_url(parsed), "dialect": engine.dialect.name},
    )
    return engine


# Seconds after which a pooled PostgreSQL connection is replaced (idle connections are
# dropped silently by some firewalls and proxies).
POSTGRES_RECYCLE_SECONDS = 1800


def postgres_connect_args(connect_timeout: float) -> dict[str, Any]:
    """What every PostgreSQL connection of the CA is opened with, besides its URL."""
    return {"connect_timeout": max(1, round(connect_timeout)), "application_name": "meshtls-ca"}


def psycopg_connect_kwargs(
    url: str | URL, *, connect_timeout: float = 5.0, application_name: str = "meshtls-ca"
) -> dict[str, Any]:
    """`psycopg.connect()` keyword arguments for a PostgreSQL `url`, for the connections
    the CA opens without an engine: the URL's parts and options, the CA's connection
    options, and TCP keepalives so a dead peer cannot leave a connection waiting forever
    on a silent socket. The password is included: never log them."""
    parsed = normalize_url(url)
    kwargs: dict[str, Any] = {
        "host": parsed.host,
        "port": parsed.port,
        "dbname": parsed.database,
        "user": parsed.username,
        "password": parsed.password,
    }
    kwargs.update({str(k): v for k, v in parsed.query.items()})
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    kwargs.update(postgres_connect_args(connect_timeout), application_name=application_name)
    kwargs.setdefault("keepalives", 1)
    kwargs.setdefault("keepalives_idle", 10)
    kwargs.setdefault("keepalives_interval", 5)
    kwargs.setdefault("keepalives_count", 3)
    return kwargs


def _postgres_options(pool_size: int, connect_timeout: float) -> dict[str, Any]:
    return {
        "pool_size": pool_size,
        "max_overflow": pool_size,
        "pool_timeout": connect_timeout * 2,
        "pool_pre_ping": True,
        "pool_recycle": POSTGRES_RECYCLE_SECONDS,
        "connect_args": postgres_connect_args(connect_timeout),
    }


def make_async_engine(
    url: str | URL, *, pool_size: int = 5, connect_timeout: float = 5.0
) -> AsyncEngine:
    """An asyncio engine for a PostgreSQL `url` (psycopg 3's async connections), with the
    options of `make_engine`: the event loop awaits the database instead of a thread."""
    parsed = normalize_url(url)
    if parsed.get_backend_name() != "postgresql":
        raise ConfigError("the asyncio engine is for PostgreSQL; SQLite runs on the event loop")
    return create_async_engine(parsed, **_postgres_options(pool_size, connect_timeout))


def _sqlite_engine(url: URL, pool_size: int, busy_timeout: float) -> Engine:
    engine = create_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size,
        connect_args={"timeout": busy_timeout, "check_same_thread": False},
    )
    busy_ms = max(0, round(busy_timeout * 1000))
    read_mode = (f"PRAGMA busy_timeout={busy_ms}", "PRAGMA query_only=ON")
    # A writer's wait for the lock is `_begin_immediate`'s, which retries much sooner
    # than SQLite's own busy handler; inside BEGIN IMMEDIATE nothing waits in WAL mode.
    write_mode = ("PRAGMA busy_timeout=0", "PRAGMA query_only=OFF")

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
        # Stop the sqlite3 module from emitting BEGIN itself; `_on_begin` does it.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            _enable_wal(cursor, busy_timeout)
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute(f"PRAGMA busy_timeout={busy_ms}")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # Straight to the driver where nothing can fail (these run for every transaction
        # and cost several times more through SQLAlchemy); BEGIN IMMEDIATE may time out
        # on the write lock, so it goes through SQLAlchemy's error translation.
        raw = conn.connection.dbapi_connection
        assert raw is not None
        kind = conn.get_execution_options().get(TX_KIND_OPTION)
        if kind == TX_READ:
            _set_mode(conn, raw, read_mode)
            raw.execute("BEGIN")  # deferred: takes no lock
            return
        # Anything not explicitly a read (store writes, migrations) takes the write lock up
        # front: waiting for it honours busy_timeout, unlike a SHARED -> RESERVED upgrade.
        _set_mode(conn, raw, write_mode)
        wait = 0.0 if kind == TX_WRITE_NOWAIT else busy_timeout
        if _begin_immediate(raw, time.monotonic() + wait):
            return
        if kind == TX_WRITE_NOWAIT:
            raise WriteLockBusy("another connection holds the SQLite write lock")
        # Still locked at the deadline: one last try, failing at once through
        # SQLAlchemy's error translation.
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def _set_mode(conn: Connection, raw: Any, mode: tuple[str, ...]) -> None:
    """Put a pooled connection in read or write mode, unless it already is. The mode
    stays with the connection between checkouts: setting ``query_only`` (like any flag
    pragma) makes SQLite discard every statement the connection has prepared, so setting
    it for every transaction re-parsed each INSERT of every commit."""
    info = conn.connection.info
    if info.get(_MODE_KEY) != mode:
        for pragma in mode:
            raw.execute(pragma)
        info[_MODE_KEY] = mode


_MODE_KEY = "meshtls_sqlite_mode"

# How often a writer retries the write lock another process holds. SQLite's own busy
# handler sleeps 1, 2, 5, 10, 15, 20, 25 ... ms between tries, so a writer that meets the
# lock taken by a transaction of a millisecond or two waits up to ten times as long as it
# needed to (the tail latency of `serve --workers N` on one SQLite file). Retrying every
# fraction of a millisecond costs a failed BEGIN (microseconds) per try.
WRITE_LOCK_RETRY_SECONDS = 0.0002


def _begin_immediate(raw: Any, deadline: float) -> bool:
    """BEGIN IMMEDIATE on a connection whose busy timeout is 0, retried every
    `WRITE_LOCK_RETRY_SECONDS` while another connection holds the write lock, until
    `deadline` (time.monotonic). False if it never got the lock."""
    while True:
        try:
            raw.execute("BEGIN IMMEDIATE")
            return True
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise
        if time.monotonic() >= deadline:
            return False
        time.sleep(WRITE_LOCK_RETRY_SECONDS)


def _enable_wal(cursor: Any, busy_timeout: float) -> None:
    """Switch the file to WAL. Processes opening a new database at the same moment (the
    replicas of `serve --workers N`, concurrent migrations) race for the switch, and the
    loser gets "database is locked" at once: SQLite does not run the busy handler for it.
    Retry until `busy_timeout`; once one process has switched, the others' switch is a
    no-op that takes no lock."""
    deadline = time.monotonic() + busy_timeout
    delay = 0.005
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.1)
