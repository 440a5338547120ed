"""Retention: old rows of `subscription_event_logs` go, each license's latest stays; old payloads
of Stripe events that changed no license go, their rows stay.

The latest row is the license's current state (EventLog.current reads it for a client without a
resume point), so it is kept however old. A client resuming from a pruned seq replays from the
oldest row kept: it skips history, never the current state (each event carries the whole state).

A `stripe_events` row is the idempotency record (a redelivery of its id is a duplicate), so it
always stays; its payload (names, addresses) is dropped once old for events that changed no
license. The payloads of the others stay: `license-broker rebuild` refills the ledger from them,
and without one it would lose the objects that event reported.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from broker.storage.schema import stripe_events, subscription_event_logs

# Deleted (or emptied) per transaction, so that pruning a large backlog never holds locks or WAL
# for long.
BATCH = 5000

# Outcomes of events no ledger object came from: rebuild folds nothing of them (see
# broker.stripe_ledger.binding.MemoryLedger.apply), so past the retention only the row is worth keeping. Events
# ignored for their type are stored without a payload to begin with (broker.ingest).
PAYLOAD_PRUNED = ("ignored", "unmatched", "rejected")
# What a payload that was not kept holds: JSON null (the column stays NOT NULL in SQL).
NOT_KEPT = "null"


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


async def prune_event_payloads(engine: AsyncEngine, older_than: timedelta, *, batch: int = BATCH) -> int:
    """Empty the payloads (JSON null) of events received before now - `older_than` whose outcome is
    in PAYLOAD_PRUNED; their rows stay. Returns how many."""
    t = stripe_events
    cutoff = datetime.now(UTC) - older_than
    doomed = (
        sa.select(t.c.id)
        .where(
            t.c.outcome.in_(PAYLOAD_PRUNED),
            t.c.received_at < cutoff,
            sa.cast(t.c.payload, sa.Text) != NOT_KEPT,
        )
        .limit(batch)
    )
    total = 0
    while True:
        async with engine.begin() as conn:
            result = await conn.execute(
                t.update().where(t.c.id.in_(doomed.scalar_subquery())).values(payload=sa.JSON.NULL)
            )
            emptied = result.rowcount
        total += emptied
        if emptied < batch:
            return total
