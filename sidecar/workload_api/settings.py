"""Config blocks of the two local socket APIs, `workload_api:` and `sds:`.

    workload_api:
      socket: /run/meshtls/workload.sock       # required
      allow_entries_without_selectors: false   # optional; see docs/WORKLOAD_API.md

Parsed here (and called from `sidecar.config`) so that the socket rules live beside the
server that binds the socket. Problems are collected like every other key of the config.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sidecar.fields import Problems, path_field, reject_unknown

# sockaddr_un.sun_path is 108 bytes on Linux, including the terminating NUL.
MAX_SOCKET_PATH = 107


@dataclass(frozen=True)
class SocketApiConfig:
    """Where one local API listens and whom it may serve."""

    socket: Path
    # Serve identities whose registration entry has no selectors to every local caller.
    allow_entries_without_selectors: bool = False


def parse_socket_api(p: Problems, key: str, data: object, base_dir: Path) -> SocketApiConfig | None:
    """Validate one block; None when it is absent or has problems (recorded in `p`)."""
    if data is None:
        return None
    if not isinstance(data, dict):
        p.add(key, "expected a mapping with socket (a Unix socket path)")
        return None
    known = {"socket", "allow_entries_without_selectors"}
    reject_unknown(p, f"{key}.", data, known)
    path = _socket_path(p, f"{key}.socket", data.get("socket"), base_dir)
    allow: Any = data.get("allow_entries_without_selectors", False)
    if not isinstance(allow, bool):
        p.add(f"{key}.allow_entries_without_selectors", f"expected true or false, got {allow!r}")
        allow = False
    if path is None:
        return None
    return SocketApiConfig(path, allow)


def _socket_path(p: Problems, key: str, value: object, base_dir: Path) -> Path | None:
    path = path_field(p, key, value, base_dir, required=True)
    if path is None:
        return None
    if len(str(path).encode()) > MAX_SOCKET_PATH:
        p.add(
            key,
            f"{path} is {len(str(path).encode())} bytes long; a Unix socket path must be at "
            f"most {MAX_SOCKET_PATH} bytes, use a shorter directory such as /run/meshtls",
        )
        return None
    if path.exists() and not path.is_socket():
        p.add(key, f"{path} exists and is not a socket; refusing to replace it")
        return None
    return path


def check_distinct(p: Problems, sockets: dict[str, SocketApiConfig | None]) -> None:
    """Two APIs cannot share one socket."""
    seen: dict[Path, str] = {}
    for key, config in sockets.items():
        if config is None:
            continue
        other = seen.get(config.socket)
        if other is not None:
            p.add(f"{key}.socket", f"{config.socket} is already the socket of {other}")
        seen[config.socket] = key
