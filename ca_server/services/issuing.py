"""Turn a CSR into a signed, profile-checked certificate and the row that records it."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

from cryptography import x509

from ca_server.authority.signer import Signer
from ca_server.db.store import Store
from ca_server.db.tx import Tx
from ca_server.domain import AuditEvent, CertificateKind, CertificateRecord
from ca_server.errors import InvalidRequest, PermissionDenied
from ca_server.services.writer import Refused
from meshtls.identity.ids import SpiffeId
from meshtls.identity.pem import der_to_pem
from meshtls.identity.x509 import CertificateError, SubjectPublicKey, load_csr


@dataclass(frozen=True)
class Issued:
    record: CertificateRecord
    der: bytes  # the leaf, as signed (also the source of the record's PEM and fingerprint)
    issuer_chain: tuple[x509.Certificate, ...]  # the signer's chain (no root)
    issuer_chain_der: tuple[bytes, ...]  # the same, encoded once per signer

    @property
    def chain_der(self) -> list[bytes]:
        return [self.der, *self.issuer_chain_der]

    @cached_property
    def cert(self) -> x509.Certificate:
        """The leaf, parsed (only for callers that need the object; replies use `der`)."""
        return x509.load_der_x509_certificate(self.der)

    @property
    def chain(self) -> tuple[x509.Certificate, ...]:
        """Leaf first, then the issuing chain (no root)."""
        return (self.cert, *self.issuer_chain)


@dataclass(frozen=True)
class RecordIssuance:
    """The rows of one issuing request, written by the group-commit writer together with
    those of every other request waiting at that moment. A request for a node that is
    banned by then is refused and writes nothing."""

    node_name: str
    records: tuple[CertificateRecord, ...]
    events: tuple[AuditEvent, ...]

    @classmethod
    def run_batch(cls, tx: Tx, items: list[RecordIssuance]) -> list[Refused | None]:
        banned = tx.banned_nodes(i.node_name for i in items if i.node_name)
        kept = [i for i in items if i.node_name not in banned]
        tx.add_certificates([r for i in kept for r in i.records])
        tx.add_audit_events([e for i in kept for e in i.events])
        return _answers(items, banned)

    @classmethod
    async def commit_batch(cls, store: Store, items: list[RecordIssuance]) -> list[Refused | None]:
        """`run_batch` as one atomic statement of its own (PostgreSQL): one round trip."""
        banned = await store.record_issuances([(i.node_name, i.records, i.events) for i in items])
        return _answers(items, banned)


def _answers(items: list[RecordIssuance], banned: set[str]) -> list[Refused | None]:
    return [
        Refused(PermissionDenied(f"node {i.node_name} is banned"))
        if i.node_name in banned
        else None
        for i in items
    ]


def csr_public_key(csr: bytes) -> SubjectPublicKey:
    """The checked public key of a CSR whose self-signature verifies: all the CA takes
    from a CSR (InvalidRequest otherwise)."""
    try:
        _, key = load_csr(csr)
    except CertificateError as exc:
        raise InvalidRequest(str(exc)) from None
    return key


def issue(
    signer: Signer,
    public_key: SubjectPublicKey,
    *,
    spiffe_id: SpiffeId,
    ttl_seconds: float,
    now: float,
    kind: CertificateKind,
    node_name: str,
    entry_id: str | None = None,
    dns_names: Sequence[str] = (),
    ip_addresses: Sequence[str] = (),
) -> Issued:
    """Sign for the identity the CA decided (a CSR contributes only its public key)."""
    leaf = signer.issue_der(
        public_key,
        spiffe_id,
        ttl_seconds=int(ttl_seconds),
        now=now,
        dns_names=tuple(dns_names),
        ip_addresses=tuple(ip_addresses),
    )
    der = leaf.der
    record = CertificateRecord(
        serial=format(leaf.serial, "x"),
        spiffe_id=str(spiffe_id),
        node_name=node_name,
        kind=kind,
        entry_id=entry_id,
        fingerprint_sha256=hashlib.sha256(der).hexdigest(),
        not_before=leaf.not_before,
        not_after=leaf.not_after,
        pem=der_to_pem(der),
        issuer_id=signer.authority_id,
        issued_at=now,
    )
    return Issued(record, der, tuple(signer.chain), signer.chain_der)
