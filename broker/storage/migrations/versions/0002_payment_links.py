"""Charge and payment-intent links, so that disputes (which name only those) find their license.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "license_payments",
        sa.Column("id", sa.String(200), primary_key=True),
        sa.Column("license_id", sa.String(200), nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    )
    op.create_index("ix_license_payments_license_id", "license_payments", ["license_id"])
    # Nullable columns: SQLite adds them without a table rebuild.
    op.add_column("stripe_events", sa.Column("stripe_charge_id", sa.String(200)))
    op.add_column("stripe_events", sa.Column("stripe_payment_intent_id", sa.String(200)))
    op.create_index("ix_stripe_events_stripe_charge_id", "stripe_events", ["stripe_charge_id"])
    op.create_index("ix_stripe_events_stripe_payment_intent_id", "stripe_events", ["stripe_payment_intent_id"])


def downgrade() -> None:
    op.drop_index("ix_stripe_events_stripe_payment_intent_id", "stripe_events")
    op.drop_index("ix_stripe_events_stripe_charge_id", "stripe_events")
    with op.batch_alter_table("stripe_events") as batch:
        batch.drop_column("stripe_payment_intent_id")
        batch.drop_column("stripe_charge_id")
    op.drop_index("ix_license_payments_license_id", "license_payments")
    op.drop_table("license_payments")
