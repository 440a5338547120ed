"""Licenses, received Stripe events and the per-license event log.

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

BIGINT_PK = sa.BigInteger().with_variant(sa.Integer, "sqlite")


def upgrade() -> None:
    op.create_table(
        "licenses",
        sa.Column("id", sa.String(200), primary_key=True),
        sa.Column("seq", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("status", sa.String(40), nullable=False, server_default="none"),
        sa.Column("entitled", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("state", sa.JSON, nullable=False),
        sa.Column("last_event_created", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("stripe_customer_id", sa.String(200)),
        sa.Column("stripe_subscription_id", sa.String(200)),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    )
    op.create_index("ix_licenses_stripe_customer_id", "licenses", ["stripe_customer_id"])
    op.create_index("ix_licenses_stripe_subscription_id", "licenses", ["stripe_subscription_id"])
    op.create_table(
        "stripe_events",
        sa.Column("id", sa.String(255), primary_key=True),
        sa.Column("type", sa.String(200), nullable=False),
        sa.Column("created", sa.BigInteger, nullable=False),
        sa.Column("livemode", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("license_id", sa.String(200)),
        sa.Column("stripe_customer_id", sa.String(200)),
        sa.Column("stripe_subscription_id", sa.String(200)),
        sa.Column("outcome", sa.String(20), nullable=False),
        sa.Column("payload", sa.JSON, nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    )
    op.create_index("ix_stripe_events_license_id", "stripe_events", ["license_id"])
    op.create_index("ix_stripe_events_outcome", "stripe_events", ["outcome"])
    op.create_index("ix_stripe_events_stripe_customer_id", "stripe_events", ["stripe_customer_id"])
    op.create_index("ix_stripe_events_stripe_subscription_id", "stripe_events", ["stripe_subscription_id"])
    op.create_table(
        "subscription_event_logs",
        sa.Column("id", BIGINT_PK, primary_key=True, autoincrement=True),
        sa.Column("license_id", sa.String(200), nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("stripe_event_id", sa.String(255)),
        sa.Column("stripe_event_type", sa.String(200)),
        sa.Column("status", sa.String(40), nullable=False),
        sa.Column("entitled", sa.Boolean, nullable=False),
        sa.Column("event", sa.JSON, nullable=False),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.UniqueConstraint("license_id", "seq", name="uq_subscription_event_logs_license_seq"),
    )
    # Retention deletes by age; the unique (license_id, seq) index serves replay and the sweep.
    op.create_index("ix_subscription_event_logs_recorded_at", "subscription_event_logs", ["recorded_at"])


def downgrade() -> None:
    op.drop_table("subscription_event_logs")
    op.drop_table("stripe_events")
    op.drop_table("licenses")
