"""Domain objects to protobuf messages."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from ca_server.domain import Authority, CertificateRecord, Entry, Node
from ca_server.services.crl import CurrentCrl
from ca_server.services.trust import TrustSnapshot
from meshtls.v1 import admin_pb2, types_pb2

BUNDLE_REFRESH_HINT_SECONDS = 300


def ts(value: float | None) -> Timestamp | None:
    if value is None:
        return None
    stamp = Timestamp()
    stamp.FromNanoseconds(int(value * 1e9))
    return stamp


def bundle(trust_domain: str, snapshot: TrustSnapshot) -> types_pb2.TrustBundle:
    return types_pb2.TrustBundle(
        trust_domain=trust_domain,
        root_certificates=snapshot.roots_der,
        version=snapshot.version,
        refresh_hint_seconds=BUNDLE_REFRESH_HINT_SECONDS,
    )


def crl(current: CurrentCrl) -> types_pb2.Crl:
    return types_pb2.Crl(
        der=current.der,
        number=current.number,
        this_update=ts(current.this_update),
        next_update=ts(current.next_update),
    )


def entry(e: Entry) -> types_pb2.RegistrationEntry:
    return types_pb2.RegistrationEntry(
        id=e.id,
        spiffe_id=e.spiffe_id,
        node_name=e.node_name,
        dns_names=list(e.dns_names),
        ttl_seconds=e.ttl_seconds,
        selectors=list(e.selectors),
        created_at=ts(e.created_at),
    )


def certificate(
    r: CertificateRecord, now: float, issuer_fingerprint: str = "", with_pem: bool = False
) -> admin_pb2.CertificateRecord:
    return admin_pb2.CertificateRecord(
        serial=r.serial,
        spiffe_id=r.spiffe_id,
        node_name=r.node_name,
        kind=r.kind,
        entry_id=r.entry_id or "",
        fingerprint_sha256=r.fingerprint_sha256,
        not_before=ts(r.not_before),
        not_after=ts(r.not_after),
        status=r.status(now),
        revoked_at=ts(r.revoked_at),
        revocation_reason=r.revocation_reason or "",
        issuer_fingerprint_sha256=issuer_fingerprint,
        pem=r.pem if with_pem else "",
    )


def revoked(r: CertificateRecord) -> types_pb2.RevokedCertificate:
    return types_pb2.RevokedCertificate(
        serial=r.serial,
        revoked_at=ts(r.revoked_at),
        reason=r.revocation_reason or "",
        not_after=ts(r.not_after),
    )


def node(n: Node) -> admin_pb2.NodeRecord:
    return admin_pb2.NodeRecord(
        name=n.name,
        spiffe_id=n.spiffe_id,
        status=n.status,
        current_serial=n.current_serial or "",
        enrolled_at=ts(n.enrolled_at),
        last_seen_at=ts(n.last_seen_at),
        certificate_expires_at=ts(n.certificate_expires_at),
    )


def authority(a: Authority) -> admin_pb2.AuthorityRecord:
    return admin_pb2.AuthorityRecord(
        id=a.id,
        kind=a.kind,
        state=a.state,
        subject=a.subject,
        fingerprint_sha256=a.fingerprint_sha256,
        not_before=ts(a.not_before),
        not_after=ts(a.not_after),
        upstream=a.upstream,
        parent_id=a.parent_id or "",
    )
