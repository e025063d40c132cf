"""An inbound listener seen from outside by `openssl s_client`: a client with a valid
certificate of an allowed identity reaches the app; every other client is refused before
the app sees a connection, and each refusal is logged in plain words and counted under
its reason."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import pytest

from meshtls.identity.x509 import serial_hex
from sidecar.proxy.service import ProxyService
from tests.proxy.helpers import (
    API,
    OTHER,
    WEB,
    App,
    LogRecords,
    Mesh,
    inbound,
    ping_pong,
    port_of,
    s_client,
)
from tests.support.pki import Issued, ThrowawayCA


@dataclass
class Web:
    app: App
    service: ProxyService
    port: int


async def start_web(mesh: Mesh, **extra: object) -> Web:
    mesh.issue(WEB)
    app = await App(ping_pong).start()
    service = await mesh.serve(inbound=[inbound("web", app.address, allow=[API], **extra)])
    return Web(app, service, port_of(service, "web"))


async def test_allowed_client_reaches_the_app(mesh: Mesh, proxy_logs: LogRecords) -> None:
    web = await start_web(mesh)
    client = mesh.client_files("api", mesh.inter.leaf(API))
    result = await s_client(web.port, mesh.ca_file(), cert=client)
    assert "pong" in result.stdout, result.stderr
    assert len(web.app.connections) == 1
    assert mesh.metric("meshtls_proxy_handshakes_total", listener="web", result="accepted") == 1
    (line,) = [r for r in proxy_logs.access() if getattr(r, "direction", "") == "inbound"]
    assert line.peer_id == API  # type: ignore[attr-defined]
    assert line.result == "ok"  # type: ignore[attr-defined]
    assert line.bytes_upstream == len(b"ping\n")  # type: ignore[attr-defined]
    assert line.bytes_downstream == len(b"pong\n")  # type: ignore[attr-defined]


def _expired(mesh: Mesh) -> Issued:
    now = time.time()
    return mesh.inter.leaf(API, not_before=now - 7200, not_after=now - 60)


def _revoked(mesh: Mesh) -> Issued:
    leaf = mesh.inter.leaf(API)
    mesh.revoke(serial_hex(leaf.cert))
    return leaf


REFUSALS = {
    "no_client_certificate": (None, "presented no certificate"),
    "unknown_authority": (
        lambda mesh: ThrowawayCA.root().intermediate().leaf(API),
        "not issued by a CA of the current trust bundle",
    ),
    "expired_certificate": (_expired, "has expired"),
    "not_allowed": (lambda mesh: mesh.inter.leaf(OTHER), f"{OTHER} is not in the allow-list"),
    "revoked": (_revoked, "is revoked"),
}


@pytest.mark.parametrize("reason", sorted(REFUSALS))
async def test_refused_clients_never_reach_the_app(
    mesh: Mesh, proxy_logs: LogRecords, reason: str
) -> None:
    web = await start_web(mesh)
    make, words = REFUSALS[reason]
    cert = None if make is None else mesh.client_files("client", make(mesh))
    result = await s_client(web.port, mesh.ca_file(), cert=cert)
    assert "pong" not in result.stdout
    assert mesh.metric("meshtls_proxy_refused_total", listener="web", reason=reason) == 1
    assert mesh.metric("meshtls_proxy_handshakes_total", listener="web", result="refused") == 1
    (record,) = proxy_logs.with_reason(reason)
    assert words in record.getMessage()
    assert record.getMessage().startswith("inbound listener web refused 127.0.0.1:")
    await asyncio.sleep(0)
    assert web.app.connections == []
    (line,) = proxy_logs.access()
    assert line.result == "refused"  # type: ignore[attr-defined]
    assert line.reason == reason  # type: ignore[attr-defined]


async def test_a_whole_trust_domain_can_be_allowed(mesh: Mesh) -> None:
    mesh.issue(WEB)
    app = await App(ping_pong).start()
    service = await mesh.serve(
        inbound=[inbound("web", app.address, allow=["spiffe://example.org"])]
    )
    client = mesh.client_files("other", mesh.inter.leaf(OTHER))
    result = await s_client(port_of(service, "web"), mesh.ca_file(), cert=client)
    assert "pong" in result.stdout, result.stderr


async def test_audit_mode_lets_denied_peers_through_but_counts_them(
    mesh: Mesh, proxy_logs: LogRecords
) -> None:
    web = await start_web(mesh, audit=True)
    client = mesh.client_files("other", mesh.inter.leaf(OTHER))
    result = await s_client(web.port, mesh.ca_file(), cert=client)
    assert "pong" in result.stdout, result.stderr
    assert (
        mesh.metric("meshtls_proxy_audit_denied_total", listener="web", reason="not_allowed") == 1
    )
    assert mesh.metric("meshtls_proxy_handshakes_total", listener="web", result="audited") == 1
    assert mesh.metric("meshtls_proxy_refused_total", listener="web", reason="not_allowed") == 0
    (record,) = proxy_logs.with_reason("not_allowed")
    assert "audit mode" in record.getMessage()


async def test_plaintext_to_the_tls_port_is_refused(mesh: Mesh, proxy_logs: LogRecords) -> None:
    web = await start_web(mesh)
    reader, writer = await asyncio.open_connection("127.0.0.1", web.port)
    writer.write(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n")
    assert b"pong" not in await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert mesh.metric("meshtls_proxy_refused_total", listener="web", reason="not_tls") == 1
    assert web.app.connections == []


async def test_tls_below_the_minimum_is_refused(mesh: Mesh, proxy_logs: LogRecords) -> None:
    web = await start_web(mesh)
    client = mesh.client_files("api", mesh.inter.leaf(API))
    result = await s_client(web.port, mesh.ca_file(), cert=client, extra=("-tls1_2",))
    assert "pong" not in result.stdout
    assert mesh.metric("meshtls_proxy_refused_total", listener="web", reason="tls_version") == 1


async def test_tls_1_2_when_allowed_takes_ecdhe_with_aead_only(mesh: Mesh) -> None:
    web = await start_web(mesh, min_tls_version="1.2")
    client = mesh.client_files("api", mesh.inter.leaf(API))
    for suite in ("ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-CHACHA20-POLY1305"):
        result = await s_client(
            web.port, mesh.ca_file(), cert=client, extra=("-tls1_2", "-cipher", suite)
        )
        assert "pong" in result.stdout, (suite, result.stderr)
    cbc = ("ECDHE-ECDSA-AES128-SHA", "ECDHE-ECDSA-AES128-SHA256", "ECDHE-ECDSA-AES256-SHA384")
    for suite in cbc:
        weak = await s_client(
            web.port, mesh.ca_file(), cert=client, extra=("-tls1_2", "-cipher", suite)
        )
        assert "pong" not in weak.stdout, suite
    refused = mesh.metric("meshtls_proxy_refused_total", listener="web", reason="no_shared_cipher")
    assert refused == len(cbc)
