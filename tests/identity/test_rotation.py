"""Renewal times and backoff (meshtls.identity.rotation)."""

from __future__ import annotations

import random

from meshtls.identity.rotation import Backoff, renewal_time


def test_renewal_time_without_jitter_is_the_fraction_of_the_lifetime() -> None:
    assert renewal_time(1000.0, 4600.0, jitter=0) == 2800.0
    assert renewal_time(1000.0, 4600.0, fraction=0.75, jitter=0) == 3700.0


def test_renewal_time_spreads_within_the_jitter_band() -> None:
    rng = random.Random(7)
    times = [renewal_time(0.0, 3600.0, rng=rng) for _ in range(2000)]
    assert min(times) >= 0.4 * 3600
    assert max(times) <= 0.6 * 3600
    # The band is actually used, not a single point.
    assert max(times) - min(times) > 0.15 * 3600


def test_renewal_time_never_leaves_the_validity_period() -> None:
    assert renewal_time(0.0, 100.0, fraction=1.5, jitter=0) == 100.0
    assert renewal_time(0.0, 100.0, fraction=-1.0, jitter=0) == 0.0
    assert renewal_time(50.0, 50.0) == 50.0
    assert renewal_time(50.0, 10.0) == 50.0


def test_backoff_grows_caps_and_resets() -> None:
    backoff = Backoff(initial=1.0, maximum=10.0, rng=random.Random(1))
    delays = [backoff.next_delay() for _ in range(8)]
    ceilings = [1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0, 10.0]
    for delay, ceiling in zip(delays, ceilings, strict=True):
        assert ceiling / 2 <= delay <= ceiling
    assert backoff.attempts == 8
    backoff.reset()
    assert backoff.attempts == 0
    assert 0.5 <= backoff.next_delay() <= 1.0
