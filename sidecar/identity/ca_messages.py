"""What the sidecar sends to and receives from the CA, as its own value objects, and the
conversions from protobuf. A reply the sidecar cannot read (an empty or unparsable
chain, a bundle without roots, an invalid SPIFFE ID, an unreadable CRL) raises
`CAInvalidResponse`; nothing here touches a channel."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from cryptography import x509

from meshtls.identity.ids import InvalidSpiffeId, SpiffeId
from meshtls.identity.x509 import CertificateError, normalize_serial
from meshtls.v1 import types_pb2
from sidecar.errors import CAInvalidResponse
from sidecar.identity.model import Entry, TrustBundle

log = logging.getLogger(__name__)


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


def entry_from_proto(msg: types_pb2.RegistrationEntry) -> Entry:
    try:
        sid = SpiffeId.parse(msg.spiffe_id)
    except InvalidSpiffeId as exc:
        raise CAInvalidResponse(f"registration entry {msg.id!r}: {exc}") from None
    return Entry(msg.id, sid, tuple(msg.dns_names), int(msg.ttl_seconds), tuple(msg.selectors))


def revoked_serials(items: Sequence[types_pb2.RevokedCertificate]) -> frozenset[str]:
    """The serials (hex) of a Watch message's revocation list; unreadable ones are skipped."""
    serials: set[str] = set()
    for item in items:
        try:
            serials.add(normalize_serial(item.serial))
        except CertificateError:
            log.warning("ignoring unreadable revoked serial", extra={"serial": item.serial[:80]})
    return frozenset(serials)
