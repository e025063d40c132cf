"""The SPIFFE Workload API of a real sidecar (real CA, real SidecarApp) against real
clients: the PyPI `spiffe` WorkloadApiClient / X509Source, and raw grpcio calls."""

from __future__ import annotations

import asyncio
import os
import pwd
import subprocess
import time
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from spiffe.svid.x509_svid import X509Svid

from meshtls.clock import ManualClock
from meshtls.identity.pem import certs_to_pem
from sidecar.identity.keys import key_matches
from tests.sidecar.helpers import wait_for
from tests.workload import spiffe_clients as clients
from tests.workload.helpers import TTL, Env, me, serial_of, sidecar

pytestmark = pytest.mark.slow

WEB = "spiffe://example.org/svc/web"
DB = "spiffe://example.org/svc/db"
API = "spiffe://example.org/svc/api"


def openssl_verify(tmp: Path, chain: list[x509.Certificate], roots: list[x509.Certificate]) -> None:
    """`openssl verify` of chain[0] with chain[1:] as intermediates and `roots` as anchors."""
    (tmp / "leaf.pem").write_bytes(certs_to_pem(chain[:1]))
    (tmp / "inter.pem").write_bytes(certs_to_pem(chain[1:]))
    (tmp / "roots.pem").write_bytes(certs_to_pem(roots))
    done = subprocess.run(
        ["openssl", "verify", "-CAfile", "roots.pem", "-untrusted", "inter.pem", "leaf.pem"],
        cwd=tmp,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr


async def test_spiffe_client_fetches_its_svid_and_the_bundle(env: Env) -> None:
    await env.entry(WEB, me())
    await env.entry(DB, "unix:uid:4242")  # someone else's
    async with sidecar(env.config(), ManualClock()) as app:
        await wait_for(lambda: serial_of(app, DB) is not None, what="identities signed")
        svids = await asyncio.to_thread(clients.fetch_svids, env.workload_socket)
        assert [str(s.spiffe_id) for s in svids] == [WEB]
        svid = svids[0]
        assert format(svid.leaf.serial_number, "x") == serial_of(app, WEB)
        assert len(svid.cert_chain) >= 2, "the leaf comes with its intermediate"
        key = svid.private_key
        assert key_matches(key, svid.leaf)  # type: ignore[arg-type]
        roots = list((await env.ca.bundle()).root_certificates)
        root_certs = [x509.load_der_x509_certificate(r) for r in roots]
        openssl_verify(env.tmp_path, svid.cert_chain, root_certs)
        bundle = await asyncio.to_thread(
            clients.fetch_bundle_roots, env.workload_socket, "example.org"
        )
        assert bundle == set(roots)


async def test_rotation_reaches_an_open_x509_source_within_a_second(env: Env) -> None:
    await env.entry(WEB, me())
    clock = ManualClock()
    async with sidecar(env.config(), clock) as app:
        await wait_for(lambda: serial_of(app, WEB) is not None, what="identity signed")
        source = await asyncio.to_thread(clients.open_source, env.workload_socket)
        try:
            first = serial_of(app, WEB)
            assert format(clients.default_serial(source), "x") == first
            await clock.advance(TTL * 0.7)  # past the renewal point (half-life +-10 %)
            await wait_for(lambda: serial_of(app, WEB) != first, what="sidecar renewal")
            renewed_at = time.monotonic()
            new = serial_of(app, WEB)
            await wait_for(
                lambda: format(clients.default_serial(source), "x") == new,
                within=1.0,
                what="the new serial on the open stream",
            )
            assert time.monotonic() - renewed_at < 1.0
            assert not source.is_closed()
        finally:
            source.close()


async def test_calls_without_the_security_header_are_invalid_argument(env: Env) -> None:
    await env.entry(WEB, me())
    async with sidecar(env.config(), ManualClock()) as app:
        await wait_for(lambda: serial_of(app, WEB) is not None, what="identity signed")
        pb = clients.pb
        for method, request, reply in [
            ("FetchX509SVID", pb.X509SVIDRequest(), pb.X509SVIDResponse),
            ("FetchX509Bundles", pb.X509BundlesRequest(), pb.X509BundlesResponse),
            ("FetchJWTSVID", pb.JWTSVIDRequest(audience=["a"]), pb.JWTSVIDResponse),
        ]:
            code, details, got = await clients.raw_call(
                env.workload_socket, method, request, reply, header=False
            )
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (method, code)
            assert "workload.spiffe.io" in details
            assert not got
        code, _, got = await clients.raw_call(
            env.workload_socket, "FetchX509SVID", pb.X509SVIDRequest(), pb.X509SVIDResponse
        )
        assert code == grpc.StatusCode.OK
        assert [s.spiffe_id for s in got[0].svids] == [WEB]


async def test_jwt_methods_are_unimplemented(env: Env) -> None:
    await env.entry(WEB, me())
    async with sidecar(env.config(), ManualClock()) as app:
        await wait_for(lambda: serial_of(app, WEB) is not None, what="identity signed")
        pb = clients.pb
        for method, request, reply in [
            ("FetchJWTSVID", pb.JWTSVIDRequest(audience=["a"]), pb.JWTSVIDResponse),
            ("FetchJWTBundles", pb.JWTBundlesRequest(), pb.JWTBundlesResponse),
            (
                "ValidateJWTSVID",
                pb.ValidateJWTSVIDRequest(audience="a", svid="x.y.z"),
                pb.ValidateJWTSVIDResponse,
            ),
        ]:
            code, details, _ = await clients.raw_call(env.workload_socket, method, request, reply)
            assert code == grpc.StatusCode.UNIMPLEMENTED, (method, code)
            assert "JWT" in details


async def test_a_caller_no_entry_selects_is_permission_denied(env: Env) -> None:
    await env.entry(WEB, "unix:uid:4242")
    await env.entry(DB, me(), "unix:gid:4242")  # all selectors must match: gid does not
    async with sidecar(env.config(), ManualClock()) as app:
        await wait_for(lambda: serial_of(app, DB) is not None, what="identities signed")
        pb = clients.pb
        for method, request, reply in [
            ("FetchX509SVID", pb.X509SVIDRequest(), pb.X509SVIDResponse),
            ("FetchX509Bundles", pb.X509BundlesRequest(), pb.X509BundlesResponse),
        ]:
            code, details, got = await clients.raw_call(env.workload_socket, method, request, reply)
            assert code == grpc.StatusCode.PERMISSION_DENIED, (method, code)
            assert f"uid {os.getuid()}" in details
            assert f"--selector unix:uid:{os.getuid()}" in details
            assert not got


async def test_entries_without_selectors_are_served_only_when_allowed(env: Env) -> None:
    await env.entry(API)  # no selectors
    socket = env.workload_socket
    async with sidecar(env.config(), ManualClock()) as app:
        await wait_for(lambda: serial_of(app, API) is not None, what="identity signed")
        code, _, _ = await clients.raw_call(
            socket, "FetchX509SVID", clients.pb.X509SVIDRequest(), clients.pb.X509SVIDResponse
        )
        assert code == grpc.StatusCode.PERMISSION_DENIED
    allowing = env.config(
        workload_api={"socket": str(socket), "allow_entries_without_selectors": True}
    )
    async with sidecar(allowing, ManualClock()) as app:
        svids = await asyncio.to_thread(clients.fetch_svids, socket)
        assert [str(s.spiffe_id) for s in svids] == [API]


@pytest.mark.skipif(
    os.geteuid() != 0,
    reason="needs root: the test starts clients that drop to other uids/gids (setuid)",
)
async def test_processes_with_different_uids_get_different_identities(env: Env) -> None:
    await env.entry(WEB, "unix:uid:1000", "unix:gid:1000")
    await env.entry(DB, "unix:user:nobody")
    await env.entry(API, "unix:uid:4242")
    nobody = pwd.getpwnam("nobody")
    async with sidecar(env.config(), ManualClock()) as app:
        await wait_for(lambda: len(app.manager.snapshot().identities) == 3, what="3 identities")
        web, by_name, wrong_gid, stranger = await asyncio.gather(
            clients.fetch_as(env.workload_socket, 1000, 1000),
            clients.fetch_as(env.workload_socket, nobody.pw_uid, nobody.pw_gid),
            clients.fetch_as(env.workload_socket, 1000, 2000),
            clients.fetch_as(env.workload_socket, 5555, 5555),
        )
    assert (web["uid"], web.get("ids")) == (1000, [WEB])
    assert (by_name["uid"], by_name.get("ids")) == (nobody.pw_uid, [DB])
    assert wrong_gid["gid"] == 2000
    assert "PERMISSION_DENIED" in wrong_gid["error"], wrong_gid
    assert "PERMISSION_DENIED" in stranger["error"], stranger
    assert "uid 5555" in stranger["error"]


async def test_a_restart_ends_streams_with_unavailable_and_the_client_reconnects(
    env: Env,
) -> None:
    """CANCELLED would stop the spiffe client for good; UNAVAILABLE makes it retry."""
    await env.entry(WEB, me())
    config = env.config()
    async with sidecar(config, ManualClock()) as app:
        await wait_for(lambda: serial_of(app, WEB) is not None, what="identity signed")
        source = await asyncio.to_thread(clients.open_source, env.workload_socket)
        first = clients.default_serial(source)
    try:
        assert not env.workload_socket.exists(), "the socket is removed at stop"
        clock = ManualClock()
        async with sidecar(config, clock) as app:  # starts from the persisted state
            # The stored identity is served at once, selectors and all.
            svids = await asyncio.to_thread(clients.fetch_svids, env.workload_socket)
            assert [s.leaf.serial_number for s in svids] == [first]
            await clock.advance(TTL * 0.7)
            await wait_for(
                lambda: serial_of(app, WEB) not in (None, format(first, "x")),
                what="renewal after the restart",
            )
            new = serial_of(app, WEB)
            await wait_for(
                lambda: format(clients.default_serial(source), "x") == new,
                within=15,  # the client's reconnect backoff
                what="the client reconnected and saw the new serial",
            )
            assert not source.is_closed()
    finally:
        source.close()


async def test_a_stream_is_sent_only_the_changes_that_concern_its_caller(env: Env) -> None:
    """Another workload's new certificate is not news for this caller; its own is."""
    await env.entry(WEB, me())
    await env.entry(DB, "unix:uid:4242")
    clock = ManualClock()
    async with sidecar(env.config(), clock) as app:
        await wait_for(lambda: serial_of(app, DB) is not None, what="identities signed")
        async with grpc.aio.insecure_channel(clients.uri(env.workload_socket)) as channel:
            stream = channel.unary_stream(
                "/SpiffeWorkloadAPI/FetchX509SVID",
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=clients.pb.X509SVIDResponse.FromString,
            )(clients.pb.X509SVIDRequest(), metadata=clients.HEADER, timeout=30)
            first = await asyncio.wait_for(stream.read(), 10)
            db_serial = serial_of(app, DB)
            assert db_serial is not None
            await env.ca.revoke(db_serial)  # the sidecar replaces DB's certificate at once
            await wait_for(lambda: serial_of(app, DB) != db_serial, what="DB re-signed")
            web_serial = serial_of(app, WEB)
            await clock.advance(TTL * 0.7)
            await wait_for(lambda: serial_of(app, WEB) != web_serial, what="WEB renewed")
            second = await asyncio.wait_for(stream.read(), 10)
            svid = X509Svid.parse_raw(second.svids[0].x509_svid, second.svids[0].x509_svid_key)
            assert format(svid.leaf.serial_number, "x") == serial_of(app, WEB) != web_serial
            assert first.svids[0].x509_svid != second.svids[0].x509_svid
            stream.cancel()
