"""The event log keeps the exact bytes each event is sent as (`data`, text) instead of a JSON
column the stream decoded and re-encoded for every replayed event.

Existing rows: on Postgres the `json` column's text is what the webhook wrote (orjson), so it is
copied as it is; SQLite stored the stdlib's encoding, which is re-encoded compactly.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28
"""

from __future__ import annotations

import json

import orjson
import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_BATCH = 1000


def upgrade() -> None:
    op.add_column("subscription_event_logs", sa.Column("data", sa.Text))
    conn = op.get_bind()
    if conn.dialect.name == "postgresql":
        op.execute("UPDATE subscription_event_logs SET data = event::text")
    else:
        rows = conn.execute(sa.text("SELECT id, event FROM subscription_event_logs")).all()
        updates = [{"id": row.id, "data": orjson.dumps(json.loads(row.event)).decode()} for row in rows]
        for start in range(0, len(updates), _BATCH):
            conn.execute(
                sa.text("UPDATE subscription_event_logs SET data = :data WHERE id = :id"),
                updates[start : start + _BATCH],
            )
    with op.batch_alter_table("subscription_event_logs") as batch:
        batch.alter_column("data", existing_type=sa.Text, nullable=False)
        batch.drop_column("event")


def downgrade() -> None:
    op.add_column("subscription_event_logs", sa.Column("event", sa.JSON))
    if op.get_bind().dialect.name == "postgresql":
        op.execute("UPDATE subscription_event_logs SET event = data::json")
    else:
        op.execute("UPDATE subscription_event_logs SET event = data")
    with op.batch_alter_table("subscription_event_logs") as batch:
        batch.alter_column("event", existing_type=sa.JSON, nullable=False)
        batch.drop_column("data")
