"""The license ledger: one row per Stripe object, the links between them, and which license each
Stripe id is bound to; filled from the stored events. Licenses keep their state until
`license-broker rebuild` derives them from the ledger (it appends an event only where a license's
state changes).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27
"""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "stripe_objects",
        sa.Column("id", sa.String(255), primary_key=True),
        sa.Column("kind", sa.String(40), nullable=False),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.Column("rank", sa.BigInteger, nullable=False),
        sa.Column("customer", sa.String(255)),
        sa.Column("state", sa.JSON, nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    )
    op.create_index("ix_stripe_objects_customer", "stripe_objects", ["customer"])
    op.create_table(
        "stripe_links",
        sa.Column("object_id", sa.String(255), primary_key=True),
        sa.Column("linked_id", sa.String(255), primary_key=True),
    )
    op.create_index("ix_stripe_links_linked_id", "stripe_links", ["linked_id"])
    op.create_table(
        "stripe_bindings",
        sa.Column("stripe_id", sa.String(255), primary_key=True),
        sa.Column("license_id", sa.String(200), nullable=False),
        sa.Column("bound_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    )
    op.create_index("ix_stripe_bindings_license_id", "stripe_bindings", ["license_id"])
    op.add_column("stripe_events", sa.Column("object_id", sa.String(255)))
    op.add_column("stripe_events", sa.Column("reason", sa.String(200)))
    op.create_index("ix_stripe_events_object_id", "stripe_events", ["object_id"])
    fill(op.get_bind())
    op.drop_index("ix_license_payments_license_id", "license_payments")
    op.drop_table("license_payments")


def fill(conn: sa.Connection) -> None:
    """Fold every stored event into the ledger, in `created` order (any order gives the same)."""
    from broker.stripe_ledger.fill import fill_ledger

    fill_ledger(conn, datetime.now(UTC))


def downgrade() -> None:
    op.create_table(
        "license_payments",
        sa.Column("id", sa.String(200), primary_key=True),
        sa.Column("license_id", sa.String(200), nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    )
    op.create_index("ix_license_payments_license_id", "license_payments", ["license_id"])
    op.drop_index("ix_stripe_events_object_id", "stripe_events")
    with op.batch_alter_table("stripe_events") as batch:
        batch.drop_column("reason")
        batch.drop_column("object_id")
    op.drop_table("stripe_bindings")
    op.drop_table("stripe_links")
    op.drop_table("stripe_objects")
