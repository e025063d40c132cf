"""The sidecar's polling fallback: while its Watch stream cannot be established, it polls
GetTrustBundle and GetCrl, so a revocation still reaches it within `trust_poll_seconds`, and
it replaces its own revoked identity at once.

What breaks the stream is real: the sidecar's agent calls go through a gRPC proxy (real
TLS, a certificate from the CA under test) that forwards every unary call to the real CA
with the node's credentials but refuses streams, as some L7 proxies and gateways do."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from meshtls.identity.ids import SpiffeId
from meshtls.identity.pem import certs_to_pem
from sidecar.app import SidecarApp
from tests.sidecar.helpers import config_from, sidecar_document, wait_for
from tests.support.ca import RunningCA, running_ca

WATCH = "/meshtls.v1.AgentService/Watch"
POLL_SECONDS = 0.3
WEB = SpiffeId.parse("spiffe://example.org/svc/web")


class StreamlessProxy(grpc.GenericRpcHandler):  # type: ignore[misc]
    """Forwards unary AgentService calls to the CA as the sidecar's node; refuses Watch."""

    def __init__(self, ca: RunningCA, app: SidecarApp) -> None:
        self._ca = ca
        self._app = app
        self._channel: grpc.aio.Channel | None = None
        self._serial = ""
        self.refused_streams = 0
        self.forwarded: list[str] = []

    def _upstream(self) -> grpc.aio.Channel:
        node = self._app.manager.snapshot().node
        assert node is not None, "the node enrolls directly with the CA first"
        if self._channel is None or node.svid.serial != self._serial:
            creds = grpc.ssl_channel_credentials(
                root_certificates=self._ca.bundle_pem,
                private_key=node.svid.key_pem(),
                certificate_chain=node.svid.chain_pem(),
            )
            self._channel = grpc.aio.secure_channel(self._ca.agent_address, creds)
            self._serial = node.svid.serial
        return self._channel

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method: str = details.method
        if method == WATCH:

            async def refuse(request: bytes, context: grpc.aio.ServicerContext) -> None:
                self.refused_streams += 1
                await context.abort(grpc.StatusCode.UNAVAILABLE, "this proxy carries no streams")

            return grpc.unary_stream_rpc_method_handler(refuse)

        async def forward(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            self.forwarded.append(method.rsplit("/", 1)[1])
            try:
                reply: bytes = await self._upstream().unary_unary(method)(request, timeout=10)
            except grpc.aio.AioRpcError as exc:
                await context.abort(exc.code(), exc.details() or "")
            return reply

        return grpc.unary_unary_rpc_method_handler(forward)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()


def _server_credentials(ca: RunningCA) -> grpc.ServerCredentials:
    """A serving certificate for 127.0.0.1 from the CA under test (peers trust it)."""
    assert ca.server is not None
    assert ca.server.ctx is not None
    signer = ca.server.ctx.trust.keyring.signer
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = signer.issue(
        key.public_key(),
        SpiffeId.parse(f"spiffe://{ca.trust_domain}/test/proxy"),
        ttl_seconds=3600,
        now=time.time(),
        ip_addresses=("127.0.0.1",),
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return grpc.ssl_server_credentials([(key_pem, certs_to_pem([leaf, *signer.chain]))])


@asynccontextmanager
async def proxied_sidecar(
    tmp_path: Path, ca: RunningCA
) -> AsyncIterator[tuple[SidecarApp, StreamlessProxy]]:
    server = grpc.aio.server()
    port = server.add_secure_port("127.0.0.1:0", _server_credentials(ca))
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(ca.bundle_pem)
    token = tmp_path / "token"
    token.write_text(await ca.create_join_token("web-1"))
    renewal: dict[str, Any] = {
        "retry_initial_seconds": 0.2,
        "retry_max_seconds": 0.5,
        "refresh_seconds": 300,
        "trust_poll_seconds": POLL_SECONDS,
    }
    doc = sidecar_document(
        tmp_path,
        agent_address=f"127.0.0.1:{port}",
        enroll_address=ca.enroll_address,
        bundle_path=bundle,
        token_file=token,
        renewal=renewal,
    )
    app = SidecarApp(config_from(tmp_path, doc))
    proxy = StreamlessProxy(ca, app)
    server.add_generic_rpc_handlers((proxy,))
    await server.start()
    try:
        async with app:
            yield app, proxy
    finally:
        await server.stop(0)
        await proxy.close()


async def test_a_revocation_arrives_by_polling_while_watch_is_refused(tmp_path: Path) -> None:
    async with running_ca(tmp_path / "ca") as ca:
        await ca.create_entry("spiffe://example.org/svc/web", "web-1")
        async with proxied_sidecar(tmp_path, ca) as (app, proxy):
            await wait_for(lambda: app.manager.readiness()[0], within=15, what="identity")
            await wait_for(lambda: proxy.refused_streams >= 2, within=10, what="watch attempts")
            held = app.manager.snapshot().by_spiffe_id(WEB)
            assert held is not None
            serial = held.svid.serial

            await ca.revoke(serial)
            revoked_at = time.monotonic()
            await wait_for(
                lambda: serial in app.manager.snapshot().revoked,
                within=5,
                what="the revocation to reach the sidecar",
            )
            took = time.monotonic() - revoked_at
            assert took < 2.0, f"the revocation took {took:.2f}s"
            assert "GetCrl" in proxy.forwarded

            def replaced() -> bool:
                now = app.manager.snapshot().by_spiffe_id(WEB)
                return now is not None and now.svid.serial != serial

            await wait_for(replaced, within=5, what="the revoked identity to be replaced")
            assert proxy.refused_streams >= 2  # the stream never carried anything
