"""The cache of node and entry answers: what a newer access version does to it."""

from __future__ import annotations

from ca_server.services.cache import AccessCache
from meshtls.clock import ManualClock


def test_a_newer_access_version_empties_the_cache_and_older_reads_stay_out() -> None:
    clock = ManualClock(1_000.0)
    cache: AccessCache[str, str] = AccessCache(30.0, clock.now)
    cache.put("web-1", "read at 4", read_at=4)
    assert cache.get("web-1") == "read at 4"

    cache.advance(5)  # another replica banned someone: the heartbeat read version 5
    assert cache.get("web-1") is None
    # A read that began before the change finishes after it: it must not come back.
    cache.put("web-1", "read at 4", read_at=4)
    assert cache.get("web-1") is None
    cache.put("web-1", "read at 5", read_at=5)
    assert cache.get("web-1") == "read at 5"

    # A read that saw a change the heartbeat has not reported yet empties the rest.
    cache.put("web-2", "read at 6", read_at=6)
    assert (cache.get("web-1"), cache.get("web-2")) == (None, "read at 6")
    cache.advance(6)  # old news: nothing is dropped
    assert cache.get("web-2") == "read at 6"


def test_answers_still_expire_by_age() -> None:
    clock = ManualClock(1_000.0)
    cache: AccessCache[str, str] = AccessCache(30.0, clock.now)
    cache.put("web-1", "answer", read_at=0)
    clock.set_sync(1_029.0)
    assert cache.get("web-1") == "answer"
    clock.set_sync(1_031.0)
    assert cache.get("web-1") is None
