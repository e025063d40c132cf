"""SQLAlchemy table models of the CA database. Private to `ca_server.db`: the rest of the CA
sees only the dataclasses of `ca_server.domain`, converted at the store boundary.

Times are UNIX seconds stored as double precision floats, like the domain uses them.
Every schema change here needs a matching Alembic revision in `migrations/versions/`
(`tests/db/test_migrations.py` fails when the two disagree).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Double,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Stable constraint names, so later migrations can refer to them on both databases.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

SPIFFE_ID = String(2048)
NAME = String(255)
HEX_ID = String(64)

# SQLite only auto-increments an INTEGER PRIMARY KEY; PostgreSQL gets a 64-bit key.
AUDIT_ID = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class JoinTokenRow(Base):
    __tablename__ = "join_tokens"

    token_hash: Mapped[str] = mapped_column(HEX_ID, primary_key=True)
    node_name: Mapped[str] = mapped_column(NAME)
    created_at: Mapped[float] = mapped_column(Double)
    expires_at: Mapped[float] = mapped_column(Double)
    used_at: Mapped[float | None] = mapped_column(Double)


class NodeRow(Base):
    __tablename__ = "nodes"
    __table_args__ = (CheckConstraint("status IN ('active', 'banned')", name="status"),)

    name: Mapped[str] = mapped_column(NAME, primary_key=True)
    spiffe_id: Mapped[str] = mapped_column(SPIFFE_ID)
    status: Mapped[str] = mapped_column(String(16))
    current_serial: Mapped[str | None] = mapped_column(HEX_ID)
    # A renewed certificate not yet used: it becomes current on its first authenticated call.
    pending_serial: Mapped[str | None] = mapped_column(HEX_ID)
    enrolled_at: Mapped[float] = mapped_column(Double)
    last_seen_at: Mapped[float | None] = mapped_column(Double)
    certificate_expires_at: Mapped[float | None] = mapped_column(Double)
    banned_at: Mapped[float | None] = mapped_column(Double)


class EntryRow(Base):
    __tablename__ = "entries"
    __table_args__ = (
        UniqueConstraint("spiffe_id", "node_name"),
        Index(None, "node_name"),
        CheckConstraint("ttl_seconds > 0", name="ttl_seconds"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    spiffe_id: Mapped[str] = mapped_column(SPIFFE_ID)
    node_name: Mapped[str] = mapped_column(NAME)
    dns_names: Mapped[list[str]] = mapped_column(JSON)
    ttl_seconds: Mapped[int] = mapped_column(Integer)
    selectors: Mapped[list[str]] = mapped_column(JSON)
    created_at: Mapped[float] = mapped_column(Double)


class CertificateRow(Base):
    __tablename__ = "certificates"
    __table_args__ = (
        Index(None, "node_name"),
        Index(None, "spiffe_id"),
        Index(None, "not_after"),
        CheckConstraint("kind IN ('node', 'workload', 'ca-server')", name="kind"),
    )

    serial: Mapped[str] = mapped_column(HEX_ID, primary_key=True)
    spiffe_id: Mapped[str] = mapped_column(SPIFFE_ID)
    node_name: Mapped[str] = mapped_column(NAME)
    kind: Mapped[str] = mapped_column(String(16))
    entry_id: Mapped[str | None] = mapped_column(String(32))
    fingerprint_sha256: Mapped[str] = mapped_column(HEX_ID)
    not_before: Mapped[float] = mapped_column(Double)
    not_after: Mapped[float] = mapped_column(Double)
    pem: Mapped[str] = mapped_column(Text)
    issuer_id: Mapped[str] = mapped_column(HEX_ID)
    issued_at: Mapped[float] = mapped_column(Double)
    revoked_at: Mapped[float | None] = mapped_column(Double)
    revocation_reason: Mapped[str | None] = mapped_column(Text)


class AuthorityRow(Base):
    __tablename__ = "authorities"
    __table_args__ = (
        CheckConstraint("kind IN ('root', 'intermediate')", name="kind"),
        CheckConstraint("state IN ('prepared', 'active', 'retired')", name="state"),
    )

    id: Mapped[str] = mapped_column(HEX_ID, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16))
    parent_id: Mapped[str | None] = mapped_column(HEX_ID)
    cert_pem: Mapped[str] = mapped_column(Text)
    encrypted_key: Mapped[bytes | None] = mapped_column(LargeBinary)
    upstream: Mapped[bool] = mapped_column(Boolean)
    fingerprint_sha256: Mapped[str] = mapped_column(HEX_ID)
    subject: Mapped[str] = mapped_column(Text)
    not_before: Mapped[float] = mapped_column(Double)
    not_after: Mapped[float] = mapped_column(Double)
    created_at: Mapped[float] = mapped_column(Double)
    chain_pem: Mapped[str] = mapped_column(Text)
    state_changed_at: Mapped[float] = mapped_column(Double)


class AuditEventRow(Base):
    __tablename__ = "audit_events"
    __table_args__ = (Index(None, "at"),)

    id: Mapped[int] = mapped_column(AUDIT_ID, primary_key=True, autoincrement=True)
    at: Mapped[float] = mapped_column(Double)
    actor: Mapped[str] = mapped_column(SPIFFE_ID)
    action: Mapped[str] = mapped_column(String(64))
    subject: Mapped[str] = mapped_column(SPIFFE_ID)
    details: Mapped[dict[str, Any]] = mapped_column(JSON)


class TrustStateRow(Base):
    """One row (id 1), created by the initial migration. `bundle_version` grows by one
    whenever the trust bundle or the revocation list changes, so peers can tell;
    `access_version` whenever a node's ban or current certificate or a registration entry
    changes, so CA replicas drop what they cached about nodes and entries."""

    __tablename__ = "trust_state"
    __table_args__ = (CheckConstraint("id = 1", name="single_row"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    bundle_version: Mapped[int] = mapped_column(BigInteger)
    access_version: Mapped[int] = mapped_column(BigInteger, server_default="0")


class LeaseRow(Base):
    """Cluster-wide single execution of a job: whoever holds the unexpired lease named
    `name` runs it (rotation, pruning); a crashed holder's lease simply runs out."""

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(128))
    expires_at: Mapped[float] = mapped_column(Double)


def table_of(model: type[Base]) -> Table:
    """The Core `Table` behind a model (the store runs Core statements on it: faster than
    the ORM unit of work on the issuance path)."""
    table = model.__table__
    assert isinstance(table, Table)
    return table


metadata = Base.metadata

JOIN_TOKENS = table_of(JoinTokenRow)
NODES = table_of(NodeRow)
ENTRIES = table_of(EntryRow)
CERTIFICATES = table_of(CertificateRow)
AUTHORITIES = table_of(AuthorityRow)
AUDIT_EVENTS = table_of(AuditEventRow)
TRUST_STATE = table_of(TrustStateRow)
LEASES = table_of(LeaseRow)
