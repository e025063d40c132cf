"""The group-commit writers on a real database: concurrent units share one transaction, a
failing unit takes nothing with it (its neighbours still commit), and every caller gets
its own outcome only after the commit. The event-loop writer (SQLite) never blocks the
loop on another process's write lock."""

from __future__ import annotations

import asyncio
import secrets
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from ca_server.db import migrate
from ca_server.db.session import make_engine, sqlite_url
from ca_server.db.store import Store
from ca_server.db.tx import Tx
from ca_server.domain import JoinToken
from ca_server.errors import AlreadyExists, Unavailable
from ca_server.services.writer import AsyncWriter, LoopWriter, Writer, open_writer


def _token(name: str) -> JoinToken:
    return JoinToken(secrets.token_hex(32), name, 1.0, 2.0)


def _adder(token: JoinToken) -> Callable[[Tx], None]:
    return lambda tx: tx.add_join_token(token)


@pytest.fixture
async def writer(store: Store) -> AsyncIterator[Writer]:
    """The writer each database gets: LoopWriter (SQLite), AsyncWriter (PostgreSQL)."""
    yield open_writer(store)
    await store.aclose()


def test_each_database_gets_its_writer(store: Store) -> None:
    expected = LoopWriter if store.dialect == "sqlite" else AsyncWriter
    assert isinstance(open_writer(store), expected)


async def test_one_failing_unit_does_not_take_its_batch_with_it(
    store: Store, writer: Writer
) -> None:
    writer.start()
    try:
        duplicate = _token("dup")
        await writer.submit(lambda tx: tx.add_join_token(duplicate))
        good = [_token(f"node-{i}") for i in range(20)]

        def failing(tx: Tx) -> None:
            tx.add_join_token(_token("half-written"))  # written, then the unit fails
            tx.add_join_token(duplicate)

        outcomes = await asyncio.gather(
            *[writer.submit(_adder(t)) for t in good[:10]],
            writer.submit(failing),
            *[writer.submit(_adder(t)) for t in good[10:]],
            return_exceptions=True,
        )
    finally:
        await writer.stop()
    assert [o for o in outcomes if isinstance(o, Exception)] == [outcomes[10]]
    assert isinstance(outcomes[10], AlreadyExists)
    with store.read() as tx:
        for token in good:
            assert tx.get_join_token(token.token_hash) is not None
    with store.engine.connect() as conn:
        leftovers = conn.execute(
            text("SELECT count(*) FROM join_tokens WHERE node_name = 'half-written'")
        ).scalar_one()
    assert leftovers == 0  # the failing unit's first insert was rolled back with it
    assert writer.units == 22
    assert writer.batches < 22  # concurrent units shared transactions


async def test_submit_after_stop_is_refused(writer: Writer) -> None:
    writer.start()
    await writer.stop()
    with pytest.raises(RuntimeError, match="not running"):
        await writer.submit(lambda tx: None)


@pytest.fixture
def sqlite_file(tmp_path: Path) -> Iterator[tuple[Store, Path]]:
    path = tmp_path / "ca.db"
    migrate.upgrade(sqlite_url(path))
    store = Store(make_engine(sqlite_url(path)))
    try:
        yield store, path
    finally:
        store.close()


def _hold_write_lock(path: Path) -> sqlite3.Connection:
    """Another process's writer, as SQLite sees it: a connection holding the write lock."""
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    return holder


def _tokens_in(store: Store, tokens: list[JoinToken]) -> int:
    with store.read() as tx:
        return sum(tx.get_join_token(t.token_hash) is not None for t in tokens)


async def test_the_loop_keeps_running_while_another_process_holds_the_lock(
    sqlite_file: tuple[Store, Path],
) -> None:
    store, path = sqlite_file
    writer = LoopWriter(store)
    writer.start()
    holder = _hold_write_lock(path)
    tokens = [_token(f"node-{i}") for i in range(5)]
    try:
        submitted = [asyncio.create_task(writer.submit(_adder(t))) for t in tokens]
        # The loop turns (timers fire) while the writer waits for the lock.
        turns = 0
        deadline = time.monotonic() + 0.3
        while time.monotonic() < deadline:
            await asyncio.sleep(0.01)
            turns += 1
        assert turns >= 10
        assert not any(task.done() for task in submitted)
        holder.execute("ROLLBACK")
        await asyncio.wait_for(asyncio.gather(*submitted), timeout=5)
    finally:
        holder.close()
        await writer.stop()
    assert _tokens_in(store, tokens) == 5
    assert writer.batches == 1  # the units that waited together committed together


async def test_a_lock_held_too_long_is_unavailable_and_writes_nothing(
    sqlite_file: tuple[Store, Path],
) -> None:
    store, path = sqlite_file
    writer = LoopWriter(store, lock_timeout=0.2)
    writer.start()
    holder = _hold_write_lock(path)
    token = _token("late")
    try:
        with pytest.raises(Unavailable, match="held the SQLite write lock"):
            await asyncio.wait_for(writer.submit(lambda tx: tx.add_join_token(token)), 5)
        holder.execute("ROLLBACK")
        after = _token("after")
        await asyncio.wait_for(writer.submit(lambda tx: tx.add_join_token(after)), 5)
    finally:
        holder.close()
        await writer.stop()
    assert _tokens_in(store, [token]) == 0
    assert _tokens_in(store, [after]) == 1


async def test_stop_commits_what_is_still_queued(sqlite_file: tuple[Store, Path]) -> None:
    store, path = sqlite_file
    writer = LoopWriter(store)
    writer.start()
    holder = _hold_write_lock(path)
    token = _token("queued")
    task = asyncio.create_task(writer.submit(lambda tx: tx.add_join_token(token)))
    await asyncio.sleep(0.05)
    assert not task.done()
    holder.execute("ROLLBACK")
    holder.close()
    await writer.stop()
    await asyncio.wait_for(task, 5)
    assert _tokens_in(store, [token]) == 1
