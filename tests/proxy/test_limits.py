"""Timeouts and limits: handshake timeout, idle timeout (activity keeps a connection
open), max connection lifetime, the per-listener connection limit, and draining (stop
accepting, let open connections finish, close what is left at the drain timeout)."""

from __future__ import annotations

import asyncio
import time

from tests.proxy.helpers import (
    API,
    WEB,
    App,
    LogRecords,
    Mesh,
    answer_or_reset,
    echo,
    eventually,
    exchange,
    inbound,
    outbound,
    port_of,
)


async def echo_pair(
    mesh: Mesh, **inbound_extra: object
) -> tuple[App, int, int]:  # app, inbound port, outbound port
    mesh.issue(WEB)
    mesh.issue(API)
    app = await App(echo).start()
    server = await mesh.serve(inbound=[inbound("web", app.address, [API], **inbound_extra)])
    inbound_port = port_of(server, "web")
    client = await mesh.serve(outbound=[outbound("to-web", f"127.0.0.1:{inbound_port}")])
    return app, inbound_port, port_of(client, "to-web")


async def roundtrip(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes
) -> bytes:
    writer.write(data)
    return await asyncio.wait_for(reader.readexactly(len(data)), 5)


async def test_a_silent_client_is_cut_at_the_handshake_timeout(
    mesh: Mesh, proxy_logs: LogRecords
) -> None:
    _, inbound_port, _ = await echo_pair(mesh, handshake_timeout_seconds=0.2)
    reader, writer = await asyncio.open_connection("127.0.0.1", inbound_port)
    started = time.monotonic()
    assert await asyncio.wait_for(reader.read(), 5) == b""
    assert 0.15 < time.monotonic() - started < 3
    writer.close()
    assert mesh.metric("meshtls_proxy_refused_total", listener="web", reason="handshake_timeout")
    (record,) = proxy_logs.with_reason("handshake_timeout")
    assert "longer than 0.2s" in record.getMessage()


async def test_idle_connections_are_closed_and_busy_ones_are_not(
    mesh: Mesh, proxy_logs: LogRecords
) -> None:
    _, _, port = await echo_pair(mesh, idle_timeout_seconds=0.4)
    busy_r, busy_w = await asyncio.open_connection("127.0.0.1", port)
    idle_r, idle_w = await asyncio.open_connection("127.0.0.1", port)
    assert await roundtrip(idle_r, idle_w, b"hi") == b"hi"
    started = time.monotonic()
    # The busy connection talks every 0.1 s for 1.2 s: three idle timeouts long.
    while time.monotonic() - started < 1.2:
        assert await roundtrip(busy_r, busy_w, b"tick") == b"tick"
        await asyncio.sleep(0.1)
    assert idle_r.at_eof() or await asyncio.wait_for(idle_r.read(), 1) == b""
    assert await roundtrip(busy_r, busy_w, b"still here") == b"still here"
    for w in (busy_w, idle_w):
        w.close()
    results = [getattr(r, "result", "") for r in proxy_logs.access()]
    assert "idle_timeout" in results


async def test_connections_are_closed_at_their_max_lifetime(
    mesh: Mesh, proxy_logs: LogRecords
) -> None:
    _, _, port = await echo_pair(mesh, max_lifetime_seconds=0.3)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    with_data = 0
    try:
        while time.monotonic() - started < 5:
            await roundtrip(reader, writer, b"x")
            with_data += 1
            await asyncio.sleep(0.02)
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    assert with_data > 3
    assert time.monotonic() - started < 3
    await eventually(
        lambda: any(getattr(r, "result", "") == "max_lifetime" for r in proxy_logs.access()),
        "an access-log line with result max_lifetime",
    )
    writer.close()


async def test_the_connection_limit_refuses_extra_connections(
    mesh: Mesh, proxy_logs: LogRecords
) -> None:
    _, _, port = await echo_pair(mesh, max_connections=2)
    held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
    for r, w in held:
        assert await roundtrip(r, w, b"mine") == b"mine"
    assert await answer_or_reset(port, b"one too many") in (b"", None)
    assert mesh.metric("meshtls_proxy_refused_total", listener="web", reason="connection_limit")
    (record,) = proxy_logs.with_reason("connection_limit")
    assert "2 connections are open" in record.getMessage()
    held[0][1].close()
    await eventually(
        lambda: mesh.metric("meshtls_proxy_active_connections", listener="web") < 2,
        "a free slot",
    )
    assert await exchange(port, b"now it fits") == b"now it fits"
    held[1][1].close()


async def test_drain_stops_accepting_and_lets_open_connections_finish(mesh: Mesh) -> None:
    _, _, port = await echo_pair(mesh)
    client = mesh.services[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    assert await roundtrip(reader, writer, b"before") == b"before"
    draining = asyncio.create_task(client.drain())
    await eventually(lambda: not client.listeners["to-web"].accepting, "stop accepting")
    try:
        await asyncio.open_connection("127.0.0.1", port)
        raise AssertionError("a draining listener accepted a new connection")
    except ConnectionRefusedError:
        pass
    assert await roundtrip(reader, writer, b"during the drain") == b"during the drain"
    assert not draining.done()
    writer.write_eof()
    assert await asyncio.wait_for(reader.read(), 5) == b""
    await asyncio.wait_for(draining, 5)
    writer.close()


async def test_drain_closes_what_is_still_open_at_the_timeout(
    mesh: Mesh, proxy_logs: LogRecords
) -> None:
    mesh.issue(WEB)
    app = await App(echo).start()
    server = await mesh.serve(
        inbound=[inbound("web", app.address, [API], drain_timeout_seconds=0.3)]
    )
    mesh.issue(API)
    client = await mesh.serve(outbound=[outbound("to-web", f"127.0.0.1:{port_of(server, 'web')}")])
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(client, "to-web"))
    assert await roundtrip(reader, writer, b"hello") == b"hello"
    started = time.monotonic()
    await asyncio.wait_for(server.drain(), 5)
    assert 0.25 < time.monotonic() - started < 3
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    results = [getattr(r, "result", "") for r in proxy_logs.access()]
    assert "drain_timeout" in results
