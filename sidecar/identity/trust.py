"""Bootstrapping trust in the CA from a pinned root fingerprint (`ca.root_fingerprint`).

gRPC Python always verifies the server, so the one unverified call goes through a
loopback relay: gRPC speaks plain HTTP/2 to a socket on 127.0.0.1 and the relay carries
the bytes over TLS *without* verification to the enrollment listener. From that answer
only the root whose SHA-256 equals the pin is kept: the pin, not the connection,
authenticates it. The caller then fetches the bundle again over a connection verified
against that single root (see `IdentityManager`), so nothing an attacker on the first,
unverified connection could add to the bundle is ever trusted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl

import grpc
from cryptography import x509

from meshtls.identity.x509 import fingerprint_sha256
from meshtls.v1 import agent_pb2_grpc, types_pb2
from sidecar.errors import UntrustedBundle
from sidecar.fields import Address
from sidecar.identity.ca_errors import map_rpc_error
from sidecar.identity.ca_messages import bundle_from_proto
from sidecar.identity.model import TrustBundle

log = logging.getLogger(__name__)

_CHUNK = 65536


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(_CHUNK):
            writer.write(data)
            await writer.drain()
    except (OSError, ssl.SSLError):
        pass
    finally:
        writer.close()


class _UnverifiedRelay:
    """A loopback TCP listener forwarding each connection over unverified TLS."""

    def __init__(self, target: Address, server_name: str | None) -> None:
        self._target = target
        self._server_name = server_name or target.host
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[object]] = set()

    async def __aenter__(self) -> str:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"127.0.0.1:{port}"

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # deliberate: the pin authenticates the answer
        ctx.set_alpn_protocols(["h2"])
        try:
            up_reader, up_writer = await asyncio.open_connection(
                self._target.host, self._target.port, ssl=ctx, server_hostname=self._server_name
            )
        except (OSError, ssl.SSLError) as exc:
            log.warning(
                "cannot reach the CA enrollment listener to fetch its trust bundle",
                extra={"address": str(self._target), "error": str(exc)},
            )
            writer.close()
            return
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            if task is not None:
                self._tasks.discard(task)


async def fetch_unverified_bundle(
    address: Address, server_name: str | None, deadline_seconds: float
) -> TrustBundle:
    """GetTrustBundle from the enrollment listener WITHOUT verifying the server."""
    relay = _UnverifiedRelay(address, server_name)
    async with relay as target, grpc.aio.insecure_channel(target) as channel:
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        try:
            reply = await stub.GetTrustBundle(
                types_pb2.GetTrustBundleRequest(), timeout=deadline_seconds
            )
        except grpc.aio.AioRpcError as exc:
            raise map_rpc_error(exc, "bootstrap_trust", address) from None
    return bundle_from_proto(reply)


def pinned_root(bundle: TrustBundle, fingerprint: str, address: Address) -> x509.Certificate:
    """The root of `bundle` whose SHA-256 is `fingerprint`; UntrustedBundle if none."""
    for root in bundle.roots:
        if fingerprint_sha256(root) == fingerprint:
            return root
    served = ", ".join(fp[:16] + "..." for fp in bundle.fingerprints())
    raise UntrustedBundle(
        f"none of the roots served by the CA at {address} ({served}) has the pinned SHA-256 "
        f"{fingerprint}; check ca.root_fingerprint (or someone is intercepting the connection)",
        operation="bootstrap_trust",
    )


def require_root(bundle: TrustBundle, root: x509.Certificate, address: Address) -> TrustBundle:
    """Accept the verified bundle only if it still contains the pinned root."""
    pinned_root(bundle, fingerprint_sha256(root), address)
    return bundle
