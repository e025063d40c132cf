"""The access version: a counter that grows with every change to who may do what (a node's
ban or current certificate, a registration entry), read by every CA replica to drop what it
cached about nodes and entries.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("trust_state") as batch:
        batch.add_column(
            sa.Column("access_version", sa.BigInteger(), nullable=False, server_default="0")
        )


def downgrade() -> None:
    with op.batch_alter_table("trust_state") as batch:
        batch.drop_column("access_version")
