"""The `stripe_events` rows: an event recorded once under its id, with its outcome; and the
events that changed no license (`license-broker unmatched`)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from broker.ingest.decide import REASON_LENGTH
from broker.ingest.outcomes import NOT_MATCHED, Outcome, OutcomeKind
from broker.storage.db import upsert_into
from broker.storage.schema import stripe_events
from broker.stripe_ledger.objects import MAX_CREATED, MAX_ID


def envelope_problem(event: dict[str, Any]) -> str | None:
    """Why the event cannot even be stored under its id, if it cannot."""
    event_id, kind, created = event["id"], event["type"], event["created"]
    if not (0 < len(event_id) <= MAX_ID and event_id.isprintable()):
        return "event id is not a Stripe id"
    if not (0 < len(kind) <= 200 and kind.isprintable()):
        return "event type is not a Stripe event type"
    if not 0 <= created < MAX_CREATED:
        return "created is not a timestamp"
    return None


def _payload(conn: AsyncConnection, event: dict[str, Any], raw: bytes | None, outcome: Outcome | None) -> Any:
    """The verified body as Stripe sent it, stored without encoding the parsed event again; JSON
    null for an event whose payload is not kept."""
    if outcome is not None and not outcome.keep_payload:
        return sa.JSON.NULL
    if raw is None:
        return event
    text = sa.type_coerce(raw.decode(), sa.Text)
    return sa.cast(text, sa.JSON) if conn.dialect.name == "postgresql" else text


def _reason(outcome: Outcome | None) -> str | None:
    return outcome.reason[:REASON_LENGTH] if outcome and outcome.reason else None


async def record(
    conn: AsyncConnection, event: dict[str, Any], raw: bytes | None = None, outcome: Outcome | None = None
) -> bool:
    """Record the event id (with its outcome, when already known); False if it was recorded before
    (a duplicate delivery).

    Two deliveries of one id racing: the second INSERT waits on the first's uncommitted key, then
    does nothing once it commits, so it is answered as a duplicate, never as an error."""
    insert = upsert_into(conn, stripe_events)
    query = (
        insert.values(
            id=event["id"],
            type=event["type"],
            created=event["created"],
            livemode=bool(event.get("livemode")),
            outcome=outcome.kind.value if outcome else "received",
            license_id=outcome.license_id if outcome else None,
            object_id=outcome.object_id if outcome else None,
            reason=_reason(outcome),
            payload=_payload(conn, event, raw, outcome),
            received_at=datetime.now(UTC),
        )
        .on_conflict_do_nothing(index_elements=["id"])
        .returning(stripe_events.c.id)
    )
    return (await conn.execute(query)).first() is not None


async def set_outcome(conn: AsyncConnection, event_id: str, outcome: Outcome) -> None:
    await conn.execute(
        stripe_events.update()
        .where(stripe_events.c.id == event_id)
        .values(
            outcome=outcome.kind.value,
            license_id=outcome.license_id,
            object_id=outcome.object_id,
            reason=_reason(outcome),
        )
    )


async def mark_linked(conn: AsyncConnection, license_id: str, object_ids: set[str]) -> None:
    """Pending events whose objects were just bound now count for the license."""
    t = stripe_events
    await conn.execute(
        t.update()
        .where(t.c.outcome == OutcomeKind.PENDING.value, t.c.object_id.in_(sorted(object_ids)))
        .values(outcome=OutcomeKind.LINKED.value, license_id=license_id)
    )


async def unmatched_events(engine: AsyncEngine, limit: int = 100) -> list[dict[str, Any]]:
    """Events that changed no license, with the reason (pending: waiting for a link; unmatched,
    rejected, ignored: see docs/stripe.md), oldest first."""
    t = stripe_events
    query = (
        sa.select(t.c.id, t.c.type, t.c.created, t.c.outcome, t.c.reason, t.c.object_id, t.c.payload)
        .where(t.c.outcome.in_([k.value for k in NOT_MATCHED]))
        .order_by(t.c.created, t.c.id)
        .limit(limit)
    )
    async with engine.connect() as conn:
        return [dict(row) for row in (await conn.execute(query)).mappings()]
