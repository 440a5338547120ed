"""Buying and trying from the app (docs/protocol.md): the checkouts the broker created, with the
client address that asked, and the trials, one per machine fingerprint for ever.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "checkouts",
        sa.Column("id", sa.String(255), primary_key=True),
        sa.Column("license_id", sa.String(200), sa.ForeignKey("licenses.id", ondelete="CASCADE"), nullable=False),
        sa.Column("machine_id", sa.String(40)),
        sa.Column("pending_license", sa.Boolean, nullable=False),
        sa.Column("address", sa.String(80), nullable=False),
        sa.Column("price", sa.String(255), nullable=False),
        sa.Column("mode", sa.String(20), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("closes_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expiring_at", sa.DateTime(timezone=True)),
    )
    op.create_index("ix_checkouts_license_id", "checkouts", ["license_id"])
    op.create_index("ix_checkouts_address", "checkouts", ["address"])
    op.create_index("ix_checkouts_expires_at", "checkouts", ["expires_at"])
    op.create_table(
        "trials",
        sa.Column("fingerprint", sa.LargeBinary(32), primary_key=True),
        sa.Column("license_id", sa.String(200), nullable=False, unique=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ends_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True)),
    )
    op.create_index(
        "ix_trials_running_ends_at",
        "trials",
        ["ends_at"],
        postgresql_where=sa.text("ended_at IS NULL"),
        sqlite_where=sa.text("ended_at IS NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_trials_running_ends_at", "trials")
    op.drop_table("trials")
    op.drop_index("ix_checkouts_expires_at", "checkouts")
    op.drop_index("ix_checkouts_address", "checkouts")
    op.drop_index("ix_checkouts_license_id", "checkouts")
    op.drop_table("checkouts")
