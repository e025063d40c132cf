"""`Store`: the CA's only entry point to its database. It hands out transactions (`Tx`):
`transaction()` commits on a normal exit and rolls back on an exception; `read()` always
rolls back and is read-only at the database level too (SQLite ``query_only``, PostgreSQL
``READ ONLY`` at REPEATABLE READ, so several reads see one snapshot).

Driver failures surface as `ca_server.errors.Unavailable` (retryable) or `AlreadyExists`;
errors raised by the caller inside the block pass through unchanged.

Blocking: `transaction()` and `read()` do synchronous I/O. From asyncio, run them in a
thread (``await asyncio.to_thread(...)``), or inline where that is cheaper than the hand-off
(short SQLite work: a WAL read takes no lock, and `transaction(wait=False)` never waits for
the write lock). On PostgreSQL, `await run(fn, write=...)` runs a transaction on the event
loop through the asyncio driver, and `await record_issuances(...)` records a batch of
issuances in one statement (always from the same event loop: its connection belongs to
it). A `Store` is otherwise thread-safe; a `Tx` is not.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ca_server.db.failures import translate_errors
from ca_server.db.issuance import Issuance, IssuanceConnection
from ca_server.db.session import (
    TX_KIND_OPTION,
    TX_READ,
    TX_WRITE,
    TX_WRITE_NOWAIT,
    WriteLockBusy,
    make_async_engine,
    make_engine,
    redact_url,
)
from ca_server.db.tx import Tx

log = logging.getLogger(__name__)

__all__ = ["Store", "WriteLockBusy"]

T = TypeVar("T")


class Store:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._async_engine: AsyncEngine | None = None  # PostgreSQL, made on first `run`
        self._issuances: IssuanceConnection | None = None  # PostgreSQL, on first use

    @classmethod
    def open(cls, url: str) -> Store:
        """A store on a new engine for `url` (see `ca_server.db.session.make_engine`).
        The schema must already be migrated (`ca_server.db.migrate.upgrade`)."""
        return cls(make_engine(url))

    @property
    def engine(self) -> Engine:
        return self._engine

    @property
    def dialect(self) -> str:
        """The SQLAlchemy dialect name: "sqlite" or "postgresql"."""
        return self._engine.dialect.name

    @property
    def url(self) -> str:
        """The database URL with its password hidden (for logs and status)."""
        return redact_url(self._engine.url)

    def _options(self, kind: str) -> dict[str, Any]:
        options: dict[str, Any] = {TX_KIND_OPTION: kind}
        if kind == TX_READ and self.dialect == "postgresql":
            options.update(postgresql_readonly=True, isolation_level="REPEATABLE READ")
        return options

    def _connect(self, kind: str) -> Connection:
        options = self._options(kind)
        with translate_errors():
            connection = self._engine.connect()
        try:
            connection.execution_options(**options)
        except BaseException:
            connection.close()
            raise
        return connection

    @contextmanager
    def transaction(self, *, wait: bool = True) -> Iterator[Tx]:
        """One read-write transaction: committed when the block ends normally, rolled back
        when it raises. On SQLite it holds the database's single write lock from the
        start, so keep it short (batch many writes into one, do no slow work inside).

        `wait=False` (SQLite): raise `WriteLockBusy` at once, before the block runs, when
        another connection holds the write lock, instead of waiting for it (the event
        loop's writer retries later rather than block). PostgreSQL ignores it."""
        connection = self._connect(TX_WRITE if wait else TX_WRITE_NOWAIT)
        try:
            with translate_errors():
                transaction = connection.begin()
            tx = Tx(connection, writable=True)
            try:
                yield tx
                tx.before_commit()
            except BaseException:
                _rollback_quietly(connection)
                raise
            with translate_errors():
                transaction.commit()
        finally:
            connection.close()

    @contextmanager
    def read(self) -> Iterator[Tx]:
        """One read-only transaction, always rolled back."""
        connection = self._connect(TX_READ)
        try:
            with translate_errors():
                connection.begin()
            try:
                yield Tx(connection, writable=False)
            finally:
                _rollback_quietly(connection)
        finally:
            connection.close()

    async def run(self, fn: Callable[[Tx], T], *, write: bool) -> T:
        """PostgreSQL: `fn` in one transaction (`write`: committed unless `fn` raises; else
        read-only and rolled back, as `transaction()` and `read()`), awaited on the event
        loop through psycopg's asyncio connections rather than run in a thread. `fn`'s
        statements suspend the calling task while the database answers."""
        with translate_errors():
            async with self._async().connect() as connection:
                connection = await connection.execution_options(
                    **self._options(TX_WRITE if write else TX_READ)
                )
                return await _run_in_transaction(connection, fn, write=write)

    async def record_issuances(self, issuances: Sequence[Issuance]) -> set[str]:
        """PostgreSQL: record issuing requests (their certificates and audit events) in one
        atomic statement on the event loop, except those of banned nodes, whose names are
        returned; on a connection kept for this alone (`ca_server.db.issuance`).
        AlreadyExists (nothing written) if a serial is already recorded."""
        if self.dialect != "postgresql":
            raise RuntimeError("record_issuances is PostgreSQL's; SQLite uses a transaction")
        if self._issuances is None:
            self._issuances = IssuanceConnection(self._engine.url)
        return await self._issuances.record(issuances)

    def _async(self) -> AsyncEngine:
        if self._async_engine is None:
            self._async_engine = make_async_engine(self._engine.url)
        return self._async_engine

    async def aclose(self) -> None:
        """Close every pooled connection, the asyncio ones too (call from the loop that
        used `run` or `record_issuances`). The store must not be used afterwards."""
        if self._issuances is not None:
            await self._issuances.aclose()
            self._issuances = None
        if self._async_engine is not None:
            await self._async_engine.dispose()
            self._async_engine = None
        self.close()

    def close(self) -> None:
        """Close every pooled connection. The store must not be used afterwards."""
        self._engine.dispose()


async def _run_in_transaction(
    connection: AsyncConnection, fn: Callable[[Tx], T], *, write: bool
) -> T:
    transaction = await connection.begin()
    try:
        result = await connection.run_sync(
            lambda sync: _run_then_finish(fn, Tx(sync, writable=write))
        )
    except BaseException:
        try:
            await transaction.rollback()
        except Exception as error:
            log.warning("database rollback failed", extra={"error_type": type(error).__name__})
        raise
    if write:
        await transaction.commit()
    else:
        await transaction.rollback()
    return result


def _run_then_finish(fn: Callable[[Tx], T], tx: Tx) -> T:
    result = fn(tx)
    if tx.writable:
        tx.before_commit()
    return result


def _rollback_quietly(connection: Connection) -> None:
    """Roll back without masking the exception that caused it (a dead connection cannot
    roll back; the pool discards it on close)."""
    try:
        connection.rollback()
    except Exception as error:
        log.warning(
            "database rollback failed",
            extra={"error_type": type(error).__name__},
        )
