"""The shared status HTTP server: routing, methods, limits and failure handling, over real
loopback connections."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from prometheus_client import CollectorRegistry, Counter

from meshtls.statushttp import Request, Response, StatusServer, metrics_handler


async def raw(server: StatusServer, data: bytes) -> bytes:
    host, port = server.address
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(data)
    await writer.drain()
    answer = await reader.read()
    writer.close()
    await writer.wait_closed()
    return answer


def split(answer: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split(" ")[1]), {k.lower(): v for k, v in headers.items()}, body


@pytest.fixture
async def server() -> AsyncIterator[StatusServer]:
    registry = CollectorRegistry()
    Counter("demo_things", "Things", registry=registry).inc(3)
    seen: list[Request] = []

    async def hello(request: Request) -> Response:
        seen.append(request)
        return Response.json({"hello": request.query.get("name", ["world"])[0]})

    async def broken(_: Request) -> Response:
        raise RuntimeError("boom")

    routes = {"/hello": hello, "/broken": broken, "/metrics": metrics_handler(registry)}
    async with StatusServer(routes, host="127.0.0.1", port=0) as srv:
        yield srv


async def test_get_json_and_query(server: StatusServer) -> None:
    status, headers, body = split(await raw(server, b"GET /hello?name=ops HTTP/1.1\r\n\r\n"))
    assert status == 200
    assert headers["content-type"] == "application/json"
    assert headers["content-length"] == str(len(body))
    assert headers["connection"] == "close"
    assert body == b'{\n  "hello": "ops"\n}\n'


async def test_head_has_no_body(server: StatusServer) -> None:
    status, headers, body = split(await raw(server, b"HEAD /hello HTTP/1.1\r\n\r\n"))
    assert status == 200
    assert int(headers["content-length"]) > 0
    assert body == b""


async def test_metrics(server: StatusServer) -> None:
    status, headers, body = split(await raw(server, b"GET /metrics HTTP/1.0\r\n\r\n"))
    assert status == 200
    assert headers["content-type"].startswith("text/plain")
    assert b"demo_things_total 3.0" in body


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET /nowhere HTTP/1.1\r\n\r\n", 404),
        (b"POST /hello HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 405),
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET /hello HTTP/1.1\r\nno-colon-here\r\n\r\n", 400),
        (b"GET /broken HTTP/1.1\r\n\r\n", 500),
        (b"GET /hello HTTP/1.1\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n", 431),
    ],
)
async def test_errors(server: StatusServer, request_bytes: bytes, status: int) -> None:
    got, _, body = split(await raw(server, request_bytes))
    assert got == status
    assert b"boom" not in body  # internals stay in the log


async def test_stop_closes_the_port(server: StatusServer) -> None:
    host, port = server.address
    await server.stop()
    with pytest.raises(OSError, match=r"."):
        await asyncio.open_connection(host, port)
