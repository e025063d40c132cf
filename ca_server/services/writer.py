"""Group commit: every database write of the CA goes through one writer thread.

Concurrent requests each submit a unit of work (a function of a write transaction). The
writer takes every unit waiting in its queue, runs them in ONE transaction and commits, then
answers each caller: a caller's reply is sent only after the commit that holds its rows,
so no certificate is returned without its row, and no row exists for a certificate that was
not returned (a unit that fails takes nothing with it).

One writer also serializes writers, which is what SQLite wants (WAL, one writer) and
costs PostgreSQL little at this size. If a batch fails, the writer rolls it back and runs
each unit alone, so one bad unit cannot fail its neighbours.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from ca_server.db.store import Store
from ca_server.db.tx import Tx

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_BATCH = 512


@dataclass
class _Unit(Generic[T]):
    work: Callable[[Tx], T] | Batchable
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[T]
    enqueued_at: float = field(default_factory=time.perf_counter)


class _Stop:
    pass


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


class GroupCommitWriter:
    def __init__(self, store: Store, *, max_batch: int = MAX_BATCH) -> None:
        self._store = store
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue[_Unit[Any] | _Stop] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="meshtls-db-writer", daemon=True)
        self._started = False
        self.batches = 0
        self.units = 0

    def start(self) -> None:
        if not self._started:
            self._started = True
            self._thread.start()

    def stop(self) -> None:
        """Finish what is queued, then stop the thread."""
        if self._started:
            self._queue.put(_Stop())
            self._thread.join()
            self._started = False

    async def submit(self, work: Callable[[Tx], T] | Batchable) -> T:
        """Run `work` in a write transaction; return its result once committed. A
        `Refused` result of a batchable unit is raised here as its error."""
        if not self._started:
            raise RuntimeError("the database writer is not running")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put(_Unit(work, loop, future))
        result = await future
        if isinstance(result, Refused):
            raise result.error
        return result

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if isinstance(first, _Stop):
                return
            batch: list[_Unit[Any]] = [first]
            stop_after = False
            while len(batch) < self._max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if isinstance(item, _Stop):
                    stop_after = True
                    break
                batch.append(item)
            self._commit(batch)
            if stop_after:
                return

    def _commit(self, batch: list[_Unit[Any]]) -> None:
        self.batches += 1
        self.units += len(batch)
        try:
            with self._store.transaction() as tx:
                results = _run_all(tx, [unit.work for unit in batch])
        except Exception as exc:  # every failure is handed to its caller below
            if len(batch) == 1:
                _fail(batch[0], exc)
            else:
                for unit in batch:
                    self._commit_alone(unit)
            return
        _resolve_all(batch, results)

    def _commit_alone(self, unit: _Unit[Any]) -> None:
        try:
            with self._store.transaction() as tx:
                (result,) = _run_all(tx, [unit.work])
        except Exception as exc:
            _fail(unit, exc)
            return
        _resolve(unit, result)


def _resolve(unit: _Unit[Any], result: Any) -> None:
    _deliver(unit, _set_result, result)


def _resolve_all(batch: list[_Unit[Any]], results: list[Any]) -> None:
    """Answer a committed batch with one wake-up per event loop rather than one per unit
    (each wake-up is a write to the loop's self-pipe and a turn of the loop)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Any]]] = {}
    for unit, result in zip(batch, results, strict=True):
        by_loop.setdefault(unit.loop, []).append((unit.future, result))
    for loop, answers in by_loop.items():
        try:
            loop.call_soon_threadsafe(_set_results, answers)
        except RuntimeError:
            log.warning("a database write finished after its caller's event loop closed")


def _deliver(
    unit: _Unit[Any], setter: Callable[[asyncio.Future[Any], Any], None], value: Any
) -> None:
    """Hand the outcome to the caller's loop. A caller whose loop has closed (shutdown)
    is gone; the writer thread must outlive it and keep serving the others."""
    try:
        unit.loop.call_soon_threadsafe(setter, unit.future, value)
    except RuntimeError:
        log.warning("a database write finished after its caller's event loop closed")


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


def _fail(unit: _Unit[Any], exc: BaseException) -> None:
    _deliver(unit, _set_exception, exc)


def _set_result(future: asyncio.Future[Any], result: Any) -> None:
    if not future.done():
        future.set_result(result)


def _set_results(answers: list[tuple[asyncio.Future[Any], Any]]) -> None:
    for future, result in answers:
        _set_result(future, result)


def _set_exception(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
