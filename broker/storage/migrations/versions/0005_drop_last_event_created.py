"""licenses.last_event_created was written and never read: the ledger orders each Stripe object
by its own version (broker.stripe_ledger.ledger), not the license by its last event.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("licenses") as batch:
        batch.drop_column("last_event_created")


def downgrade() -> None:
    with op.batch_alter_table("licenses") as batch:
        batch.add_column(sa.Column("last_event_created", sa.BigInteger, nullable=False, server_default="0"))
