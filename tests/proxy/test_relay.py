"""Outbound -> inbound -> app on loopback: bytes arrive intact, half-close travels both
ways, back-pressure bounds what the proxy reads, an HTTP client (curl) reaches the app
and, with proxy_protocol, the app learns the caller's SPIFFE ID, and an outbound listener
refuses a server that is not the one expected."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import ssl
from dataclasses import dataclass

from sidecar.proxy.service import ProxyService
from tests.proxy.helpers import (
    API,
    OTHER,
    WEB,
    App,
    AppConnection,
    LogRecords,
    Mesh,
    answer_or_reset,
    echo,
    eventually,
    exchange,
    flood_until_stalled,
    http_whoami,
    inbound,
    outbound,
    port_of,
)


@dataclass
class Pair:
    app: App
    server: ProxyService
    client: ProxyService
    port: int  # the outbound listener


async def pair(
    mesh: Mesh,
    app: App,
    *,
    inbound_extra: dict[str, object] | None = None,
    outbound_extra: dict[str, object] | None = None,
    expect: str = WEB,
) -> Pair:
    mesh.issue(WEB)
    mesh.issue(API)
    await app.start()
    server = await mesh.serve(inbound=[inbound("web", app.address, [API], **(inbound_extra or {}))])
    client = await mesh.serve(
        outbound=[
            outbound(
                "to-web",
                f"127.0.0.1:{port_of(server, 'web')}",
                expect=expect,
                **(outbound_extra or {}),
            )
        ]
    )
    return Pair(app, server, client, port_of(client, "to-web"))


async def test_bytes_arrive_intact_both_ways(mesh: Mesh) -> None:
    p = await pair(mesh, App(echo))
    payload = os.urandom(3 * 1024 * 1024 + 17)
    assert await exchange(p.port, payload) == payload
    assert p.app.connections[0].eof
    assert mesh.metric("meshtls_proxy_bytes_total", listener="web", direction="upstream") == len(
        payload
    )


async def test_sessions_are_resumed_between_sidecars(mesh: Mesh) -> None:
    p = await pair(mesh, App(echo))
    for i in range(3):
        assert await exchange(p.port, b"x%d" % i) == b"x%d" % i
    assert mesh.metric("meshtls_proxy_handshakes_total", listener="web", result="accepted") == 3
    assert mesh.metric("meshtls_proxy_resumed_handshakes_total", listener="web") == 2


async def answer_after_eof(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: AppConnection
) -> None:
    conn.received += await reader.read()
    conn.eof = True
    writer.write(b"got %d bytes" % len(conn.received))
    await writer.drain()


async def test_client_half_close_reaches_the_app_and_the_answer_comes_back(mesh: Mesh) -> None:
    p = await pair(mesh, App(answer_after_eof))
    assert await exchange(p.port, b"a" * 1000) == b"got 1000 bytes"
    assert p.app.connections[0].eof


async def greet_then_listen(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: AppConnection
) -> None:
    writer.write(b"hello")
    writer.write_eof()  # the app is done talking, but still listens
    conn.received += await reader.read()
    conn.eof = True


async def test_app_half_close_reaches_the_client_which_can_still_send(mesh: Mesh) -> None:
    p = await pair(mesh, App(greet_then_listen))
    reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
    assert await asyncio.wait_for(reader.read(), 5) == b"hello"  # data, then EOF
    writer.write(b"late data")
    writer.write_eof()
    await eventually(lambda: bool(p.app.connections) and p.app.connections[0].eof, "app EOF")
    assert bytes(p.app.connections[0].received) == b"late data"
    writer.close()


async def test_back_pressure_bounds_what_the_proxy_reads(mesh: Mesh) -> None:
    release = asyncio.Event()

    async def slow_sink(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: AppConnection
    ) -> None:
        await release.wait()
        digest = hashlib.sha256()
        while data := await reader.read(1 << 20):
            digest.update(data)
            conn.received += b"."  # count reads, keep memory small
        writer.write(digest.hexdigest().encode())
        await writer.drain()

    p = await pair(mesh, App(slow_sink))
    total = 128 * 1024 * 1024
    chunk = os.urandom(1024 * 1024)
    sock = socket.create_connection(("127.0.0.1", p.port))
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    # Let the pipeline fill up: the proxy stops reading long before 128 MiB.
    pusher, read = await flood_until_stalled(sock, chunk, total, p.client.listeners["to-web"])
    assert not pusher.done()
    assert read < 48 * 1024 * 1024, f"the outbound listener read {read} bytes ahead of the app"
    release.set()
    await asyncio.wait_for(pusher, 60)
    answer = await asyncio.wait_for(loop.sock_recv(sock, 100), 60)
    sock.close()
    expected = hashlib.sha256(chunk * (total // len(chunk))).hexdigest().encode()
    assert answer == expected


async def test_curl_reaches_the_app_which_learns_the_caller(mesh: Mesh) -> None:
    p = await pair(
        mesh, App(http_whoami, proxy_protocol=True), inbound_extra={"proxy_protocol": True}
    )
    proc = await asyncio.create_subprocess_exec(
        "curl",
        "-sS",
        "--max-time",
        "10",
        f"http://127.0.0.1:{p.port}/hello",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err
    assert out == f"hello {API}\n".encode()
    header = p.app.connections[0].proxy_header
    assert header is not None
    assert header["source"][0] == "127.0.0.1"
    assert header["dest"] == ("127.0.0.1", port_of(p.server, "web"))
    ssl_tlv = header["tlvs"][0x20]
    assert ssl_tlv[0] & 0x01  # PP2_CLIENT_SSL
    assert b"TLSv1.3" in ssl_tlv


async def test_outbound_refuses_a_server_that_is_not_the_one_expected(
    mesh: Mesh, proxy_logs: LogRecords
) -> None:
    p = await pair(mesh, App(echo), expect=OTHER)
    assert await answer_or_reset(p.port, b"secret") in (b"", None)
    reason = "unexpected_identity"
    assert mesh.metric("meshtls_proxy_refused_total", listener="to-web", reason=reason) == 1
    (record,) = proxy_logs.with_reason(reason)
    assert f"expected {OTHER}, got {WEB}" in record.getMessage()
    assert all(not c.received for c in p.app.connections)


async def test_outbound_refuses_a_server_of_another_ca(mesh: Mesh) -> None:
    p = await pair(mesh, App(echo))
    stranger = Mesh(mesh.tmp_path / "stranger")
    (mesh.tmp_path / "stranger").mkdir()
    stranger.issue(WEB)
    other_server = await stranger.serve(inbound=[inbound("web", p.app.address, [API])])
    try:
        client = await mesh.serve(
            outbound=[outbound("to-stranger", f"127.0.0.1:{port_of(other_server, 'web')}")]
        )
        assert await answer_or_reset(port_of(client, "to-stranger"), b"secret") in (b"", None)
        assert (
            mesh.metric(
                "meshtls_proxy_refused_total", listener="to-stranger", reason="unknown_authority"
            )
            == 1
        )
    finally:
        await stranger.close()


async def test_tls_half_close_is_a_close_notify_and_the_other_direction_stays_open(
    mesh: Mesh,
) -> None:
    """An outside TLS client sees the app's EOF as close_notify (not a bare TCP FIN that
    could be a truncation attack), and can still send afterwards."""
    mesh.issue(WEB)
    app = await App(greet_then_listen).start()
    server = await mesh.serve(inbound=[inbound("web", app.address, [API])])
    leaf = mesh.inter.leaf(API)
    _, key, _ = mesh.client_files("api", leaf)
    full_chain = mesh.tmp_path / "api-full-chain.pem"
    full_chain.write_bytes(leaf.chain_pem(include_root=False))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata=mesh.root.cert_der)
    ctx.load_cert_chain(full_chain, key)

    def talk() -> bytes:
        raw = socket.create_connection(("127.0.0.1", port_of(server, "web")), timeout=5)
        with ctx.wrap_socket(raw, suppress_ragged_eofs=False) as tls:
            got = b""
            while chunk := tls.recv(100):  # SSLEOFError on a FIN without close_notify
                got += chunk
            tls.sendall(b"late data")
            tls.unwrap()  # our close_notify, answered by the proxy's
        return got

    assert await asyncio.to_thread(talk) == b"hello"
    await eventually(lambda: bool(app.connections) and app.connections[0].eof, "app EOF")
    assert bytes(app.connections[0].received) == b"late data"
