"""Snapshot subscriptions: the current snapshot at once, then only the newest."""

from __future__ import annotations

import asyncio

from sidecar.identity.model import Snapshot
from sidecar.identity.publisher import SnapshotPublisher


def snap(version: int) -> Snapshot:
    return Snapshot.build(version, None, None, {})


async def test_subscriber_gets_the_current_snapshot_at_once() -> None:
    publisher = SnapshotPublisher()
    publisher.publish(snap(3))
    async with publisher.subscribe() as sub:
        assert (await anext(sub)).version == 3


async def test_slow_subscriber_skips_to_the_newest() -> None:
    publisher = SnapshotPublisher()
    sub = publisher.subscribe()
    assert (await anext(sub)).version == 0
    for version in (1, 2, 3):
        publisher.publish(snap(version))
    assert (await anext(sub)).version == 3
    waiting = asyncio.create_task(anext(sub))
    await asyncio.sleep(0)
    assert not waiting.done()  # nothing new: it waits
    publisher.publish(snap(4))
    assert (await waiting).version == 4
    sub.close()


async def test_close_ends_iteration_and_unsubscribes() -> None:
    publisher = SnapshotPublisher()
    sub = publisher.subscribe()
    await anext(sub)
    seen: list[int] = []

    async def consume() -> None:
        async for s in sub:
            seen.append(s.version)

    task = asyncio.create_task(consume())
    publisher.publish(snap(1))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    sub.close()
    await asyncio.wait_for(task, 5)
    assert seen == [1]
    assert publisher.subscriber_count == 0
