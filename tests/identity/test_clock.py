"""The injected clocks (meshtls.clock)."""

from __future__ import annotations

import asyncio
import time

from meshtls.clock import ManualClock, SystemClock, utc


async def test_manual_clock_wakes_sleepers_only_when_advanced_past_their_deadline() -> None:
    clock = ManualClock(start=1000.0)
    woke: list[float] = []

    async def sleeper(deadline: float) -> None:
        await clock.sleep_until(deadline)
        woke.append(clock.now())

    tasks = [asyncio.create_task(sleeper(1010.0)), asyncio.create_task(sleeper(1100.0))]
    await asyncio.sleep(0)
    await clock.advance(5)
    await asyncio.sleep(0)
    assert woke == []
    await clock.advance(5)
    await asyncio.wait_for(tasks[0], timeout=5)
    assert woke == [1010.0]
    assert not tasks[1].done()
    await clock.advance(100)
    await asyncio.wait_for(tasks[1], timeout=5)
    assert woke == [1010.0, 1110.0]


async def test_manual_clock_past_deadline_returns_at_once() -> None:
    clock = ManualClock(start=50.0)
    await asyncio.wait_for(clock.sleep_until(10.0), timeout=5)
    clock.set_sync(70.0)
    assert clock.now() == 70.0


async def test_system_clock() -> None:
    clock = SystemClock()
    before = time.time()
    assert before <= clock.now() <= time.time()
    await asyncio.wait_for(clock.sleep_until(before - 10), timeout=5)
    assert utc(0).isoformat() == "1970-01-01T00:00:00+00:00"
