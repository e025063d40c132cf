"""Identity and bundle changes apply to new connections at once and leave open ones alone;
a snapshot whose material cannot be loaded leaves the last good context serving; an
identity that is no longer held refuses new connections; pooled upstream connections
are replaced when the identity rotates."""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

from cryptography import x509

from meshtls.identity.x509 import serial_hex
from sidecar.identity.keys import new_private_key
from sidecar.identity.model import Svid, WorkloadIdentity
from sidecar.proxy.service import ProxyService
from tests.proxy.helpers import (
    API,
    WEB,
    App,
    Handler,
    LogRecords,
    Mesh,
    answer_or_reset,
    echo,
    eventually,
    exchange,
    greet_app,
    inbound,
    outbound,
    ping_pong,
    port_of,
    s_client,
)
from tests.sidecar.helpers import make_svid
from tests.support.pki import ThrowawayCA


async def server_serial(port: int, mesh: Mesh) -> str:
    """The serial of the certificate the listener on `port` presents now."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata=mesh.root.cert_der)
    leaf = mesh.inter.leaf(API)
    cert, key, _ = mesh.client_files("probe", leaf)
    ctx.load_cert_chain(cert, key)
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
    sslobj = writer.get_extra_info("ssl_object")
    der = sslobj.getpeercert(binary_form=True)
    writer.close()
    return serial_hex(x509.load_der_x509_certificate(der))


async def web_and_client(
    mesh: Mesh, handler: Handler = echo, **outbound_extra: Any
) -> tuple[ProxyService, int, int]:
    mesh.issue(WEB)
    mesh.issue(API)
    app = await App(handler).start()
    server = await mesh.serve(inbound=[inbound("web", app.address, [API])])
    client = await mesh.serve(
        outbound=[outbound("to-web", f"127.0.0.1:{port_of(server, 'web')}", **outbound_extra)]
    )
    return server, port_of(server, "web"), port_of(client, "to-web")


async def test_rotation_reaches_new_connections_and_spares_open_ones(mesh: Mesh) -> None:
    _, web_port, port = await web_and_client(mesh)
    first = mesh.identities[WEB].svid.serial
    assert await server_serial(web_port, mesh) == first
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"open before")
    assert await reader.readexactly(11) == b"open before"
    second = mesh.issue(WEB).svid.serial
    mesh.issue(API)
    await mesh.settled()
    assert await server_serial(web_port, mesh) == second
    assert await exchange(port, b"new connection") == b"new connection"
    writer.write(b"still open after")
    assert await reader.readexactly(16) == b"still open after"
    writer.close()


async def test_a_new_bundle_applies_to_the_next_handshake(mesh: Mesh) -> None:
    _, web_port, _ = await web_and_client(mesh, ping_pong)
    old_client = mesh.client_files("old", mesh.inter.leaf(API))
    # The trust domain moves to a new root; the old one leaves the bundle.
    mesh.root = ThrowawayCA.root()
    mesh.inter = mesh.root.intermediate()
    mesh.issue(WEB)
    await mesh.settled()
    refused = await s_client(web_port, mesh.ca_file(), cert=old_client)
    assert "pong" not in refused.stdout
    assert mesh.metric("meshtls_proxy_refused_total", listener="web", reason="unknown_authority")
    new_client = mesh.client_files("new", mesh.inter.leaf(API))
    result = await s_client(web_port, mesh.ca_file(), cert=new_client)
    assert "pong" in result.stdout, result.stderr


async def test_material_that_cannot_be_loaded_keeps_the_last_good_context(
    mesh: Mesh, proxy_logs: LogRecords
) -> None:
    _, web_port, port = await web_and_client(mesh)
    good = mesh.identities[WEB]
    # A new certificate with a key that does not match it: OpenSSL refuses to load it.
    renewed = make_svid(mesh.inter, WEB)
    broken = Svid(renewed.spiffe_id, renewed.chain, new_private_key())
    mesh.identities[WEB] = WorkloadIdentity(good.entry, broken, good.issued_at, good.renew_at)
    mesh.publish()
    await eventually(
        lambda: any("keeping the previous one" in r.getMessage() for r in proxy_logs.records),
        "the context build failure to be logged",
    )
    assert await server_serial(web_port, mesh) == good.svid.serial
    assert await exchange(port, b"still served") == b"still served"


async def test_an_identity_no_longer_held_refuses_new_connections(
    mesh: Mesh, proxy_logs: LogRecords
) -> None:
    _, _, port = await web_and_client(mesh)
    del mesh.identities[WEB]
    mesh.publish()
    await mesh.settled()
    assert await answer_or_reset(port, b"hello") in (b"", None)
    assert proxy_logs.with_reason("no_identity")
    assert mesh.metric("meshtls_proxy_refused_total", listener="web", reason="no_identity") == 1


async def test_pooled_connections_are_ready_and_follow_rotation(mesh: Mesh) -> None:
    _, _, port = await web_and_client(mesh, pool_size=2)
    await eventually(
        lambda: mesh.metric("meshtls_proxy_pooled_connections", listener="to-web") == 2,
        "two pooled connections",
    )
    handshakes = mesh.metric("meshtls_proxy_handshakes_total", listener="to-web", result="accepted")
    assert await exchange(port, b"via the pool") == b"via the pool"
    assert await exchange(port, b"and again") == b"and again"
    # Both connections were taken from the pool: every handshake had happened before.
    await eventually(
        lambda: mesh.metric("meshtls_proxy_pooled_connections", listener="to-web") == 2,
        "the pool refilled",
    )
    assert (
        mesh.metric("meshtls_proxy_handshakes_total", listener="to-web", result="accepted")
        == handshakes + 2
    )
    # Rotation: pooled connections made with the old identity are replaced.
    old_serial = mesh.identities[API].svid.serial
    new_serial = mesh.issue(API).svid.serial
    assert new_serial != old_serial
    await eventually(
        lambda: (
            mesh.metric("meshtls_proxy_handshakes_total", listener="to-web", result="accepted")
            >= handshakes + 4
        ),
        "the pool to be refilled with the new identity",
    )
    assert await exchange(port, b"after rotation") == b"after rotation"


async def test_a_server_that_speaks_first_reaches_the_client_through_the_pool(
    mesh: Mesh,
) -> None:
    mesh.issue(WEB)
    mesh.issue(API)
    app = await App(greet_app).start()
    server = await mesh.serve(inbound=[inbound("web", app.address, [API])])
    client = await mesh.serve(
        outbound=[outbound("to-web", f"127.0.0.1:{port_of(server, 'web')}", pool_size=1)]
    )
    await eventually(
        lambda: mesh.metric("meshtls_proxy_pooled_connections", listener="to-web") == 1,
        "a pooled connection",
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(client, "to-web"))
    assert await asyncio.wait_for(reader.readexactly(6), 5) == b"hello\n"
    writer.close()
