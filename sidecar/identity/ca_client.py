"""The sidecar's calls to the CA's AgentService, with typed results.

Enroll and GetTrustBundle go over the enrollment channel (server-authenticated TLS), the
other calls over the agent channel (mutual TLS with the node certificate); both are
managed by `ca_channels`. Every gRPC failure is mapped (`ca_errors`) to a
`sidecar.errors.CAError` carrying the CA's message and its `retry-after` hint; replies are
converted (`ca_messages`) to the sidecar's own value objects, and nothing above these
modules touches gRPC.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc
from cryptography import x509

from meshtls.v1 import agent_pb2, types_pb2
from sidecar.config import CAConfig
from sidecar.errors import CAInvalidResponse
from sidecar.fields import Address
from sidecar.identity.ca_channels import CAChannels
from sidecar.identity.ca_errors import channel_closed, map_rpc_error, we_are_cancelled
from sidecar.identity.ca_messages import (
    EnrollResult,
    KubernetesCredential,
    Revocations,
    SignedCertificate,
    TrustUpdate,
    bundle_from_proto,
    chain_from_proto,
    entry_from_proto,
    revocations_from_crl,
    revoked_serials,
)
from sidecar.identity.model import Entry, Svid, TrustBundle


class CAClient:
    """Calls to the CA's AgentService. Create inside the event loop that will use it."""

    def __init__(self, ca: CAConfig) -> None:
        self._ca = ca
        self._timeout = ca.timeout_seconds
        self._channels = CAChannels(ca)
        # Set once a unary call succeeded with the current node certificate. The Watch
        # stream waits for it, so that a renewed certificate is first presented by one
        # call only (the CA activates a renewed node certificate on its first use).
        self.credentials_confirmed = self._channels.credentials_confirmed

    @property
    def has_node_credentials(self) -> bool:
        return self._channels.has_node_credentials

    async def set_enrollment_roots(self, roots: Sequence[x509.Certificate]) -> None:
        """Verify the enrollment listener against `roots` from now on."""
        await self._channels.set_enrollment_roots(roots)

    async def use_node(self, svid: Svid, bundle: TrustBundle) -> None:
        """Authenticate agent calls with `svid`, verifying the CA against `bundle`."""
        await self._channels.use_node(svid, bundle)

    async def forget_node(self) -> None:
        await self._channels.forget_node()

    async def reset_connections(self) -> None:
        """Drop both channels; the next call dials afresh (after an outage)."""
        await self._channels.close()

    async def close(self) -> None:
        await self.reset_connections()

    async def _agent_call(self, operation: str, method: Any, request: Any) -> Any:
        used = self._channels.node_key
        reply = await self._call(operation, self._ca.address, method, request)
        # Not confirmed by an answer to the previous credentials:
        if used == self._channels.node_key:
            self.credentials_confirmed.set()
        return reply

    async def wait_confirmed(self) -> None:
        """Until a unary call has succeeded with the current node credentials."""
        while not self.credentials_confirmed.is_set():
            await self.credentials_confirmed.wait()

    async def _call(self, operation: str, address: Address, method: Any, request: Any) -> Any:
        try:
            return await method(request, timeout=self._timeout)
        except grpc.aio.AioRpcError as exc:
            raise map_rpc_error(exc, operation, address) from None
        except asyncio.CancelledError:
            if we_are_cancelled():
                raise
            raise channel_closed(operation) from None

    # -- enrollment listener -------------------------------------------------------------

    async def enroll(self, credential: str | KubernetesCredential, csr: bytes) -> EnrollResult:
        """Enroll with a join token (a str) or a Kubernetes service-account token."""
        stub = self._channels.enroll_stub()
        if isinstance(credential, KubernetesCredential):
            kubernetes = agent_pb2.KubernetesCredential(
                service_account_token=credential.token, node_name=credential.node_name
            )
            request = agent_pb2.EnrollRequest(kubernetes=kubernetes, csr=csr)
        else:
            request = agent_pb2.EnrollRequest(join_token=credential, csr=csr)
        reply = await self._call("enroll", self._ca.enroll_address, stub.Enroll, request)
        try:
            return EnrollResult(
                reply.node_name,
                reply.spiffe_id,
                chain_from_proto(reply.node_certificate, "node certificate"),
                bundle_from_proto(reply.bundle),
            )
        except CAInvalidResponse as exc:
            exc.operation = "enroll"
            raise

    async def enrollment_bundle(self) -> TrustBundle:
        """GetTrustBundle on the enrollment listener (verified against bootstrap roots)."""
        stub = self._channels.enroll_stub()
        request = types_pb2.GetTrustBundleRequest()
        reply = await self._call(
            "get_trust_bundle", self._ca.enroll_address, stub.GetTrustBundle, request
        )
        return bundle_from_proto(reply)

    # -- agent listener ------------------------------------------------------------------

    async def renew_node(self, csr: bytes) -> tuple[tuple[x509.Certificate, ...], TrustBundle]:
        stub = self._channels.agent_stub("renew_node")
        request = agent_pb2.RenewNodeRequest(csr=csr)
        reply = await self._agent_call("renew_node", stub.RenewNode, request)
        try:
            chain = chain_from_proto(reply.node_certificate, "node certificate")
            return chain, bundle_from_proto(reply.bundle)
        except CAInvalidResponse as exc:
            exc.operation = "renew_node"
            raise

    async def list_identities(self) -> tuple[Entry, ...]:
        stub = self._channels.agent_stub("list_identities")
        request = agent_pb2.ListIdentitiesRequest()
        reply = await self._agent_call("list_identities", stub.ListIdentities, request)
        try:
            return tuple(entry_from_proto(e) for e in reply.entries)
        except CAInvalidResponse as exc:
            exc.operation = "list_identities"
            raise

    async def sign_identities(
        self, csrs: Sequence[tuple[str, bytes]]
    ) -> tuple[list[SignedCertificate], TrustBundle | None]:
        """Sign one CSR per (entry id, CSR) in one call; the bundle when the CA sent one."""
        stub = self._channels.agent_stub("sign_identities")
        request = agent_pb2.SignIdentitiesRequest(
            requests=[agent_pb2.IdentityCsr(entry_id=eid, csr=csr) for eid, csr in csrs]
        )
        reply = await self._agent_call("sign_identities", stub.SignIdentities, request)
        try:
            signed = [
                SignedCertificate(
                    s.entry_id,
                    s.spiffe_id,
                    chain_from_proto(s.certificate, f"certificate for entry {s.entry_id}"),
                )
                for s in reply.identities
            ]
            bundle = bundle_from_proto(reply.bundle) if reply.HasField("bundle") else None
        except CAInvalidResponse as exc:
            exc.operation = "sign_identities"
            raise
        return signed, bundle

    async def trust_bundle(self) -> TrustBundle:
        stub = self._channels.agent_stub("get_trust_bundle")
        request = types_pb2.GetTrustBundleRequest()
        reply = await self._agent_call("get_trust_bundle", stub.GetTrustBundle, request)
        return bundle_from_proto(reply)

    async def revocations(self) -> Revocations:
        """The CA's revocation list (GetCrl), for when the Watch stream is down."""
        stub = self._channels.agent_stub("get_crl")
        reply = await self._agent_call("get_crl", stub.GetCrl, types_pb2.GetCrlRequest())
        try:
            return revocations_from_crl(reply)
        except CAInvalidResponse as exc:
            exc.operation = "get_crl"
            raise

    async def watch(
        self, known_version: int, on_open: Callable[[], None] | None = None
    ) -> AsyncIterator[TrustUpdate]:
        """Trust snapshots as the CA publishes them; ends with a CAError on failure.
        `on_open` runs once the stream is established (the request reached the CA), which
        may be long before its first message."""
        stub = self._channels.agent_stub("watch")
        call = stub.Watch(agent_pb2.WatchRequest(known_version=known_version))
        try:
            if on_open is not None:
                await call.wait_for_connection()
                on_open()
            async for snap in call:
                revoked = revoked_serials(snap.revoked)
                yield TrustUpdate(int(snap.version), bundle_from_proto(snap.bundle), revoked)
        except grpc.aio.AioRpcError as exc:
            raise map_rpc_error(exc, "watch", self._ca.address) from None
        except asyncio.CancelledError:
            if we_are_cancelled():
                raise
            raise channel_closed("watch") from None
        finally:
            call.cancel()
