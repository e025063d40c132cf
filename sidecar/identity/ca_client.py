"""The sidecar's connection to the CA: two grpc.aio channels and typed results.

* The enrollment channel (server-authenticated TLS) verifies the CA against the bootstrap
  roots; it carries Enroll and GetTrustBundle.
* The agent channel (mutual TLS) presents the node certificate and verifies the CA against
  the current trust bundle. gRPC Python cannot swap a client certificate in place, so the
  channel is rebuilt whenever the node certificate or the bundle changes.

Every gRPC failure is mapped here to a `sidecar.errors.CAError` carrying the CA's message
and its `retry-after` hint; protobuf messages are converted to the sidecar's own value
objects, and nothing above this module touches gRPC.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from cryptography import x509

from meshtls.identity.ids import InvalidSpiffeId, SpiffeId
from meshtls.identity.pem import certs_to_pem
from meshtls.identity.x509 import CertificateError, normalize_serial
from meshtls.v1 import agent_pb2, agent_pb2_grpc, types_pb2
from sidecar.config import CAConfig
from sidecar.errors import (
    CAError,
    CAInvalidArgument,
    CAInvalidResponse,
    CAPermissionDenied,
    CARateLimited,
    CATLSFailed,
    CAUnauthenticated,
    CAUnavailable,
)
from sidecar.fields import Address
from sidecar.identity.model import Entry, Svid, TrustBundle

log = logging.getLogger(__name__)

# gRPC's own reconnect backoff grows to 120 s by default, which would delay recovery long
# after the CA is back; our Backoff decides when to retry, so keep gRPC's short. A local
# subchannel pool makes a rebuilt channel really start afresh.
CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.enable_retries", 0),
)

_ERRORS: dict[Any, type[CAError]] = {
    grpc.StatusCode.UNAVAILABLE: CAUnavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: CAUnavailable,
    grpc.StatusCode.UNAUTHENTICATED: CAUnauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: CAPermissionDenied,
    grpc.StatusCode.INVALID_ARGUMENT: CAInvalidArgument,
    grpc.StatusCode.RESOURCE_EXHAUSTED: CARateLimited,
}


@dataclass(frozen=True)
class KubernetesCredential:
    """What a sidecar on Kubernetes enrolls with instead of a join token."""

    token: str = field(repr=False)  # the projected service-account token
    node_name: str  # the node this sidecar runs on


@dataclass(frozen=True)
class EnrollResult:
    node_name: str
    spiffe_id: str
    chain: tuple[x509.Certificate, ...]
    bundle: TrustBundle


@dataclass(frozen=True)
class SignedCertificate:
    entry_id: str
    spiffe_id: str
    chain: tuple[x509.Certificate, ...]


@dataclass(frozen=True)
class TrustUpdate:
    """One message of the Watch stream (or one poll of GetTrustBundle + GetCrl while the
    stream is down): the bundle and the revoked serials (hex)."""

    version: int
    bundle: TrustBundle
    revoked: frozenset[str]


@dataclass(frozen=True)
class Revocations:
    """The revoked serials (hex) of the CA's CRL, and the trust-state version it was made
    from (its CRL number)."""

    version: int
    serials: frozenset[str]


def revocations_from_crl(msg: types_pb2.Crl) -> Revocations:
    """Read the serials of a DER CRL. Its signature is not checked: it came over the
    mutual-TLS channel that authenticated the CA, like the Watch stream's list."""
    try:
        crl = x509.load_der_x509_crl(bytes(msg.der))
    except ValueError as exc:
        raise CAInvalidResponse(f"the CA returned an unreadable CRL: {exc}") from None
    return Revocations(int(msg.number), frozenset(format(r.serial_number, "x") for r in crl))


def retry_after_of(metadata: object) -> float | None:
    """The `retry-after` trailer as seconds, or None when absent or unreadable."""
    if not metadata:
        return None
    try:
        items = list(metadata)  # type: ignore[call-overload]
    except TypeError:
        return None
    for item in items:
        try:
            key, value = item
        except (TypeError, ValueError):
            continue
        if str(key).lower() == "retry-after":
            text = value.decode() if isinstance(value, bytes) else str(value)
            try:
                seconds = float(text.strip())
            except ValueError:
                return None
            return seconds if seconds >= 0 else None
    return None


def _tls_hint(details: str) -> str | None:
    """What an operator should check for a handshake failure gRPC reports as UNAVAILABLE."""
    text = details.lower()
    if "certificate_verify_failed" in text or "unable to get local issuer" in text:
        return (
            "the CA's certificate does not verify against our trust bundle; check "
            "ca.trust_bundle (or ca.root_fingerprint)"
        )
    if "peer name" in text or "hostname" in text or "subject alternative" in text:
        return "the CA's certificate does not name the address we dialled; set ca.server_name"
    if "handshake" in text or "ssl_error" in text or "alert" in text:
        return "the TLS handshake was refused (an expired or unknown client certificate?)"
    return None


def map_rpc_error(exc: grpc.aio.AioRpcError, operation: str, address: Address) -> CAError:
    """Turn a gRPC failure into the sidecar's error type, keeping the CA's words."""
    code = exc.code()
    details = exc.details() or ""
    retry_after = retry_after_of(exc.trailing_metadata())
    cls = _ERRORS.get(code, CAError)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        message = f"the CA at {address} did not answer in time"
    elif code == grpc.StatusCode.UNAVAILABLE:
        message = f"cannot reach the CA at {address}: {details or 'unavailable'}"
        hint = _tls_hint(details)
        if hint:
            cls = CATLSFailed
            message = f"TLS with the CA at {address} failed: {hint} ({details})"
    else:
        message = details or f"the CA answered {code.name}"
    err = cls(message, operation=operation, retry_after=retry_after)
    if cls is CAError:
        err.reason = code.name.lower()
    return err


def chain_from_proto(msg: types_pb2.CertificateChain, what: str) -> tuple[x509.Certificate, ...]:
    if not msg.certificates:
        raise CAInvalidResponse(f"the CA returned an empty {what}")
    try:
        return tuple(x509.load_der_x509_certificate(bytes(b)) for b in msg.certificates)
    except ValueError as exc:
        raise CAInvalidResponse(f"the CA returned an unreadable {what}: {exc}") from None


def bundle_from_proto(msg: types_pb2.TrustBundle) -> TrustBundle:
    try:
        roots = tuple(x509.load_der_x509_certificate(bytes(b)) for b in msg.root_certificates)
    except ValueError as exc:
        raise CAInvalidResponse(f"the CA returned an unreadable trust bundle: {exc}") from None
    if not roots:
        raise CAInvalidResponse("the CA returned a trust bundle without roots")
    return TrustBundle(msg.trust_domain, roots, int(msg.version), int(msg.refresh_hint_seconds))


def _entry_from_proto(msg: types_pb2.RegistrationEntry) -> Entry:
    try:
        sid = SpiffeId.parse(msg.spiffe_id)
    except InvalidSpiffeId as exc:
        raise CAInvalidResponse(f"registration entry {msg.id!r}: {exc}") from None
    return Entry(msg.id, sid, tuple(msg.dns_names), int(msg.ttl_seconds), tuple(msg.selectors))


def _revoked_serials(items: Sequence[types_pb2.RevokedCertificate]) -> frozenset[str]:
    serials: set[str] = set()
    for item in items:
        try:
            serials.add(normalize_serial(item.serial))
        except CertificateError:
            log.warning("ignoring unreadable revoked serial", extra={"serial": item.serial[:80]})
    return frozenset(serials)


def _we_are_cancelled() -> bool:
    """gRPC aio raises CancelledError into a call whose channel was closed; tell that apart
    from the cancellation of our own task, which must propagate."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _channel_closed(operation: str) -> CAError:
    err = CAError("the connection to the CA was closed (credentials changed)", operation=operation)
    err.reason = "cancelled"
    return err


class CAClient:
    """Calls to the CA's AgentService. Create inside the event loop that will use it."""

    def __init__(self, ca: CAConfig) -> None:
        self._ca = ca
        self._timeout = ca.timeout_seconds
        self._enroll_roots: bytes | None = None
        self._enroll_channel: Any = None
        self._node_key: tuple[str, tuple[str, ...]] | None = None
        self._node_creds: tuple[bytes, bytes, bytes] | None = None  # roots, key, chain
        self._agent_channel: Any = None
        # Set once a unary call succeeded with the current node certificate. The Watch
        # stream waits for it, so that a renewed certificate is first presented by one
        # call only (the CA activates a renewed node certificate on its first use).
        self.credentials_confirmed = asyncio.Event()

    @property
    def has_node_credentials(self) -> bool:
        return self._node_creds is not None

    def _options(self) -> list[tuple[str, Any]]:
        options = list(CHANNEL_OPTIONS)
        if self._ca.server_name:
            options.append(("grpc.ssl_target_name_override", self._ca.server_name))
        return options

    async def set_enrollment_roots(self, roots: Sequence[x509.Certificate]) -> None:
        """Verify the enrollment listener against `roots` from now on."""
        pem = certs_to_pem(roots)
        if pem != self._enroll_roots:
            self._enroll_roots = pem
            await self._close_enroll()

    async def use_node(self, svid: Svid, bundle: TrustBundle) -> None:
        """Authenticate agent calls with `svid`, verifying the CA against `bundle`."""
        key = (svid.serial, bundle.fingerprints())
        previous = self._node_key
        if key == previous:
            return
        self._node_key = key
        self._node_creds = (bundle.pem(), svid.key_pem(), svid.chain_pem())
        if key[0] != (previous[0] if previous else None):
            self.credentials_confirmed.clear()
        await self._close_agent()

    async def forget_node(self) -> None:
        self._node_key = None
        self._node_creds = None
        self.credentials_confirmed.clear()
        await self._close_agent()

    async def reset_connections(self) -> None:
        """Drop both channels; the next call dials afresh (after an outage)."""
        await self._close_enroll()
        await self._close_agent()

    async def close(self) -> None:
        await self.reset_connections()

    async def _close_enroll(self) -> None:
        channel, self._enroll_channel = self._enroll_channel, None
        if channel is not None:
            await channel.close(None)

    async def _close_agent(self) -> None:
        channel, self._agent_channel = self._agent_channel, None
        if channel is not None:
            await channel.close(None)

    def _enroll_stub(self) -> Any:
        if self._enroll_roots is None:
            raise CAError("no trust roots for the enrollment listener yet", operation="enroll")
        if self._enroll_channel is None:
            creds = grpc.ssl_channel_credentials(root_certificates=self._enroll_roots)
            self._enroll_channel = grpc.aio.secure_channel(
                str(self._ca.enroll_address), creds, options=self._options()
            )
        return agent_pb2_grpc.AgentServiceStub(self._enroll_channel)

    def _agent_stub(self, operation: str) -> Any:
        if self._node_creds is None:
            raise CAUnauthenticated("this node has no certificate yet", operation=operation)
        if self._agent_channel is None:
            roots, key, chain = self._node_creds
            creds = grpc.ssl_channel_credentials(
                root_certificates=roots, private_key=key, certificate_chain=chain
            )
            self._agent_channel = grpc.aio.secure_channel(
                str(self._ca.address), creds, options=self._options()
            )
        return agent_pb2_grpc.AgentServiceStub(self._agent_channel)

    async def _agent_call(self, operation: str, method: Any, request: Any) -> Any:
        used = self._node_key
        reply = await self._call(operation, self._ca.address, method, request)
        if used == self._node_key:  # not confirmed by an answer to the previous credentials
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
            if _we_are_cancelled():
                raise
            raise _channel_closed(operation) from None

    # -- enrollment listener -------------------------------------------------------------

    async def enroll(self, credential: str | KubernetesCredential, csr: bytes) -> EnrollResult:
        """Enroll with a join token (a str) or a Kubernetes service-account token."""
        stub = self._enroll_stub()
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
        stub = self._enroll_stub()
        request = types_pb2.GetTrustBundleRequest()
        reply = await self._call(
            "get_trust_bundle", self._ca.enroll_address, stub.GetTrustBundle, request
        )
        return bundle_from_proto(reply)

    # -- agent listener ------------------------------------------------------------------

    async def renew_node(self, csr: bytes) -> tuple[tuple[x509.Certificate, ...], TrustBundle]:
        stub = self._agent_stub("renew_node")
        request = agent_pb2.RenewNodeRequest(csr=csr)
        reply = await self._agent_call("renew_node", stub.RenewNode, request)
        try:
            chain = chain_from_proto(reply.node_certificate, "node certificate")
            return chain, bundle_from_proto(reply.bundle)
        except CAInvalidResponse as exc:
            exc.operation = "renew_node"
            raise

    async def list_identities(self) -> tuple[Entry, ...]:
        stub = self._agent_stub("list_identities")
        request = agent_pb2.ListIdentitiesRequest()
        reply = await self._agent_call("list_identities", stub.ListIdentities, request)
        try:
            return tuple(_entry_from_proto(e) for e in reply.entries)
        except CAInvalidResponse as exc:
            exc.operation = "list_identities"
            raise

    async def sign_identities(
        self, csrs: Sequence[tuple[str, bytes]]
    ) -> tuple[list[SignedCertificate], TrustBundle | None]:
        """Sign one CSR per (entry id, CSR) in one call; the bundle when the CA sent one."""
        stub = self._agent_stub("sign_identities")
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
        stub = self._agent_stub("get_trust_bundle")
        request = types_pb2.GetTrustBundleRequest()
        reply = await self._agent_call("get_trust_bundle", stub.GetTrustBundle, request)
        return bundle_from_proto(reply)

    async def revocations(self) -> Revocations:
        """The CA's revocation list (GetCrl), for when the Watch stream is down."""
        stub = self._agent_stub("get_crl")
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
        stub = self._agent_stub("watch")
        call = stub.Watch(agent_pb2.WatchRequest(known_version=known_version))
        try:
            if on_open is not None:
                await call.wait_for_connection()
                on_open()
            async for snap in call:
                revoked = _revoked_serials(snap.revoked)
                yield TrustUpdate(int(snap.version), bundle_from_proto(snap.bundle), revoked)
        except grpc.aio.AioRpcError as exc:
            raise map_rpc_error(exc, "watch", self._ca.address) from None
        except asyncio.CancelledError:
            if _we_are_cancelled():
                raise
            raise _channel_closed("watch") from None
        finally:
            call.cancel()
