"""Hands identity snapshots to whoever needs them (files, TLS proxy, Workload API, SDS).

A subscriber iterates `async for snapshot in publisher.subscribe()`: it gets the current
snapshot at once, then the newest one after every change. A slow subscriber skips the
snapshots it had no time to see and always wakes up to the latest, so it can never fall
behind or make the manager wait.
"""

from __future__ import annotations

import asyncio

from sidecar.identity.model import Snapshot


class Subscription:
    """An async iterator of snapshots; `close()` (or `async with`) ends it."""

    def __init__(self, publisher: SnapshotPublisher) -> None:
        self._publisher = publisher
        self._changed = asyncio.Event()
        self._changed.set()
        self._seen = -1
        self._closed = False

    def _notify(self) -> None:
        self._changed.set()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Snapshot:
        while not self._closed:
            snapshot = self._publisher.current()
            if snapshot.version != self._seen:
                self._seen = snapshot.version
                return snapshot
            self._changed.clear()
            await self._changed.wait()
        raise StopAsyncIteration

    def close(self) -> None:
        self._closed = True
        self._changed.set()
        self._publisher._unsubscribe(self)

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


class SnapshotPublisher:
    def __init__(self) -> None:
        self._snapshot = Snapshot.build(0, None, None, {})
        self._subscribers: set[Subscription] = set()

    def current(self) -> Snapshot:
        return self._snapshot

    def publish(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot
        for sub in list(self._subscribers):
            sub._notify()

    def subscribe(self) -> Subscription:
        sub = Subscription(self)
        self._subscribers.add(sub)
        return sub

    def _unsubscribe(self, sub: Subscription) -> None:
        self._subscribers.discard(sub)

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)
