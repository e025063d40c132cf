"""Value objects the CA's layers pass to each other. The database layer converts its ORM
rows to and from these at its boundary; nothing above it ever sees a row."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

CertificateKind = Literal["node", "workload", "ca-server"]
NodeStatus = Literal["active", "banned"]
AuthorityKind = Literal["root", "intermediate"]
AuthorityState = Literal["prepared", "active", "retired"]


@dataclass(frozen=True)
class JoinToken:
    token_hash: str  # hex SHA-256 of the token; the token itself is never stored
    node_name: str
    created_at: float
    expires_at: float
    used_at: float | None = None


@dataclass(frozen=True)
class Node:
    name: str
    spiffe_id: str
    status: NodeStatus
    current_serial: str | None
    enrolled_at: float
    last_seen_at: float | None
    certificate_expires_at: float | None
    # A renewed node certificate the node has not used yet. Until it does, the current one
    # stays valid, so a renewal whose reply was lost cannot lock the node out.
    pending_serial: str | None = None


@dataclass(frozen=True)
class Entry:
    id: str
    spiffe_id: str
    node_name: str
    dns_names: tuple[str, ...]
    ttl_seconds: int
    selectors: tuple[str, ...]
    created_at: float


@dataclass(frozen=True)
class CertificateRecord:
    serial: str  # lower-case hex
    spiffe_id: str
    node_name: str
    kind: CertificateKind
    entry_id: str | None
    fingerprint_sha256: str
    not_before: float
    not_after: float
    pem: str
    issuer_id: str
    issued_at: float
    revoked_at: float | None = None
    revocation_reason: str | None = None

    def status(self, now: float) -> Literal["valid", "expired", "revoked"]:
        if self.revoked_at is not None:
            return "revoked"
        return "expired" if now >= self.not_after else "valid"


@dataclass(frozen=True)
class Authority:
    id: str
    kind: AuthorityKind
    state: AuthorityState
    parent_id: str | None
    cert_pem: str
    # AES-GCM ciphertext of the PKCS#8 private key under the KEK; None when the key is
    # not ours (the operator's root above an upstream intermediate).
    encrypted_key: bytes | None
    upstream: bool
    fingerprint_sha256: str
    subject: str
    not_before: float
    not_after: float
    created_at: float
    # PEM chain above this certificate up to (and including) the root, for upstream mode.
    chain_pem: str = ""


@dataclass(frozen=True)
class AuditEvent:
    at: float
    actor: str  # who did it: "admin:unix", "spiffe://td/meshtls/node/web-1", "system"
    action: str  # "certificate.issue", "token.create", "token.use", "entry.create", ...
    subject: str  # what it was done to: a serial, a node name, an entry id
    details: dict[str, Any] = field(default_factory=dict)
    id: int | None = None
