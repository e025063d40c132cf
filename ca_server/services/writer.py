"""Group commit: every database write of the CA goes through one writer per process.

Concurrent requests each submit a unit of work (a function of a write transaction). The
writer takes every unit waiting, runs them in ONE transaction and commits, then answers
each caller: a caller's reply is sent only after the commit that holds its rows, so no
certificate is returned without its row, and no row exists for a certificate that was not
returned (a unit that fails takes nothing with it). If a batch fails, the writer rolls it
back and runs each unit alone, so one bad unit cannot fail its neighbours.

One writer also serializes the process's writers, which is what SQLite wants (WAL, one
writer) and costs PostgreSQL little at this size. Two kinds (`open_writer` picks):

- `LoopWriter` (SQLite) commits on the event loop itself. An SQLite write is a few
  milliseconds of work in this process, and a second Python thread doing it would fight
  the event loop for the GIL while holding the database's write lock: each of the many
  times the sqlite3 module hands the GIL back, the writer waits up to the interpreter's
  switch interval (5 ms) for it, and every writer of every replica waits behind it. When
  another process holds the write lock, the loop does not wait: it retries a moment later
  while new units join the batch. (The checkpoint SQLite runs inside the commit that fills
  the log past 1,000 pages, with its fsyncs, runs on the loop too: a few ms on a local disk,
  more on slow network storage, where PostgreSQL is the database to run.)
- `AsyncWriter` (PostgreSQL) commits on the event loop too, through psycopg's asyncio
  connections (`Store.run`): while a commit is on the network the loop serves other
  requests, and the units they submit form the next batch. A batch of issuances alone
  (the usual one) is a single atomic statement on a connection kept for it
  (`AtomicBatchable`, `Store.record_issuances`): each of a transaction's round trips
  waits, under load, for the loop to finish the call it is signing, and there were six.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

from ca_server.db.failures import RETRY_AFTER_SECONDS
from ca_server.db.session import SQLITE_BUSY_TIMEOUT
from ca_server.db.store import Store, WriteLockBusy
from ca_server.db.tx import Tx
from ca_server.errors import Unavailable

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_BATCH = 512
# How soon the loop writer tries again when another process holds SQLite's write lock.
LOCK_RETRY_SECONDS = 0.0002


@dataclass
class _Unit(Generic[T]):
    work: Callable[[Tx], T] | Batchable
    future: asyncio.Future[T]


@dataclass(frozen=True)
class Refused:
    """A batchable unit's answer when it was refused (it wrote nothing); the batch goes on."""

    error: Exception


class Batchable(Protocol):
    """Work of which many instances run together: `run_batch` does the writes of every
    item at once (one multi-row insert instead of one per request) and returns one result,
    or a `Refused`, per item, in order."""

    @classmethod
    def run_batch(cls, tx: Tx, items: list[Any]) -> list[Any]: ...


@runtime_checkable
class AtomicBatchable(Batchable, Protocol):
    """Batchable work that can also commit a batch as one atomic statement of its own,
    without a transaction around it: what `AsyncWriter` (PostgreSQL) does when a batch
    holds nothing else, one round trip instead of a transaction's several."""

    @classmethod
    async def commit_batch(cls, store: Store, items: list[Any]) -> list[Any]: ...


class Writer(Protocol):
    batches: int  # transactions committed (or tried)
    units: int  # units of work run

    def start(self) -> None: ...

    async def stop(self) -> None:
        """Finish what is queued, then stop; `submit` is refused afterwards."""

    async def submit(self, work: Callable[[Tx], T] | Batchable) -> T:
        """Run `work` in a write transaction; return its result once committed. A
        `Refused` result of a batchable unit is raised here as its error."""


def open_writer(store: Store) -> Writer:
    """The writer for `store`'s database (both commit on the calling event loop)."""
    if store.dialect == "sqlite":
        return LoopWriter(store)
    return AsyncWriter(store)


def _run_all(tx: Tx, works: list[Any]) -> list[Any]:
    """Plain callables run one by one, in order; batchable units run once per type."""
    results: list[Any] = [None] * len(works)
    groups: dict[type[Batchable], list[int]] = {}
    for index, work in enumerate(works):
        if hasattr(work, "run_batch"):
            groups.setdefault(type(work), []).append(index)
        else:
            results[index] = work(tx)
    for kind, indexes in groups.items():
        answers = kind.run_batch(tx, [works[i] for i in indexes])
        for index, answer in zip(indexes, answers, strict=True):
            results[index] = answer
    return results


def _set_result(future: asyncio.Future[Any], result: Any) -> None:
    if not future.done():
        future.set_result(result)


def _set_exception(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


class _GroupCommit:
    """What both writers share: the queue of units and how a caller submits one."""

    def __init__(self, store: Store, max_batch: int) -> None:
        self._store = store
        self._max_batch = max_batch
        self._pending: list[_Unit[Any]] = []
        self._started = False
        self.batches = 0
        self.units = 0

    def start(self) -> None:
        self._started = True

    async def submit(self, work: Callable[[Tx], T] | Batchable) -> T:
        if not self._started:
            raise RuntimeError("the database writer is not running")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._pending.append(_Unit(work, future))
        self._wake(loop)
        result = await future
        if isinstance(result, Refused):
            raise result.error
        return result

    def _wake(self, loop: asyncio.AbstractEventLoop) -> None:
        """Make sure the pending units will be committed."""
        raise NotImplementedError


class LoopWriter(_GroupCommit):
    """Group commit on the calling event loop (one loop per writer), for SQLite.

    Units submitted in one turn of the loop share a transaction, and so do units that
    arrive while the write lock is held by another process: the writer never waits for the
    lock, it retries every `retry_seconds` until `lock_timeout` has passed, then answers the
    waiting units Unavailable."""

    def __init__(
        self,
        store: Store,
        *,
        max_batch: int = MAX_BATCH,
        lock_timeout: float = SQLITE_BUSY_TIMEOUT,
        retry_seconds: float = LOCK_RETRY_SECONDS,
    ) -> None:
        super().__init__(store, max_batch)
        self._lock_timeout = lock_timeout
        self._retry_seconds = retry_seconds
        self._alone: list[_Unit[Any]] = []  # from a failed batch: one transaction each
        self._flush_handle: asyncio.Handle | None = None
        self._locked_since: float | None = None

    async def stop(self) -> None:
        """Commit what is still queued (waiting for the write lock as long as any write
        transaction does), then refuse new units."""
        self._started = False
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        while self._alone or self._pending:
            self._step(wait=True)

    def _wake(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._flush_handle is None:
            self._flush_handle = loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_handle = None
        while self._alone or self._pending:
            try:
                self._step(wait=False)
            except WriteLockBusy:
                now = time.monotonic()
                if self._locked_since is None:
                    self._locked_since = now
                if now - self._locked_since < self._lock_timeout:
                    self._flush_handle = asyncio.get_running_loop().call_later(
                        self._retry_seconds, self._flush
                    )
                    return
                self._fail_waiting(now - self._locked_since)
            self._locked_since = None

    def _step(self, *, wait: bool) -> None:
        """Commit the next transaction: a unit that must run alone, else the next batch.
        Raises WriteLockBusy (nothing done) when `wait` is False and the lock is taken."""
        queue = self._alone if self._alone else self._pending
        batch = queue[:1] if queue is self._alone else queue[: self._max_batch]
        try:
            with self._store.transaction(wait=wait) as tx:
                results = _run_all(tx, [unit.work for unit in batch])
        except WriteLockBusy:
            raise
        except Exception as exc:  # every failure is handed to its caller
            if len(batch) == 1:
                _set_exception(batch[0].future, exc)
            else:
                self._alone.extend(batch)  # each runs alone, before anything newer
            results = None
        del queue[: len(batch)]
        if queue is self._pending:
            self.batches += 1
            self.units += len(batch)
        if results is not None:
            for unit, result in zip(batch, results, strict=True):
                _set_result(unit.future, result)

    def _fail_waiting(self, waited: float) -> None:
        error = Unavailable(
            f"database unavailable: another process has held the SQLite write lock for "
            f"{waited:.0f} s",
            retry_after=RETRY_AFTER_SECONDS,
        )
        log.warning("database write lock held too long", extra={"waited_seconds": waited})
        for unit in (*self._alone, *self._pending):
            _set_exception(unit.future, error)
        self._alone.clear()
        self._pending.clear()


class AsyncWriter(_GroupCommit):
    """Group commit on the calling event loop through the store's asyncio connections
    (PostgreSQL): one batch is committed at a time, and the units submitted meanwhile
    make up the next."""

    def __init__(self, store: Store, *, max_batch: int = MAX_BATCH) -> None:
        super().__init__(store, max_batch)
        self._flusher: asyncio.Task[None] | None = None

    async def stop(self) -> None:
        self._started = False
        if self._flusher is not None:
            await self._flusher
            self._flusher = None

    def _wake(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._flusher is None or self._flusher.done():
            self._flusher = loop.create_task(self._flush(), name="db-writer")

    async def _flush(self) -> None:
        while self._pending:
            batch = self._pending[: self._max_batch]
            del self._pending[: len(batch)]
            self.batches += 1
            self.units += len(batch)
            try:
                results = await self._commit(batch)
            except Exception as exc:  # every failure is handed to its caller
                if len(batch) == 1:
                    _set_exception(batch[0].future, exc)
                    continue
                for unit in batch:
                    await self._commit_alone(unit)
                continue
            for unit, result in zip(batch, results, strict=True):
                _set_result(unit.future, result)

    async def _commit(self, batch: list[_Unit[Any]]) -> list[Any]:
        works = [unit.work for unit in batch]
        kind = type(works[0])
        if isinstance(works[0], AtomicBatchable) and all(type(w) is kind for w in works):
            return await works[0].commit_batch(self._store, works)
        return await self._store.run(lambda tx: _run_all(tx, works), write=True)

    async def _commit_alone(self, unit: _Unit[Any]) -> None:
        try:
            (result,) = await self._commit([unit])
        except Exception as exc:
            _set_exception(unit.future, exc)
            return
        _set_result(unit.future, result)
