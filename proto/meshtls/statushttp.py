"""A tiny asyncio HTTP/1.1 server for operational endpoints (/healthz, /readyz, /metrics,
/status), shared by the CA and the sidecar.

It answers GET and HEAD only, one request per connection (`Connection: close`), with
bounded request size and read time, so a stuck or hostile client cannot hold it. Handlers
are plain async callables from a `Request` to a `Response`; a handler that raises gets a
500 and a log line, never a crashed server. Bind it to loopback unless told otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlsplit

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 16 * 1024
READ_TIMEOUT_SECONDS = 5.0
LINGER_SECONDS = 1.0
LINGER_IDLE_SECONDS = 0.05
LINGER_MAX_BYTES = 1024 * 1024


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: Mapping[str, list[str]]
    headers: Mapping[str, str]


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = field(default=())

    @classmethod
    def text(cls, text: str, status: int = 200) -> Response:
        return cls(status, (text.rstrip("\n") + "\n").encode())

    @classmethod
    def json(cls, document: Any, status: int = 200) -> Response:
        body = json.dumps(document, indent=2, sort_keys=True).encode() + b"\n"
        return cls(status, body, "application/json")


Handler = Callable[[Request], Awaitable[Response]]


def metrics_handler(registry: Any) -> Handler:
    """A handler serving a prometheus_client CollectorRegistry in the text format."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    async def handle(_: Request) -> Response:
        return Response(200, generate_latest(registry), CONTENT_TYPE_LATEST)

    return handle


class StatusServer:
    """Serves `routes` (exact paths) on host:port; port 0 picks a free port."""

    def __init__(
        self, routes: Mapping[str, Handler], *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self._routes = dict(routes)
        self._host = host
        self._port = port
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[Any]] = set()

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port); only after `start()`."""
        if self._server is None:
            raise RuntimeError("the status server is not started")
        sockname = self._server.sockets[0].getsockname()
        return str(sockname[0]), int(sockname[1])

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._handle, self._host, self._port, limit=MAX_REQUEST_BYTES
        )
        log.info("status server listening", extra={"url": self.url})

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None

    async def __aenter__(self) -> StatusServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
        try:
            response, head_only = await self._respond(reader)
            await _send(writer, response, head_only)
            if response.status in {400, 408, 431}:
                await _linger(reader)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            if task is not None:
                self._connections.discard(task)

    async def _respond(self, reader: asyncio.StreamReader) -> tuple[Response, bool]:
        try:
            async with asyncio.timeout(READ_TIMEOUT_SECONDS):
                raw = await reader.readuntil(b"\r\n\r\n")
        except TimeoutError:
            return Response.text("request timeout", 408), False
        except asyncio.LimitOverrunError:
            return Response.text("request header too large", 431), False
        request = _parse(raw)
        if request is None:
            return Response.text("malformed request", 400), False
        head_only = request.method == "HEAD"
        if request.method not in {"GET", "HEAD"}:
            return Response(405, b"method not allowed\n", headers=(("Allow", "GET, HEAD"),)), False
        handler = self._routes.get(request.path)
        if handler is None:
            known = ", ".join(sorted(self._routes))
            return Response.text(f"not found; try one of: {known}", 404), head_only
        try:
            return await handler(request), head_only
        except Exception:
            log.exception("status handler failed", extra={"path": request.path})
            return Response.text("internal error; see the server log", 500), head_only


def _parse(raw: bytes) -> Request | None:
    try:
        text = raw.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes everything
        return None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        return None
    method, target, _ = parts
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            return None
        headers[name.strip().lower()] = value.strip()
    split = urlsplit(target)
    return Request(method, split.path or "/", parse_qs(split.query), headers)


async def _linger(reader: asyncio.StreamReader) -> None:
    """Read (and drop) what the client is still sending before closing, so that the kernel
    does not answer it with a reset that could destroy our error response in flight."""
    with contextlib.suppress(TimeoutError, ConnectionError):
        async with asyncio.timeout(LINGER_SECONDS):
            received = 0
            while received < LINGER_MAX_BYTES:
                async with asyncio.timeout(LINGER_IDLE_SECONDS):
                    chunk = await reader.read(65536)
                if not chunk:
                    return
                received += len(chunk)


async def _send(writer: asyncio.StreamWriter, response: Response, head_only: bool) -> None:
    try:
        reason = HTTPStatus(response.status).phrase
    except ValueError:
        reason = "Status"
    head = [
        f"HTTP/1.1 {response.status} {reason}",
        f"Content-Type: {response.content_type}",
        f"Content-Length: {len(response.body)}",
        "Cache-Control: no-store",
        "Connection: close",
        *(f"{k}: {v}" for k, v in response.headers),
    ]
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
    if not head_only:
        writer.write(response.body)
    await writer.drain()
