"""The TLS settings made through OpenSSL directly (sidecar/proxy/native_tls.py), seen by
outside peers: `openssl s_client` against an inbound listener and `openssl s_server` behind
an outbound listener. With the native helpers: AES-128-GCM first, X25519 then P-256 (only
ECDHE groups, only AEAD suites). Without them (Python's defaults): P-256 alone and
OpenSSL's suite order, and everything else works the same, resumption included. A
structure layout that does not match is refused, and `MESHTLS_NATIVE_TLS=off` turns the
helpers off."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Literal

import pytest

from sidecar.proxy.native_tls import NativeTls, NativeTlsError, load
from tests.proxy.helpers import (
    API,
    WEB,
    App,
    Mesh,
    echo,
    exchange,
    http_whoami,
    inbound,
    outbound,
    ping_pong,
    port_of,
    s_client,
)

NATIVE: dict[str, Literal["auto"] | None] = {"native": "auto", "python": None}
# What each kind negotiates with a client (or server) that offers OpenSSL's defaults.
EXPECTED = {
    "native": ("TLS_AES_128_GCM_SHA256", "X25519", "x25519:secp256r1"),
    "python": ("TLS_AES_256_GCM_SHA384", "prime256v1", "secp256r1"),
}


def test_native_helpers_load_here() -> None:
    # The rest of this file compares both kinds; make sure "native" is not silently off.
    assert load() is not None


@pytest.mark.parametrize("kind", sorted(NATIVE))
async def test_inbound_negotiates_ecdhe_and_aead_only(mesh: Mesh, kind: str) -> None:
    mesh.issue(WEB)
    app = await App(ping_pong).start()
    service = await mesh.serve(native=NATIVE[kind], inbound=[inbound("web", app.address, [API])])
    port = port_of(service, "web")
    client = mesh.client_files("api", mesh.inter.leaf(API))
    suite, group, _ = EXPECTED[kind]

    async def brief(*extra: str) -> tuple[bool, str]:
        result = await s_client(port, mesh.ca_file(), cert=client, extra=("-brief", *extra))
        return "pong" in result.stdout, result.stderr

    reached, report = await brief()
    assert reached, report
    assert f"Ciphersuite: {suite}" in report
    assert f"Server Temp Key: {'X25519' if group == 'X25519' else 'ECDH, ' + group}" in report
    reached, report = await brief("-groups", "P-256")
    assert reached, report
    assert "Server Temp Key: ECDH, prime256v1" in report, report
    for suite_offered in ("TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"):
        reached, report = await brief("-ciphersuites", suite_offered)
        assert reached, report
        assert f"Ciphersuite: {suite_offered}" in report, report
    for refused in (("-groups", "ffdhe2048"), ("-ciphersuites", "TLS_AES_128_CCM_SHA256")):
        reached, _ = await brief(*refused)
        assert not reached, refused
    assert (
        mesh.metric("meshtls_proxy_refused_total", listener="web", reason="no_shared_cipher") == 2
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@asynccontextmanager
async def s_server(mesh: Mesh) -> AsyncIterator[tuple[int, asyncio.subprocess.Process]]:
    """`openssl s_server` presenting WEB's certificate, requiring a client certificate."""
    cert, key, chain = mesh.client_files("web", mesh.inter.leaf(WEB))
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        *("openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-naccept", "1"),
        *("-cert", str(cert), "-key", str(key), "-cert_chain", str(chain)),
        *("-CAfile", str(mesh.ca_file()), "-Verify", "1"),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        while b"ACCEPT" not in await asyncio.wait_for(proc.stdout.readline(), 10):
            pass
        yield port, proc
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


@pytest.mark.parametrize("kind", sorted(NATIVE))
async def test_outbound_offers_ecdhe_groups_and_aead_suites_in_order(mesh: Mesh, kind: str) -> None:
    mesh.issue(API)
    suite, _, offered_groups = EXPECTED[kind]
    async with s_server(mesh) as (port, proc):
        service = await mesh.serve(
            native=NATIVE[kind], outbound=[outbound("to-web", f"127.0.0.1:{port}")]
        )
        _, writer = await asyncio.open_connection("127.0.0.1", port_of(service, "to-web"))
        writer.write(b"hello from the app\n")
        assert proc.stdout is not None
        report = b""
        while b"hello from the app" not in report:
            report += await asyncio.wait_for(proc.stdout.read(4096), 10)
        writer.close()
    text = report.decode()
    assert f"Supported groups: {offered_groups}\n" in text, text
    assert f"CIPHER is {suite}" in text, text
    shared = text.split("Shared ciphers:", 1)[1].split("\n", 1)[0].split(":")
    assert set(shared) == {
        "TLS_AES_128_GCM_SHA256",
        "TLS_CHACHA20_POLY1305_SHA256",
        "TLS_AES_256_GCM_SHA384",
    }


@pytest.mark.parametrize("kind", sorted(NATIVE))
async def test_sidecars_resume_and_report_the_suite(mesh: Mesh, kind: str) -> None:
    mesh.issue(WEB)
    mesh.issue(API)
    whoami = await App(http_whoami, proxy_protocol=True).start()
    server = await mesh.serve(
        native=NATIVE[kind],
        inbound=[inbound("web", whoami.address, [API], proxy_protocol=True)],
    )
    client = await mesh.serve(
        native=NATIVE[kind], outbound=[outbound("to-web", f"127.0.0.1:{port_of(server, 'web')}")]
    )
    port = port_of(client, "to-web")
    for _ in range(4):
        answer = await exchange(port, b"GET / HTTP/1.1\r\nHost: web\r\n\r\n")
        assert answer.endswith(f"hello {API}\n".encode()), answer
    # Every connection after the first resumed, each with the ticket of the one before.
    assert mesh.metric("meshtls_proxy_handshakes_total", listener="web", result="accepted") == 4
    assert mesh.metric("meshtls_proxy_resumed_handshakes_total", listener="web") == 3
    assert mesh.metric("meshtls_proxy_resumed_handshakes_total", listener="to-web") == 3
    tlv = whoami.connections[-1].proxy_header
    assert tlv is not None
    ssl_tlv = tlv["tlvs"][0x20]
    assert EXPECTED[kind][0].encode() in ssl_tlv


async def test_a_ticket_is_good_for_one_resumption_only(mesh: Mesh) -> None:
    """Servers keep stateful single-use tickets: two clients offering the same ticket
    cannot both resume (the second gets a full handshake, and still gets through)."""
    mesh.issue(WEB)
    mesh.issue(API)
    app = await App(echo).start()
    server = await mesh.serve(inbound=[inbound("web", app.address, [API])])
    client = await mesh.serve(outbound=[outbound("to-web", f"127.0.0.1:{port_of(server, 'web')}")])
    port = port_of(client, "to-web")
    assert await exchange(port, b"first") == b"first"
    listener = client.listeners["to-web"]
    tickets = listener.tickets  # type: ignore[attr-defined]
    assert len(tickets) == 1
    (ticket,) = tickets._tickets
    assert await exchange(port, b"second") == b"second"  # takes it and resumes
    tickets._tickets.append(ticket)  # offer the used ticket again
    assert await exchange(port, b"third") == b"third"
    assert mesh.metric("meshtls_proxy_handshakes_total", listener="web", result="accepted") == 3
    assert mesh.metric("meshtls_proxy_resumed_handshakes_total", listener="web") == 1


def test_a_layout_that_does_not_match_is_refused() -> None:
    # As if CPython put another field before the OpenSSL pointers: nothing is written.
    with pytest.raises(NativeTlsError):
        NativeTls(head=object.__basicsize__ + 8)
    native = NativeTls()
    with pytest.raises(NativeTlsError, match="not an SSL context"):
        native.context_pointer(b"")  # type: ignore[arg-type]


def test_the_environment_turns_the_helpers_off(tmp_path: Path) -> None:
    code = (
        "import logging; logging.basicConfig(level='INFO');"
        "from sidecar.proxy.native_tls import load; print(load())"
    )
    env = {**os.environ, "MESHTLS_NATIVE_TLS": "off"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert out.stdout.strip() == "None"
    assert "MESHTLS_NATIVE_TLS" in out.stderr
