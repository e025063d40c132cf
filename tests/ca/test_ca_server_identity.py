"""The CA renews its own TLS certificate in place: new handshakes get the new certificate,
connections opened before keep working, and nothing restarts."""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from pathlib import Path

from cryptography import x509

from meshtls.identity.x509 import serial_hex
from tests.support.ca import RunningCA, running_ca


def presented_serial(ca: RunningCA) -> str:
    """Serial of the certificate the enrollment listener presents to a new TLS client."""
    context = ssl.create_default_context(cadata=ca.bundle_pem.decode())
    context.check_hostname = False
    context.set_alpn_protocols(["h2"])
    host, port = ca.enroll_address.rsplit(":", 1)
    with (
        socket.create_connection((host, int(port)), timeout=5) as raw,
        context.wrap_socket(raw) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return serial_hex(x509.load_der_x509_certificate(der))


async def test_server_certificate_is_renewed_at_half_life_without_restart(tmp_path: Path) -> None:
    async with running_ca(tmp_path, server_cert_ttl=6.0) as ca:
        first = await asyncio.to_thread(presented_serial, ca)
        token_before = await ca.create_join_token("web-1")
        deadline = time.monotonic() + 20
        delay = 0.1
        current = first
        while current == first and time.monotonic() < deadline:
            await asyncio.sleep(delay)  # polling the real listener; the TTL is real time
            delay = min(delay * 2, 1.0)
            current = await asyncio.to_thread(presented_serial, ca)
        assert current != first, "the CA never presented a renewed certificate"
        assert ca.server is not None
        # Renewed at half-life (3 s), not in a loop: only a handful of certificates so far.
        assert ca.server.ctx is not None
        with ca.server.ctx.store.read() as tx:
            issued = tx.list_certificates(spiffe_id="spiffe://example.org/meshtls/ca", limit=100)
        assert 2 <= len(issued) <= 8
        # The admin socket and the CA keep serving; the new certificate is recorded.
        assert token_before != await ca.create_join_token("web-2")
        store = ca.server.ctx.store if ca.server.ctx else None
        assert store is not None
        with store.read() as tx:
            record = tx.get_certificate(current)
        assert record is not None
        assert record.kind == "ca-server"
