"""`Tx`: the one object through which the CA reads and writes its database. It composes
one part per aggregate (tokens, nodes, entries, certificates, authorities, audit, trust
state); every method takes and returns `ca_server.domain` dataclasses, never rows."""

from __future__ import annotations

from ca_server.db.audit import AuditOps
from ca_server.db.authorities import AuthorityOps
from ca_server.db.certificates import CertificateOps
from ca_server.db.entries import EntryOps
from ca_server.db.leases import LeaseOps
from ca_server.db.nodes import NodeOps
from ca_server.db.tokens import TokenOps
from ca_server.db.trust import TrustStateOps


class Tx(
    TokenOps,
    NodeOps,
    EntryOps,
    CertificateOps,
    AuthorityOps,
    AuditOps,
    TrustStateOps,
    LeaseOps,
):
    """An open transaction, from `Store.transaction()` (read-write) or `Store.read()`
    (read-only: write methods raise `ReadOnlyTransactionError`)."""
