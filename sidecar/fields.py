"""Field validators for the sidecar's config: each one checks one value and, instead of
raising, records "<key>: <problem>" in a `Problems` collector so that the operator sees
every problem at once. Also the HOST:PORT address type."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


class Problems:
    """Collects every problem so the operator sees them all in one go."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, key: str, problem: str) -> None:
        self.items.append(f"{key}: {problem}")


def reject_unknown(p: Problems, prefix: str, data: dict[Any, Any], known: set[str]) -> None:
    for key in data:
        if key not in known:
            p.add(
                f"{prefix}{key}",
                f"unknown key (known keys here: {', '.join(sorted(known))})",
            )


def path_field(
    p: Problems, key: str, value: object, base_dir: Path, *, required: bool
) -> Path | None:
    if value is None:
        if required:
            p.add(key, "required, a path")
        return None
    if not isinstance(value, str) or not value:
        p.add(key, f"expected a path, got {value!r}")
        return None
    path = Path(value).expanduser()
    return path if path.is_absolute() else base_dir / path


def parse_address(text: str) -> Address:
    """Parse HOST:PORT or [IPv6]:PORT; ValueError with a readable message."""
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(f"expected [IPV6]:PORT, got {text!r}")
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or ":" in host:
            raise ValueError(f"expected HOST:PORT, got {text!r}")
    if not host:
        raise ValueError(f"the host is missing in {text!r}")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"the port in {text!r} must be a number from 0 to 65535")
    return Address(host, int(port_text))


def address_field(p: Problems, key: str, value: object, *, allow_zero: bool) -> Address | None:
    if not isinstance(value, str):
        p.add(key, f"required, HOST:PORT, got {value!r}")
        return None
    try:
        addr = parse_address(value)
    except ValueError as exc:
        p.add(key, str(exc))
        return None
    if addr.port == 0 and not allow_zero:
        p.add(key, "port 0 is not a valid CA port")
        return None
    return addr


def number_field(
    p: Problems, key: str, value: object, *, low: float, high: float | None = None
) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        p.add(key, f"expected a number, got {value!r}")
        return low
    if value < low or (high is not None and value > high):
        bounds = f"at least {low}" if high is None else f"from {low} to {high}"
        p.add(key, f"must be {bounds}, got {value}")
        return low
    return float(value)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
