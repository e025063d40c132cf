"""Caches for what every agent call reads: who a client certificate belongs to and which
entries a node has, kept in step with the database's access version (a counter every ban,
node certificate change and entry change bumps in its own transaction).

Local changes (ban, revoke, entry create/delete) clear them at once. Another replica's
change is seen when this replica learns the newer access version: from the signing fence's
heartbeat, which reads it every `trust_poll_interval / 4`, or from a read of its own that
saw it. `ttl` only bounds how long an answer lives should that news never come."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class AccessCache(Generic[K, V]):
    def __init__(self, ttl: float, now: Callable[[], float], max_items: int = 50_000) -> None:
        self._ttl = ttl
        self._now = now
        self._max = max_items
        self._items: OrderedDict[K, tuple[float, V]] = OrderedDict()
        self.version = 0  # the newest access version this cache has heard of

    def get(self, key: K) -> V | None:
        found = self._items.get(key)
        if found is None:
            return None
        stored_at, value = found
        if self._now() - stored_at > self._ttl:
            del self._items[key]
            return None
        return value

    def put(self, key: K, value: V, read_at: int) -> None:
        """Keep `value`, read in a transaction that saw access version `read_at`. A read
        older than the newest version known is dropped: it may predate the change that
        emptied the cache. A newer one first empties the cache (it saw a change)."""
        if self._ttl <= 0 or read_at < self.version:
            return
        self.advance(read_at)
        self._items[key] = (self._now(), value)
        self._items.move_to_end(key)
        if len(self._items) > self._max:
            self._items.popitem(last=False)

    def advance(self, version: int) -> None:
        """The database holds access version `version`: if that is news, forget everything
        (some node or entry changed; which one is not worth knowing)."""
        if version > self.version:
            self.version = version
            self._items.clear()

    def discard(self, key: K) -> None:
        self._items.pop(key, None)

    def clear(self) -> None:
        self._items.clear()
