"""A real Envoy gets its certificate and validation context from a real sidecar over SDS,
terminates mutual TLS for a sample app, accepts a client holding a meshtls identity,
refuses clients without one, and follows a rotation without a restart.

The mixed-mesh cases (Envoy and the built-in proxy calling each other) are in
test_mixed_mesh.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from cryptography import x509

from meshtls.clock import ManualClock
from meshtls.identity.x509 import spiffe_id_of
from sidecar.app import SidecarApp
from tests.sidecar.helpers import wait_for
from tests.support.pki import ThrowawayCA
from tests.workload.envoy import RunningEnvoy, config, running_envoy
from tests.workload.helpers import TTL, Env, me, serial_of, sidecar

pytestmark = pytest.mark.slow

ENVOY = "spiffe://example.org/envoy/front"
CLIENT = "spiffe://example.org/svc/client"


@asynccontextmanager
async def echo_app() -> AsyncIterator[int]:
    """The sample app behind Envoy: echoes every chunk back, prefixed."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(4096):
            writer.write(b"app:" + data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


def client_context(
    bundle_pem: Path, cert: Path | None = None, key: Path | None = None
) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False  # SPIFFE IDs are URI SANs; the test checks the ID itself
    ctx.load_verify_locations(bundle_pem)
    if cert is not None:
        ctx.load_cert_chain(cert, key)
    return ctx


class Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @property
    def server_cert(self) -> x509.Certificate:
        der = self.writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        return x509.load_der_x509_certificate(der)

    async def exchange(self, data: bytes) -> bytes:
        self.writer.write(data)
        await self.writer.drain()
        return await asyncio.wait_for(self.reader.read(4096), 10)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await self.writer.wait_closed()


async def connect(envoy: RunningEnvoy, ctx: ssl.SSLContext) -> Conn:
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", envoy.port, ssl=ctx, server_hostname="envoy"), 10
    )
    return Conn(reader, writer)


async def refused(envoy: RunningEnvoy, ctx: ssl.SSLContext) -> str:
    """Try a connection and an exchange; the reason it failed ("" if it worked)."""
    try:
        conn = await connect(envoy, ctx)
    except (OSError, ssl.SSLError) as exc:
        return f"handshake: {exc}"
    try:
        reply = await conn.exchange(b"hello")
    except (OSError, ssl.SSLError) as exc:
        return f"after handshake: {exc}"
    finally:
        await conn.close()
    return "" if reply.startswith(b"app:") else f"no reply ({reply!r})"


def write_identity(app: SidecarApp, spiffe_id: str, directory: Path) -> tuple[Path, Path]:
    """A client certificate issued by the real CA (held by the sidecar), as PEM files."""
    ident = next(
        i for i in app.manager.snapshot().identities.values() if str(i.entry.spiffe_id) == spiffe_id
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "cert.pem", directory / "key.pem"
    cert.write_bytes(ident.svid.chain_pem())
    key.write_bytes(ident.svid.key_pem())
    return cert, key


async def test_envoy_terminates_mtls_with_sds_identities_across_a_rotation(env: Env) -> None:
    await env.entry(ENVOY, me())  # Envoy runs as this test's uid
    await env.entry(CLIENT, "unix:uid:4242")  # a workload elsewhere on the node
    clock = ManualClock()
    async with sidecar(env.config(), clock) as app, echo_app() as app_port:
        await wait_for(lambda: None not in (serial_of(app, CLIENT), serial_of(app, ENVOY)))
        document = config(
            sds_socket=env.sds_socket, identity=ENVOY, trust_domain="example.org", app_port=app_port
        )
        async with running_envoy(env.tmp_path / "envoy", document) as envoy:
            cert, key = write_identity(app, CLIENT, env.tmp_path / "client")
            good = client_context(env.bundle_path, cert, key)

            async def serves() -> bool:
                return await refused(envoy, good) == ""

            await wait_for(serves, within=30, what=f"envoy serving\n{envoy.log_tail()}")
            kept = await connect(envoy, good)
            assert await kept.exchange(b"ping") == b"app:ping"
            assert str(spiffe_id_of(kept.server_cert)) == ENVOY
            assert format(kept.server_cert.serial_number, "x") == serial_of(app, ENVOY)

            # No client certificate, or one from another CA: refused by Envoy.
            assert await refused(envoy, client_context(env.bundle_path)) != ""
            foreign = ThrowawayCA.root().leaf(CLIENT)
            foreign_dir = env.tmp_path / "foreign"
            foreign_cert, foreign_key = foreign.write(foreign_dir, "client")
            foreign_ctx = client_context(env.bundle_path, foreign_cert, foreign_key)
            assert await refused(envoy, foreign_ctx) != ""

            # Rotation: the sidecar renews Envoy's certificate and pushes it over SDS; a new
            # connection sees the new serial, the same Envoy process keeps running, and the
            # connection opened before the rotation still works.
            old = serial_of(app, ENVOY)
            await clock.advance(TTL * 0.7)
            await wait_for(lambda: serial_of(app, ENVOY) != old, what="renewal")
            new = serial_of(app, ENVOY)

            async def new_serial_served() -> bool:
                conn = await connect(envoy, good)
                try:
                    return format(conn.server_cert.serial_number, "x") == new
                finally:
                    await conn.close()

            await wait_for(new_serial_served, within=10, what="envoy serving the new serial")
            assert envoy.process.returncode is None
            assert await kept.exchange(b"still there") == b"app:still there"
            await kept.close()
