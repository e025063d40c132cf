"""Human durations in config files and flags: "90s", "10m", "1h", "30d", "1h30m" or seconds."""

from __future__ import annotations

import re

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_PART = re.compile(r"(\d+(?:\.\d+)?)([smhd])")


def parse_duration(value: str | int | float, *, what: str = "duration") -> float:
    """Seconds in `value`; ValueError naming `what` when it is not a positive duration."""
    if isinstance(value, bool):
        raise ValueError(f"{what}: expected a duration like 10m or 1h, got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        text = value.strip().lower()
        if re.fullmatch(r"\d+(\.\d+)?", text):
            seconds = float(text)
        else:
            parts = _PART.findall(text)
            if not parts or "".join(n + u for n, u in parts) != text:
                raise ValueError(
                    f"{what}: expected a duration like 90s, 10m, 1h or 30d, got {value!r}"
                )
            seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    if seconds <= 0:
        raise ValueError(f"{what}: must be positive, got {value!r}")
    return seconds


def format_duration(seconds: float) -> str:
    """Compact form for messages: 3600 -> "1h", 5400 -> "1h30m", 42 -> "42s"."""
    remaining = round(seconds)
    if remaining <= 0:
        return "0s"
    out = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        count, remaining = divmod(remaining, size)
        if count:
            out.append(f"{count}{unit}")
    return "".join(out)
