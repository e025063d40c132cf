"""Initial schema: join tokens, nodes, registration entries, issued certificates,
authorities, the audit trail and the trust-state counter.

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SPIFFE_ID = sa.String(2048)
NAME = sa.String(255)
HEX_ID = sa.String(64)


def upgrade() -> None:
    op.create_table(
        "join_tokens",
        sa.Column("token_hash", HEX_ID, nullable=False),
        sa.Column("node_name", NAME, nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("expires_at", sa.Double(), nullable=False),
        sa.Column("used_at", sa.Double(), nullable=True),
        sa.PrimaryKeyConstraint("token_hash", name="pk_join_tokens"),
    )

    op.create_table(
        "nodes",
        sa.Column("name", NAME, nullable=False),
        sa.Column("spiffe_id", SPIFFE_ID, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("current_serial", HEX_ID, nullable=True),
        sa.Column("pending_serial", HEX_ID, nullable=True),
        sa.Column("enrolled_at", sa.Double(), nullable=False),
        sa.Column("last_seen_at", sa.Double(), nullable=True),
        sa.Column("certificate_expires_at", sa.Double(), nullable=True),
        sa.Column("banned_at", sa.Double(), nullable=True),
        sa.PrimaryKeyConstraint("name", name="pk_nodes"),
        sa.CheckConstraint("status IN ('active', 'banned')", name="ck_nodes_status"),
    )

    op.create_table(
        "entries",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("spiffe_id", SPIFFE_ID, nullable=False),
        sa.Column("node_name", NAME, nullable=False),
        sa.Column("dns_names", sa.JSON(), nullable=False),
        sa.Column("ttl_seconds", sa.Integer(), nullable=False),
        sa.Column("selectors", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_entries"),
        sa.UniqueConstraint("spiffe_id", "node_name", name="uq_entries_spiffe_id_node_name"),
        sa.CheckConstraint("ttl_seconds > 0", name="ck_entries_ttl_seconds"),
    )
    op.create_index("ix_entries_node_name", "entries", ["node_name"])

    op.create_table(
        "certificates",
        sa.Column("serial", HEX_ID, nullable=False),
        sa.Column("spiffe_id", SPIFFE_ID, nullable=False),
        sa.Column("node_name", NAME, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("entry_id", sa.String(32), nullable=True),
        sa.Column("fingerprint_sha256", HEX_ID, nullable=False),
        sa.Column("not_before", sa.Double(), nullable=False),
        sa.Column("not_after", sa.Double(), nullable=False),
        sa.Column("pem", sa.Text(), nullable=False),
        sa.Column("issuer_id", HEX_ID, nullable=False),
        sa.Column("issued_at", sa.Double(), nullable=False),
        sa.Column("revoked_at", sa.Double(), nullable=True),
        sa.Column("revocation_reason", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("serial", name="pk_certificates"),
        sa.CheckConstraint(
            "kind IN ('node', 'workload', 'ca-server')", name="ck_certificates_kind"
        ),
    )
    op.create_index("ix_certificates_node_name", "certificates", ["node_name"])
    op.create_index("ix_certificates_spiffe_id", "certificates", ["spiffe_id"])
    op.create_index("ix_certificates_not_after", "certificates", ["not_after"])

    op.create_table(
        "authorities",
        sa.Column("id", HEX_ID, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("parent_id", HEX_ID, nullable=True),
        sa.Column("cert_pem", sa.Text(), nullable=False),
        sa.Column("encrypted_key", sa.LargeBinary(), nullable=True),
        sa.Column("upstream", sa.Boolean(), nullable=False),
        sa.Column("fingerprint_sha256", HEX_ID, nullable=False),
        sa.Column("subject", sa.Text(), nullable=False),
        sa.Column("not_before", sa.Double(), nullable=False),
        sa.Column("not_after", sa.Double(), nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
        sa.Column("chain_pem", sa.Text(), nullable=False),
        sa.Column("state_changed_at", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_authorities"),
        sa.CheckConstraint("kind IN ('root', 'intermediate')", name="ck_authorities_kind"),
        sa.CheckConstraint(
            "state IN ('prepared', 'active', 'retired')", name="ck_authorities_state"
        ),
    )

    op.create_table(
        "audit_events",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("at", sa.Double(), nullable=False),
        sa.Column("actor", SPIFFE_ID, nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("subject", SPIFFE_ID, nullable=False),
        sa.Column("details", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_audit_events"),
    )
    op.create_index("ix_audit_events_at", "audit_events", ["at"])

    trust_state = op.create_table(
        "trust_state",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("bundle_version", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_trust_state"),
        sa.CheckConstraint("id = 1", name="ck_trust_state_single_row"),
    )
    op.bulk_insert(trust_state, [{"id": 1, "bundle_version": 0}])


def downgrade() -> None:
    op.drop_table("trust_state")
    op.drop_index("ix_audit_events_at", table_name="audit_events")
    op.drop_table("audit_events")
    op.drop_table("authorities")
    op.drop_index("ix_certificates_not_after", table_name="certificates")
    op.drop_index("ix_certificates_spiffe_id", table_name="certificates")
    op.drop_index("ix_certificates_node_name", table_name="certificates")
    op.drop_table("certificates")
    op.drop_index("ix_entries_node_name", table_name="entries")
    op.drop_table("entries")
    op.drop_table("nodes")
    op.drop_table("join_tokens")
