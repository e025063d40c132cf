"""The group-commit writer on a real database: concurrent units share one transaction, a
failing unit takes nothing with it (its neighbours still commit), and every caller gets
its own outcome only after the commit."""

from __future__ import annotations

import asyncio
import secrets

import pytest
from sqlalchemy import text

from ca_server.db.store import Store
from ca_server.db.tx import Tx
from ca_server.domain import JoinToken
from ca_server.errors import AlreadyExists
from ca_server.services.writer import GroupCommitWriter


def _token(name: str) -> JoinToken:
    return JoinToken(secrets.token_hex(32), name, 1.0, 2.0)


async def test_one_failing_unit_does_not_take_its_batch_with_it(store: Store) -> None:
    writer = GroupCommitWriter(store)
    writer.start()
    try:
        duplicate = _token("dup")
        await writer.submit(lambda tx: tx.add_join_token(duplicate))
        good = [_token(f"node-{i}") for i in range(20)]

        def failing(tx: Tx) -> None:
            tx.add_join_token(_token("half-written"))  # written, then the unit fails
            tx.add_join_token(duplicate)

        def adder(token: JoinToken):  # type: ignore[no-untyped-def]
            return lambda tx: tx.add_join_token(token)

        outcomes = await asyncio.gather(
            *[writer.submit(adder(t)) for t in good[:10]],
            writer.submit(failing),
            *[writer.submit(adder(t)) for t in good[10:]],
            return_exceptions=True,
        )
    finally:
        writer.stop()
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


async def test_submit_after_stop_is_refused(store: Store) -> None:
    writer = GroupCommitWriter(store)
    writer.start()
    writer.stop()
    with pytest.raises(RuntimeError, match="not running"):
        await writer.submit(lambda tx: None)
