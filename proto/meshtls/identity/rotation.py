"""When to renew a certificate, and how long to wait after a failure. Pure functions of time."""

from __future__ import annotations

import random
from dataclasses import dataclass

DEFAULT_RENEW_FRACTION = 0.5
DEFAULT_JITTER = 0.1


def renewal_time(
    not_before: float,
    not_after: float,
    *,
    fraction: float = DEFAULT_RENEW_FRACTION,
    jitter: float = DEFAULT_JITTER,
    rng: random.Random | None = None,
) -> float:
    """The moment to renew: `fraction` of the lifetime, moved by up to +-`jitter` of it.

    With the defaults a one-hour certificate renews between 24 and 36 minutes after
    NotBefore, which spreads a fleet's renewals instead of having every host ask at once.
    The result never lies past NotAfter.
    """
    if not_after <= not_before:
        return not_before
    lifetime = not_after - not_before
    spread = (rng or random).uniform(-jitter, jitter) if jitter else 0.0
    at = not_before + lifetime * (fraction + spread)
    return min(max(at, not_before), not_after)


@dataclass
class Backoff:
    """Exponential backoff with full jitter, capped; `reset()` after a success."""

    initial: float = 1.0
    maximum: float = 300.0
    multiplier: float = 2.0
    rng: random.Random | None = None
    _attempt: int = 0

    def next_delay(self) -> float:
        ceiling = min(self.maximum, self.initial * self.multiplier**self._attempt)
        self._attempt += 1
        low = ceiling / 2
        return low + (self.rng or random).uniform(0, ceiling - low)

    @property
    def attempts(self) -> int:
        return self._attempt

    def reset(self) -> None:
        self._attempt = 0
