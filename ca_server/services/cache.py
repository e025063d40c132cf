"""Short-lived caches for what every agent call reads: who a client certificate belongs to
and which entries a node has. Local changes (ban, revoke, entry create/delete) clear them
at once; changes made by another replica are seen within `ttl` seconds."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class TtlCache(Generic[K, V]):
    def __init__(self, ttl: float, now: Callable[[], float], max_items: int = 50_000) -> None:
        self._ttl = ttl
        self._now = now
        self._max = max_items
        self._items: OrderedDict[K, tuple[float, V]] = OrderedDict()

    def get(self, key: K) -> V | None:
        found = self._items.get(key)
        if found is None:
            return None
        stored_at, value = found
        if self._now() - stored_at > self._ttl:
            del self._items[key]
            return None
        return value

    def put(self, key: K, value: V) -> None:
        if self._ttl <= 0:
            return
        self._items[key] = (self._now(), value)
        self._items.move_to_end(key)
        if len(self._items) > self._max:
            self._items.popitem(last=False)

    def discard(self, key: K) -> None:
        self._items.pop(key, None)

    def clear(self) -> None:
        self._items.clear()
