"""Per-caller token buckets: a node that asks too often gets RESOURCE_EXHAUSTED with a
retry hint instead of slowing everybody down."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from ca_server.errors import ResourceExhausted

MAX_TRACKED = 100_000


class RateLimiter:
    def __init__(self, rate: float, burst: int, now: Callable[[], float]) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._now = now
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def check(self, key: str, cost: float = 1.0) -> None:
        """Take `cost` tokens from `key`'s bucket or raise ResourceExhausted."""
        now = self._now()
        tokens, last = self._buckets.pop(key, (self._burst, now))
        tokens = min(self._burst, tokens + (now - last) * self._rate)
        if tokens < cost:
            self._buckets[key] = (tokens, now)
            wait = (cost - tokens) / self._rate
            raise ResourceExhausted(
                f"rate limit for {key} exceeded ({self._rate:g} requests/s); retry in {wait:.1f}s",
                retry_after=wait,
            )
        self._buckets[key] = (tokens - cost, now)
        if len(self._buckets) > MAX_TRACKED:
            self._buckets.popitem(last=False)
