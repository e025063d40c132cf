"""A gRPC server on a Unix socket that knows who is calling: the kernel's peer credentials
(SO_PEERCRED: pid, uid, gid) of the connection each request arrived on.

Why grpclib and not grpcio: grpcio accepts connections inside its C core and never shows
Python the socket, so SO_PEERCRED cannot be read from a grpcio handler. grpclib is gRPC
over HTTP/2 on asyncio's own `create_server`, so each request's connection is an asyncio
transport whose socket we can ask. (The alternative, a byte-forwarding proxy in front of a
grpcio server that maps forwarded connections back to their credentials by address, adds a
hop, a second listener to protect, and a lookup that must never go stale.)

Two grpclib internals are used, both here and nowhere else, and pinned by the tests in
tests/workload: `Peer._transport` (grpclib exposes the peer's address and TLS certificate
but not its socket) and `Server._protocol_factory` (to track connections, so that `stop()`
closes them: grpclib's own `close()` cancels running calls but leaves idle connections
open, where a client would keep calling a server that is gone).

The socket is created here: the parent directory if missing (0755), a stale socket file
replaced, a live one (another process answers on it) refused with `SocketError`, then
chmod `mode` (0666 by default: any local process may connect; attestation decides what
it gets).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from grpclib.const import Handler
from grpclib.protocol import H2Protocol
from grpclib.server import Server, Stream

from sidecar.errors import SidecarError

log = logging.getLogger(__name__)

_UCRED = struct.Struct("3i")  # struct ucred {pid_t pid; uid_t uid; gid_t gid;}


class Servable(Protocol):
    """A grpclib service: gRPC paths ("/Service/Method") to handlers."""

    def __mapping__(self) -> Mapping[str, Handler]: ...


class PeerCredentialsUnavailable(Exception):
    """The caller's identity cannot be read from the kernel; the call must be refused."""


class SocketError(SidecarError):
    """The configured socket cannot be served: the path is taken (a live socket, a file)
    or the kernel refused to create it."""


@dataclass(frozen=True)
class PeerCredentials:
    """Who connected, as the kernel recorded it when the client called connect()."""

    pid: int
    uid: int
    gid: int


def read_peer_credentials(sock: Any) -> PeerCredentials:
    """SO_PEERCRED of a connected Unix socket (a socket.socket or asyncio's wrapper)."""
    if not hasattr(socket, "SO_PEERCRED"):
        raise PeerCredentialsUnavailable("this platform has no SO_PEERCRED (Linux only)")
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    except OSError as exc:
        raise PeerCredentialsUnavailable(f"SO_PEERCRED failed: {exc}") from None
    pid, uid, gid = _UCRED.unpack(raw)
    if pid <= 0:
        raise PeerCredentialsUnavailable("the kernel recorded no peer process for this socket")
    return PeerCredentials(pid, uid, gid)


def caller_credentials(stream: Stream[Any, Any]) -> PeerCredentials:
    """The kernel credentials of the connection `stream` arrived on."""
    transport = getattr(stream.peer, "_transport", None)  # grpclib internal, see above
    sock = None if transport is None else transport.get_extra_info("socket")
    if sock is None:
        raise PeerCredentialsUnavailable("the connection of this call has no socket")
    if sock.family != socket.AF_UNIX:
        raise PeerCredentialsUnavailable("the call did not arrive on a Unix socket")
    return read_peer_credentials(sock)


class _TrackedProtocol(asyncio.Protocol):
    """grpclib's HTTP/2 protocol, plus membership in the server's set of connections."""

    def __init__(self, inner: H2Protocol, connections: set[asyncio.BaseTransport]) -> None:
        self._inner = inner
        self._connections = connections
        self._transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self._connections.add(transport)
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._transport is not None:
            self._connections.discard(self._transport)
        self._inner.connection_lost(exc)


class _TrackingServer(Server):
    def __init__(
        self, handlers: Collection[Servable], connections: set[asyncio.BaseTransport]
    ) -> None:
        super().__init__(handlers)
        self._connections = connections

    def _protocol_factory(self) -> H2Protocol:  # grpclib internal, see the module docstring
        inner = super()._protocol_factory()
        return _TrackedProtocol(inner, self._connections)  # type: ignore[return-value]


def bind_unix_socket(path: Path, mode: int, what: str) -> socket.socket:
    """A listening, non-blocking Unix socket at `path` with file mode `mode`."""
    try:
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        if path.is_symlink() or path.exists():
            if not path.is_socket():
                raise SocketError(f"{path} exists and is not a socket; remove it or pick another")
            if _answers(path):
                raise SocketError(f"another process serves {path}; is a sidecar running already?")
            path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    except OSError as exc:
        raise SocketError(
            f"cannot create the {what} socket {path}: {exc.strerror or exc}"
        ) from None
    try:
        sock.bind(str(path))
        os.chmod(path, mode)
        sock.listen(128)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise SocketError(
            f"cannot create the {what} socket {path}: {exc.strerror or exc}"
        ) from None
    return sock


def _answers(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except OSError:
        return False
    finally:
        probe.close()
    return True


class UnixGrpcServer:
    """Serve `services` (grpclib `__mapping__` objects) on the Unix socket `path`."""

    def __init__(
        self, path: Path, services: Collection[Servable], *, name: str, mode: int = 0o666
    ) -> None:
        self.path = path
        self.name = name
        self._services = services
        self._mode = mode
        self._connections: set[asyncio.BaseTransport] = set()
        self._server: _TrackingServer | None = None
        self._inode: int | None = None

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    async def start(self) -> None:
        sock = bind_unix_socket(self.path, self._mode, self.name)
        self._inode = os.stat(self.path).st_ino
        server = _TrackingServer(self._services, self._connections)
        try:
            await server.start(sock=sock)
        except BaseException:
            sock.close()
            raise
        self._server = server
        log.info("%s listening", self.name, extra={"socket": str(self.path)})

    async def stop(self) -> None:
        """Stop accepting, cancel running calls, close every connection, remove the socket."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        await server.wait_closed()
        for transport in list(self._connections):
            transport.close()
        self._connections.clear()
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == self._inode:
                self.path.unlink()
        log.info("%s stopped", self.name, extra={"socket": str(self.path)})
