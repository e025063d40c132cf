"""Join tokens: single use (also under real concurrency), expiry, clear refusals, pruning."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext

import pytest
from sqlalchemy import text

from ca_server.db import Store, make_engine
from ca_server.errors import AlreadyExists, Unauthenticated
from tests.db.builders import T0, join_token


@pytest.fixture
def second_store(store: Store, database_url: str) -> Iterator[Store]:
    """Another store on the same database with its own engine: a second CA replica."""
    other = Store(make_engine(database_url))
    try:
        yield other
    finally:
        other.close()


def test_token_is_consumed_once(store: Store) -> None:
    token = join_token()
    with store.transaction() as tx:
        tx.add_join_token(token)

    with store.transaction() as tx:
        consumed = tx.consume_join_token(token.token_hash, T0 + 5)
    assert consumed.node_name == "web-1"
    assert consumed.used_at == T0 + 5

    with pytest.raises(Unauthenticated) as refused, store.transaction() as tx:
        tx.consume_join_token(token.token_hash, T0 + 6)
    assert refused.value.message == "join token was already used at 2023-11-14T22:13:25Z"


def test_unknown_token_is_refused(store: Store) -> None:
    with pytest.raises(Unauthenticated) as refused, store.transaction() as tx:
        tx.consume_join_token("00" * 32, T0)
    assert refused.value.message == "join token is not known"


def test_expired_token_is_refused_at_its_expiry_time(store: Store) -> None:
    token = join_token(expires_at=T0 + 600)
    with store.transaction() as tx:
        tx.add_join_token(token)
    with pytest.raises(Unauthenticated) as refused, store.transaction() as tx:
        tx.consume_join_token(token.token_hash, T0 + 600)
    assert refused.value.message == "join token expired at 2023-11-14T22:23:20Z"
    with store.read() as tx:
        stored = tx.get_join_token(token.token_hash)
    assert stored is not None
    assert stored.used_at is None


def test_duplicate_token_hash_is_already_exists(store: Store) -> None:
    token = join_token()
    with store.transaction() as tx:
        tx.add_join_token(token)
    with pytest.raises(AlreadyExists), store.transaction() as tx:
        tx.add_join_token(token)


def test_racing_consumers_on_two_replicas_exactly_one_wins(
    store: Store, second_store: Store
) -> None:
    """Threads on two engines consume the same tokens at the same moment, many rounds."""
    workers, rounds = 6, 5
    tokens = [join_token() for _ in range(rounds)]
    with store.transaction() as tx:
        for token in tokens:
            tx.add_join_token(token)

    barrier = threading.Barrier(workers)

    def consume(worker: int, token_hash: str) -> str:
        replica = store if worker % 2 == 0 else second_store
        barrier.wait(timeout=30)
        try:
            with replica.transaction() as tx:
                tx.consume_join_token(token_hash, T0 + 1)
        except Unauthenticated as refused:
            return refused.message
        return "consumed"

    with ThreadPoolExecutor(workers) as pool:
        for token in tokens:
            outcomes = list(pool.map(consume, range(workers), [token.token_hash] * workers))
            assert outcomes.count("consumed") == 1, outcomes
            losers = [o for o in outcomes if o != "consumed"]
            assert all(o.startswith("join token was already used at ") for o in losers)


def _wait_for_lock_waiter(database_url: str, deadline: float) -> None:
    """Poll pg_stat_activity until a session of this database waits on a row lock."""
    engine = make_engine(database_url, pool_size=1)
    try:
        while time.monotonic() < deadline:
            with engine.connect() as conn:
                waiting = conn.execute(
                    text(
                        "SELECT count(*) FROM pg_stat_activity "
                        "WHERE datname = current_database() AND wait_event_type = 'Lock'"
                    )
                ).scalar_one()
            if waiting:
                return
            time.sleep(0.01)
        raise AssertionError("the second consumer never blocked on the token's row lock")
    finally:
        engine.dispose()


@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
@pytest.mark.parametrize("first_outcome", ["commit", "rollback"])
def test_second_consumer_waits_for_the_first_transaction(
    store: Store, second_store: Store, database_url: str, first_outcome: str
) -> None:
    """Interleaving forced on PostgreSQL: B's UPDATE runs while A's is uncommitted. B
    loses if A commits, and wins if A rolls back (the token was never spent)."""
    token = join_token()
    with store.transaction() as tx:
        tx.add_join_token(token)

    outcome: list[str] = []

    def second_consumer() -> None:
        try:
            with second_store.transaction() as tx:
                tx.consume_join_token(token.token_hash, T0 + 2)
            outcome.append("consumed")
        except Unauthenticated as refused:
            outcome.append(refused.message)

    class Abort(Exception):
        pass

    thread = threading.Thread(target=second_consumer)
    expectation = pytest.raises(Abort) if first_outcome == "rollback" else nullcontext()
    with expectation, store.transaction() as tx:
        tx.consume_join_token(token.token_hash, T0 + 1)
        thread.start()
        _wait_for_lock_waiter(database_url, time.monotonic() + 20)
        if first_outcome == "rollback":
            raise Abort
    thread.join(timeout=20)
    if first_outcome == "commit":
        assert outcome == ["join token was already used at 2023-11-14T22:13:21Z"]
    else:
        assert outcome == ["consumed"]


def test_prune_deletes_used_and_expired_tokens(store: Store) -> None:
    used, expired, fresh = join_token(), join_token(expires_at=T0 + 10), join_token()
    with store.transaction() as tx:
        for token in (used, expired, fresh):
            tx.add_join_token(token)
        tx.consume_join_token(used.token_hash, T0 + 1)
    with store.transaction() as tx:
        assert tx.prune_join_tokens(T0 + 10) == 2
    with store.read() as tx:
        assert tx.get_join_token(used.token_hash) is None
        assert tx.get_join_token(expired.token_hash) is None
        assert tx.get_join_token(fresh.token_hash) == fresh
