"""License keys and machines (docs/desktop.md): a sealed key per license, and the machines
activated with it.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "license_keys",
        sa.Column("license_id", sa.String(200), sa.ForeignKey("licenses.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("digest", sa.LargeBinary(32), nullable=False),
        sa.Column("sealed", sa.LargeBinary(128), nullable=False),
        sa.Column("secret_id", sa.String(16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column("rotated_at", sa.DateTime(timezone=True)),
        sa.Column("used_at", sa.DateTime(timezone=True)),
        sa.UniqueConstraint("digest", name="uq_license_keys_digest"),
    )
    op.create_table(
        "machines",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("license_id", sa.String(200), sa.ForeignKey("licenses.id", ondelete="CASCADE"), nullable=False),
        sa.Column("fingerprint", sa.LargeBinary(32), nullable=False),
        sa.Column("name", sa.String(200)),
        sa.Column("platform", sa.String(100)),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.UniqueConstraint("license_id", "fingerprint", name="uq_machines_license_fingerprint"),
    )
    op.create_index("ix_machines_license_id", "machines", ["license_id"])
    op.create_index("ix_machines_last_seen_at", "machines", ["last_seen_at"])


def downgrade() -> None:
    op.drop_index("ix_machines_last_seen_at", "machines")
    op.drop_index("ix_machines_license_id", "machines")
    op.drop_table("machines")
    op.drop_table("license_keys")
