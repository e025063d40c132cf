"""Test parts for the proxy: a throwaway PKI published as identity snapshots (the real
`SnapshotPublisher`), real proxy services bound to 127.0.0.1, small asyncio apps, and
`openssl s_client` as an outside TLS peer.

    mesh = Mesh(tmp_path)
    mesh.issue("spiffe://example.org/svc/web")
    server = await mesh.serve(inbound=[inbound("web", app.port, allow=[...])])
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from prometheus_client import CollectorRegistry

from sidecar.fields import Problems
from sidecar.identity.model import Snapshot, WorkloadIdentity
from sidecar.identity.publisher import SnapshotPublisher
from sidecar.proxy.config import ProxyConfig, parse_proxy
from sidecar.proxy.listener import Listener
from sidecar.proxy.metrics import ProxyMetrics
from sidecar.proxy.native_tls import NativeTls
from sidecar.proxy.service import ProxyService
from tests.sidecar.helpers import make_bundle, make_identity, wait_for
from tests.support.pki import Issued, ThrowawayCA

TD = "example.org"
WEB = "spiffe://example.org/svc/web"
API = "spiffe://example.org/svc/api"
OTHER = "spiffe://example.org/svc/other"


def parse(document: dict[str, Any], base_dir: Path = Path("/")) -> ProxyConfig:
    problems = Problems()
    config = parse_proxy(problems, document, base_dir=base_dir, trust_domain=TD)
    assert not problems.items, problems.items
    return config


def inbound(name: str, forward: str, allow: list[str], **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "listen": "127.0.0.1:0",
        "forward": forward,
        "identity": WEB,
        "allow": allow,
        **extra,
    }


def outbound(name: str, connect: str, expect: str = WEB, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "listen": "127.0.0.1:0",
        "connect": connect,
        "identity": API,
        "expect": expect,
        **extra,
    }


class Mesh:
    """One trust domain (root + intermediate) whose identities are published as snapshots."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.root = ThrowawayCA.root()
        self.inter = self.root.intermediate()
        self.publisher = SnapshotPublisher()
        self.identities: dict[str, WorkloadIdentity] = {}
        self.revoked: set[str] = set()
        self.version = 0
        self.services: list[ProxyService] = []
        self.registry = CollectorRegistry()
        self.metrics = ProxyMetrics(self.registry)

    def issue(self, spiffe_id: str, **validity: float) -> WorkloadIdentity:
        """Issue (or renew) the identity for `spiffe_id` and publish a new snapshot."""
        ident = make_identity(self.inter, spiffe_id, f"entry-{spiffe_id}", **validity)
        self.identities[spiffe_id] = ident
        self.publish()
        return ident

    def revoke(self, serial: str) -> None:
        self.revoked.add(serial)
        self.publish()

    def publish(self) -> None:
        self.version += 1
        by_entry = {i.entry.id: i for i in self.identities.values()}
        self.publisher.publish(
            Snapshot.build(
                self.version, None, make_bundle(self.root), by_entry, frozenset(self.revoked)
            )
        )

    async def serve(
        self, *, native: NativeTls | Literal["auto"] | None = "auto", **document: Any
    ) -> ProxyService:
        """A proxy service with the listener sections `document`; `native=None` runs it
        on Python's TLS defaults (see sidecar/proxy/native_tls.py)."""
        service = ProxyService(parse(document, self.tmp_path), metrics=self.metrics, native=native)
        await service.start(self.publisher)
        self.services.append(service)
        return service

    async def close(self) -> None:
        for service in self.services:
            service.abort()
            await service.drain()

    async def settled(self) -> None:
        """Wait until every service has applied the latest snapshot."""
        await wait_for(
            lambda: all(s.tls.snapshot_version == self.version for s in self.services),
            what=f"snapshot {self.version} applied by every proxy service",
        )

    def ca_file(self) -> Path:
        path = self.tmp_path / "bundle.pem"
        path.write_bytes(self.root.cert_pem)
        return path

    def client_files(self, name: str, issued: Issued) -> tuple[Path, Path, Path]:
        """cert, key and chain files of `issued` for openssl."""
        cert, key = issued.write(self.tmp_path / "certs", name)
        chain = self.tmp_path / "certs" / f"{name}-chain.pem"
        chain.write_bytes(issued.chain_pem(include_self=False, include_root=False))
        return cert, key, chain

    def metric(self, name: str, **labels: str) -> float:
        value = self.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value


def port_of(service: ProxyService, name: str) -> int:
    bound = service.listeners[name].bound
    assert bound is not None
    return bound.port


# -- apps ---------------------------------------------------------------------------


@dataclass
class AppConnection:
    """What one connection to a test app carried."""

    proxy_header: dict[str, Any] | None = None
    received: bytearray = field(default_factory=bytearray)
    eof: bool = False
    closed: bool = False


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, AppConnection], Any]


class App:
    """A local TCP app on 127.0.0.1 run by `handler`, recording every connection."""

    def __init__(self, handler: Handler, *, proxy_protocol: bool = False) -> None:
        self.handler = handler
        self.proxy_protocol = proxy_protocol
        self.connections: list[AppConnection] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> App:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    @property
    def address(self) -> str:
        assert self.server is not None
        return f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = AppConnection()
        self.connections.append(conn)
        try:
            if self.proxy_protocol:
                conn.proxy_header = await read_proxy_v2(reader)
            await self.handler(reader, writer, conn)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            conn.closed = True
            writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()


async def echo(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: AppConnection
) -> None:
    """Echo every chunk; at EOF, end our direction too."""
    while data := await reader.read(65536):
        conn.received += data
        writer.write(data)
        await writer.drain()
    conn.eof = True
    writer.write_eof()


async def greet_app(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: AppConnection
) -> None:
    """A server that speaks first (like SMTP or MySQL), then echoes."""
    writer.write(b"hello\n")
    await writer.drain()
    await echo(reader, writer, conn)


async def ping_pong(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: AppConnection
) -> None:
    """Answer `ping` with `pong` and close (for openssl s_client)."""
    line = await reader.readline()
    conn.received += line
    if line.strip() == b"ping":
        writer.write(b"pong\n")
        await writer.drain()


async def http_whoami(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: AppConnection
) -> None:
    """A one-request HTTP/1.1 server answering who called it (from the PROXY header)."""
    head = await reader.readuntil(b"\r\n\r\n")
    conn.received += head
    caller = "unknown"
    if conn.proxy_header is not None:
        caller = conn.proxy_header["tlvs"].get(0xE0, b"").decode()
    body = f"hello {caller}\n".encode()
    writer.write(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    await writer.drain()


# -- PROXY protocol v2, parsed from the specification (independent of the encoder) ----


async def read_proxy_v2(reader: asyncio.StreamReader) -> dict[str, Any]:
    head = await reader.readexactly(16)
    assert head[:12] == b"\r\n\r\n\x00\r\nQUIT\n", head
    version_command, family, length = head[12], head[13], struct.unpack("!H", head[14:16])[0]
    assert version_command == 0x21, "version 2, command PROXY"
    body = await reader.readexactly(length)
    out: dict[str, Any] = {"family": family, "tlvs": {}}
    if family == 0x11:  # TCP over IPv4
        src, dst, sport, dport = struct.unpack("!4s4sHH", body[:12])
        out["source"] = (".".join(map(str, src)), sport)
        out["dest"] = (".".join(map(str, dst)), dport)
        rest = body[12:]
    else:
        rest = body
    while rest:
        kind, size = rest[0], struct.unpack("!H", rest[1:3])[0]
        out["tlvs"][kind] = rest[3 : 3 + size]
        rest = rest[3 + size :]
    return out


# -- outside peers -------------------------------------------------------------------


@dataclass
class SClientResult:
    returncode: int
    stdout: str
    stderr: str


async def s_client(
    port: int,
    ca_file: Path,
    *,
    cert: tuple[Path, Path, Path] | None = None,
    send: bytes = b"ping\n",
    extra: tuple[str, ...] = (),
    within: float = 10.0,
) -> SClientResult:
    """Run `openssl s_client` against 127.0.0.1:`port`, send `send`, read until closed."""
    args = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-CAfile", str(ca_file)]
    args += ["-quiet", "-verify_return_error", *extra]
    if cert is not None:
        args += ["-cert", str(cert[0]), "-key", str(cert[1]), "-cert_chain", str(cert[2])]
    proc = await asyncio.create_subprocess_exec(
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(send), within)
    assert proc.returncode is not None
    return SClientResult(proc.returncode, out.decode(errors="replace"), err.decode())


async def exchange(port: int, payload: bytes, *, within: float = 10.0) -> bytes:
    """Connect to 127.0.0.1:`port`, send `payload`, half-close, read until EOF."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(payload)
        writer.write_eof()
        return await asyncio.wait_for(reader.read(), within)
    finally:
        writer.close()


async def answer_or_reset(port: int, payload: bytes, *, within: float = 10.0) -> bytes | None:
    """Like `exchange`, but None when the connection was reset (a refused connection
    closed while our data was still unread is reset by the kernel)."""
    try:
        return await exchange(port, payload, within=within)
    except ConnectionResetError:
        return None


class LogRecords(logging.Handler):
    """Collects the records of the proxy's loggers for assertions."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def with_reason(self, reason: str) -> list[logging.LogRecord]:
        """The refusal (and audit) lines with this reason, not the access-log lines."""
        return [
            r
            for r in self.records
            if getattr(r, "reason", None) == reason and r.name != "sidecar.proxy.access"
        ]

    def access(self) -> list[logging.LogRecord]:
        return [r for r in self.records if r.name == "sidecar.proxy.access"]


async def eventually(predicate: Callable[[], bool], what: str, within: float = 10.0) -> None:
    await wait_for(predicate, within=within, what=what)


async def flood_until_stalled(
    sock: socket.socket, chunk: bytes, total: int, listener: Listener
) -> tuple[asyncio.Task[None], int]:
    """Send `total` bytes in `chunk`s on the non-blocking `sock` (then half-close) from a
    task, and poll until `listener` (one whose app stopped reading) reads nothing more:
    the task and how many bytes the listener read by then."""
    loop = asyncio.get_running_loop()

    async def push() -> None:
        sent = 0
        while sent < total:
            await loop.sock_sendall(sock, chunk)
            sent += len(chunk)
        sock.shutdown(socket.SHUT_WR)

    pusher = asyncio.create_task(push())
    previous = -1
    while True:  # until the pipeline is full and nothing moves
        await asyncio.sleep(0.3)
        read = listener.stats().bytes_upstream
        if read == previous:
            return pusher, read
        previous = read


def now() -> float:
    return time.time()
