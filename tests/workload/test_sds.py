"""Envoy SDS v3 of a real sidecar (real CA, real SidecarApp), driven by a grpcio client on
the stubs of PyPI `xds-protos`: resource names, the SotW ACK/NACK handshake, pushes on
rotation, FetchSecrets, and who may call."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc
import pytest
from cryptography import x509
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2  # type: ignore[import-untyped]
from envoy.service.discovery.v3 import discovery_pb2  # type: ignore[import-untyped]
from envoy.service.secret.v3 import sds_pb2_grpc  # type: ignore[import-untyped]
from google.rpc import status_pb2  # type: ignore[import-untyped]

from meshtls.clock import ManualClock
from meshtls.identity.pem import certs_from_pem
from sidecar.app import SidecarApp
from tests.sidecar.helpers import wait_for
from tests.workload.helpers import TTL, Env, me, serial_of, sidecar

pytestmark = pytest.mark.slow

TYPE_URL = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
ENVOY = "spiffe://example.org/envoy/front"
WEB = "spiffe://example.org/svc/web"
OTHER = "spiffe://example.org/svc/not-for-me"


def request(names: list[str], version: str = "", nonce: str = "", error: str = "") -> Any:
    req = discovery_pb2.DiscoveryRequest(
        resource_names=names, type_url=TYPE_URL, version_info=version, response_nonce=nonce
    )
    req.node.id = "test-envoy"
    if error:
        req.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
    return req


def secrets(response: Any) -> dict[str, Any]:
    out = {}
    for item in response.resources:
        secret = secret_pb2.Secret()
        assert item.Unpack(secret), item.type_url
        out[secret.name] = secret
    return out


def cert_serial(secret: Any) -> str:
    chain = certs_from_pem(secret.tls_certificate.certificate_chain.inline_bytes)
    return format(chain[0].serial_number, "x")


def roots_of(secret: Any) -> list[x509.Certificate]:
    return list(certs_from_pem(secret.validation_context.trusted_ca.inline_bytes))


async def read(call: Any) -> Any:
    """The next response of a StreamSecrets call (failing, not hanging, if none comes)."""
    return await asyncio.wait_for(call.read(), 10)


@asynccontextmanager
async def sds_stub(env: Env) -> AsyncIterator[Any]:
    async with grpc.aio.insecure_channel(f"unix://{env.sds_socket}") as channel:
        yield sds_pb2_grpc.SecretDiscoveryServiceStub(channel)


async def bundle_roots(env: Env) -> list[x509.Certificate]:
    bundle = await env.ca.bundle()
    return [x509.load_der_x509_certificate(r) for r in bundle.root_certificates]


async def started(env: Env, clock: ManualClock) -> Any:
    await env.entry(ENVOY, me())
    await env.entry(WEB, me())
    await env.entry(OTHER, "unix:uid:4242")
    return sidecar(env.config(), clock)


def signed(app: SidecarApp) -> bool:
    return all(serial_of(app, i) for i in (ENVOY, WEB, OTHER))


async def test_stream_secrets_follows_the_sotw_handshake_and_pushes_rotations(env: Env) -> None:
    clock = ManualClock()
    async with await started(env, clock) as app, sds_stub(env) as stub:
        await wait_for(lambda: signed(app), what="identities signed")
        call = stub.StreamSecrets()
        # The first request is answered at once, with exactly the names asked for.
        await call.write(request([ENVOY, "ROOTCA"]))
        first = await read(call)
        assert first.type_url == TYPE_URL
        assert first.version_info
        assert first.nonce
        got = secrets(first)
        assert set(got) == {ENVOY, "ROOTCA"}
        assert cert_serial(got[ENVOY]) == serial_of(app, ENVOY)
        assert roots_of(got["ROOTCA"]) == await bundle_roots(env)
        assert b"PRIVATE KEY" in got[ENVOY].tls_certificate.private_key.inline_bytes
        # ACK: no answer. A changed set of names: answered. Responses arrive in order, so
        # the next read proves that the ACK itself got none.
        await call.write(request([ENVOY, "ROOTCA"], first.version_info, first.nonce))
        names = [ENVOY, "ROOTCA", "default"]
        await call.write(request(names, first.version_info, first.nonce))
        second = await read(call)
        assert set(secrets(second)) == set(names)
        assert second.nonce != first.nonce
        assert second.version_info != first.version_info
        # A stale nonce is ignored (else the next push would carry only ROOTCA).
        await call.write(request(["ROOTCA"], first.version_info, first.nonce))
        await call.write(request(names, second.version_info, second.nonce))
        # A rotation is pushed without being asked for.
        old = serial_of(app, ENVOY)
        await clock.advance(TTL * 0.7)
        await wait_for(lambda: serial_of(app, ENVOY) != old, what="renewal")
        pushed = await read(call)
        assert set(secrets(pushed)) == set(names)
        assert cert_serial(secrets(pushed)[ENVOY]) == serial_of(app, ENVOY) != old
        assert pushed.version_info not in (first.version_info, second.version_info)
        # A NACK gets no re-send of the same version; the next change is answered.
        await call.write(request(names, second.version_info, pushed.nonce, error="bad key"))
        await call.write(request([WEB], second.version_info, pushed.nonce))
        after_nack = await read(call)
        assert set(secrets(after_nack)) == {WEB}
        call.cancel()


async def test_fetch_secrets_resolves_spire_resource_names(env: Env) -> None:
    async with await started(env, ManualClock()) as app, sds_stub(env) as stub:
        await wait_for(lambda: signed(app), what="identities signed")
        names = [
            "default",
            WEB,
            "ROOTCA",
            "ALL",
            "spiffe://example.org",
            OTHER,  # signed for this node, but for uid 4242
            "spiffe://other.org",
            "spiffe://example.org/nothing",
        ]
        response = await stub.FetchSecrets(request(names))
        got = secrets(response)
        assert set(got) == {"default", WEB, "ROOTCA", "ALL", "spiffe://example.org"}
        # The default identity is the first of the caller's, ordered by SPIFFE ID.
        assert cert_serial(got["default"]) == serial_of(app, min(ENVOY, WEB))
        assert cert_serial(got[WEB]) == serial_of(app, WEB)
        roots = await bundle_roots(env)
        for name in ("ROOTCA", "ALL", "spiffe://example.org"):
            assert roots_of(got[name]) == roots


async def test_sds_callers_without_an_identity_are_refused(env: Env) -> None:
    await env.entry(OTHER, "unix:uid:4242")
    async with sidecar(env.config(), ManualClock()) as app, sds_stub(env) as stub:
        await wait_for(lambda: serial_of(app, OTHER) is not None, what="identity signed")
        with pytest.raises(grpc.aio.AioRpcError) as fetched:
            await stub.FetchSecrets(request(["ROOTCA"]))
        assert fetched.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert f"uid {os.getuid()}" in (fetched.value.details() or "")
        call = stub.StreamSecrets()
        await call.write(request(["ROOTCA"]))
        with pytest.raises(grpc.aio.AioRpcError) as streamed:
            await read(call)
        assert streamed.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_a_request_for_another_type_is_invalid_argument(env: Env) -> None:
    async with await started(env, ManualClock()) as app, sds_stub(env) as stub:
        await wait_for(lambda: signed(app), what="identities signed")
        wrong = request(["ROOTCA"])
        wrong.type_url = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.FetchSecrets(wrong)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert TYPE_URL in (refused.value.details() or "")
