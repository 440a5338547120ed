"""Retention of the event log: old rows of `subscription_event_logs` go, each license's latest stays.

The latest row is the license's current state (EventLog.current reads it for a client without a
resume point), so it is kept however old. A client resuming from a pruned seq replays from the
oldest row kept: it skips history, never the current state (each event carries the whole state).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from broker.schema import subscription_event_logs

# Deleted per transaction, so that pruning a large backlog never holds locks or WAL for long.
BATCH = 5000


async def prune_event_log(engine: AsyncEngine, older_than: timedelta, *, batch: int = BATCH) -> int:
    """Delete rows recorded before now - `older_than`, except each license's latest. Returns how many."""
    t = subscription_event_logs
    old, newer = t.alias("old"), t.alias("newer")
    cutoff = datetime.now(UTC) - older_than
    # recorded_at uses its index; "a newer row of the same license exists" uses (license_id, seq).
    doomed = (
        sa.select(old.c.id)
        .where(
            old.c.recorded_at < cutoff,
            sa.exists().where(newer.c.license_id == old.c.license_id, newer.c.seq > old.c.seq),
        )
        .limit(batch)
    )
    total = 0
    while True:
        async with engine.begin() as conn:
            result = await conn.execute(t.delete().where(t.c.id.in_(doomed.scalar_subquery())))
            deleted = result.rowcount
        total += deleted
        if deleted < batch:
            return total
