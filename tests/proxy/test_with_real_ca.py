"""The proxy inside real sidecars fed by a real CA: two `SidecarApp`s enrolled with the
CA carry an HTTP request (curl) from one to the other's app, which learns the caller's
SPIFFE ID; a certificate the CA revoked is refused by the inbound listener (the sidecar
learns the revocation from the CA's Watch stream) while the client sidecar, which got a
replacement, keeps working."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack
from pathlib import Path

from cryptography.hazmat.primitives.serialization import Encoding

from meshtls.identity.ids import SpiffeId
from tests.proxy.helpers import (
    API,
    WEB,
    App,
    http_whoami,
    inbound,
    outbound,
    s_client,
)
from tests.proxy.real import real_sidecar, sample
from tests.sidecar.helpers import wait_for
from tests.support.ca import running_ca


async def curl(port: int) -> str:
    proc = await asyncio.create_subprocess_exec(
        "curl",
        "-sS",
        "--max-time",
        "10",
        f"http://127.0.0.1:{port}/",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err
    return out.decode()


async def test_two_sidecars_carry_a_request_and_refuse_a_revoked_certificate(
    tmp_path: Path,
) -> None:
    async with running_ca(tmp_path / "ca-home") as ca, AsyncExitStack() as stack:
        await ca.create_entry(WEB, "web-1")
        await ca.create_entry(API, "api-1")
        whoami = await App(http_whoami, proxy_protocol=True).start()
        inbound_cfg = inbound("web", whoami.address, [API], proxy_protocol=True)
        web = await stack.enter_async_context(
            real_sidecar(tmp_path, ca, "web-1", inbound=[inbound_cfg])
        )
        web_bound = web.proxy.listeners["web"].bound
        assert web_bound is not None
        api = await stack.enter_async_context(
            real_sidecar(
                tmp_path,
                ca,
                "api-1",
                outbound=[outbound("to-web", f"127.0.0.1:{web_bound.port}")],
            )
        )
        out_bound = api.proxy.listeners["to-web"].bound
        assert out_bound is not None
        assert await curl(out_bound.port) == f"hello {API}\n"
        assert sample(web, "meshtls_proxy_handshakes_total", listener="web", result="accepted")

        # Keep the api identity's certificate, then have the CA revoke it.
        held = api.manager.snapshot().by_spiffe_id(SpiffeId.parse(API))
        assert held is not None
        old = held.svid
        certs = tmp_path / "revoked"
        certs.mkdir()
        (certs / "cert.pem").write_bytes(old.leaf.public_bytes(Encoding.PEM))
        (certs / "key.pem").write_bytes(old.key_pem())
        (certs / "chain.pem").write_bytes(
            b"".join(c.public_bytes(Encoding.PEM) for c in old.chain[1:])
        )
        await ca.revoke(old.serial)
        await wait_for(
            lambda: old.serial in web.manager.snapshot().revoked,
            within=10,
            what="the web sidecar to learn the revocation",
        )
        bundle = tmp_path / "ca-bundle.pem"
        bundle.write_bytes(ca.bundle_pem)
        result = await s_client(
            web_bound.port,
            bundle,
            cert=(certs / "cert.pem", certs / "key.pem", certs / "chain.pem"),
            send=b"GET / HTTP/1.1\r\nHost: web\r\n\r\n",
        )
        assert "hello" not in result.stdout
        assert sample(web, "meshtls_proxy_refused_total", listener="web", reason="revoked") == 1

        # The api sidecar replaced its revoked certificate: its requests still go through.
        def replaced() -> bool:
            now = api.manager.snapshot().by_spiffe_id(SpiffeId.parse(API))
            return now is not None and now.svid.serial != old.serial

        await wait_for(replaced, within=20, what="a replacement for the revoked certificate")
        await wait_for(
            lambda: api.proxy.tls.snapshot_version == api.manager.snapshot().version,
            what="the api proxy to use the replacement",
        )
        assert await curl(out_bound.port) == f"hello {API}\n"
        await whoami.stop()
