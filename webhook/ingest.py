"""One Stripe event, one transaction: record it, move the license, append to the log; then publish.

Early events: an event that names no license and whose customer, subscription, charge or payment
intent no license is linked to yet is kept as 'pending' with those ids. The event that links one
of them to a license applies, in the same transaction, every pending event reachable through the
ids (following the ids those events add in turn), all in `created` order, one log entry for each
event that changes the license.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from broker import metrics
from broker.eventlog import EventLog, LicenseEvent
from broker.licenses import LicenseRow, LicenseStore
from broker.runtime import Runtime
from broker.schema import stripe_events
from webhook.rules import Change, StripeEventRouter

log = logging.getLogger("webhook.ingest")

NOT_MATCHED = ("pending", "unmatched")


@dataclass(frozen=True, slots=True)
class Outcome:
    # applied | unchanged | duplicate | stale | ignored | pending | unmatched
    kind: str
    license_id: str | None = None
    event: LicenseEvent | None = None  # this event's own log entry
    released: tuple[LicenseEvent, ...] = ()  # log entries of pending events this one linked

    @property
    def to_publish(self) -> list[LicenseEvent]:
        return sorted([*self.released, *([self.event] if self.event else [])], key=lambda e: e.seq)


async def _record(conn: AsyncConnection, event: dict[str, Any]) -> bool:
    """Record the event id; False if it was recorded before (a duplicate delivery).

    Two deliveries of one id racing: the second INSERT waits on the first's uncommitted key, then
    does nothing once it commits, so it is answered as a duplicate, never as an error."""
    insert = (postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert)(stripe_events)
    query = (
        insert.values(
            id=event["id"],
            type=event["type"],
            created=event["created"],
            livemode=bool(event.get("livemode")),
            outcome="received",
            payload=event,
            received_at=datetime.now(UTC),
        )
        .on_conflict_do_nothing(index_elements=["id"])
        .returning(stripe_events.c.id)
    )
    return (await conn.execute(query)).first() is not None


async def _lock_ids(conn: AsyncConnection, ids: set[str]) -> None:
    """Serialise the events that share a Stripe id, so that a pending event and the event that links
    its id cannot miss each other (each would otherwise not see the other's uncommitted row).
    Locks are taken in sorted order; SQLite needs none, it serialises every writer."""
    if ids and conn.dialect.name == "postgresql":
        await conn.execute(
            sa.text("SELECT count(pg_advisory_xact_lock(hashtextextended(k, 0))) FROM unnest(CAST(:ids AS text[])) k"),
            {"ids": sorted(ids)},
        )


def _link_columns(change: Change | None) -> dict[str, Any]:
    if change is None:
        return {}
    return {
        "stripe_customer_id": change.customer,
        "stripe_subscription_id": change.subscription,
        "stripe_charge_id": change.charge,
        "stripe_payment_intent_id": change.payment_intent,
    }


async def _set_outcome(
    conn: AsyncConnection, event_id: str, outcome: str, license_id: str | None, **links: Any
) -> None:
    await conn.execute(
        stripe_events.update()
        .where(stripe_events.c.id == event_id)
        .values(outcome=outcome, license_id=license_id, **links)
    )


async def unmatched_events(engine: AsyncEngine, limit: int = 100) -> list[dict[str, Any]]:
    """Events no license took (pending: waiting for a link; unmatched: nothing to link by), oldest first."""
    t = stripe_events
    query = (
        sa.select(
            t.c.id,
            t.c.type,
            t.c.created,
            t.c.outcome,
            t.c.stripe_customer_id,
            t.c.stripe_subscription_id,
            t.c.stripe_charge_id,
            t.c.payload,
        )
        .where(t.c.outcome.in_(NOT_MATCHED))
        .order_by(t.c.created, t.c.id)
        .limit(limit)
    )
    async with engine.connect() as conn:
        return [dict(row) for row in (await conn.execute(query)).mappings()]


class Ingestor:
    def __init__(self, runtime: Runtime, router: StripeEventRouter) -> None:
        self.runtime = runtime
        self.router = router
        # Fault injection for the crash-between-commit-and-publish test; never set in production.
        self._crash_after_commit = os.environ.get("LICENSE_BROKER_FAULT") == "exit-after-commit"

    async def ingest(self, event: dict[str, Any]) -> Outcome:
        outcome = await self._commit(event)
        published = outcome.to_publish
        if published and self._crash_after_commit:
            os._exit(86)
        for appended in published:
            await self._publish(appended)
        return outcome

    async def _commit(self, event: dict[str, Any]) -> Outcome:
        async with self.runtime.engine.begin() as conn:
            if not await _record(conn, event):
                return Outcome("duplicate")
            change = self.router.route(event)
            outcome = await self._apply(conn, event, change)
            await _set_outcome(conn, event["id"], outcome.kind, outcome.license_id, **_link_columns(change))
            return outcome

    async def _apply(self, conn: AsyncConnection, event: dict[str, Any], change: Change | None) -> Outcome:
        if change is None:
            return Outcome("ignored")
        await _lock_ids(conn, set(change.keys))
        license_id = change.license_id or await LicenseStore.find(
            conn, customer=change.customer, subscription=change.subscription, payments=change.payments
        )
        if license_id is None:
            # Kept with the ids a later event may link to a license (see the module docstring).
            return Outcome("pending" if change.keys else "unmatched")
        row = await LicenseStore.lock(conn, license_id)
        batch = [(event, change), *await self._linked_pending(conn, row, change)]
        batch.sort(key=lambda item: (item[0]["created"], item[0]["id"]))
        own = Outcome("unchanged", license_id)
        released: list[LicenseEvent] = []
        for each, each_change in batch:
            kind, appended = await self._fold(conn, row, each, each_change)
            if each is event:
                own = Outcome(kind, license_id, appended)
            else:
                await _set_outcome(conn, each["id"], kind, license_id)
                if appended is not None:
                    released.append(appended)
                log.info("pending %s %s -> %s license=%s", each["id"], each["type"], kind, license_id)
        return Outcome(own.kind, license_id, own.event, tuple(released))

    async def _linked_pending(
        self, conn: AsyncConnection, row: LicenseRow, change: Change
    ) -> list[tuple[dict[str, Any], Change]]:
        """Pending events reachable from the ids of the license and of this event."""
        ids = {row.stripe_customer_id, row.stripe_subscription_id, *change.keys}
        ids |= await LicenseStore.payments_of(conn, row.id)
        ids.discard(None)
        locked: set[str] = set(change.keys)
        seen: set[str] = set()
        found: list[tuple[dict[str, Any], Change]] = []
        while True:
            await _lock_ids(conn, {i for i in ids if i} - locked)
            locked |= {i for i in ids if i}
            t = stripe_events
            query = sa.select(t.c.id, t.c.payload).where(
                t.c.outcome == "pending",
                sa.or_(
                    t.c.stripe_customer_id.in_(ids),
                    t.c.stripe_subscription_id.in_(ids),
                    t.c.stripe_charge_id.in_(ids),
                    t.c.stripe_payment_intent_id.in_(ids),
                ),
            )
            new = [(r.id, r.payload) for r in await conn.execute(query) if r.id not in seen]
            if not new:
                return found
            for event_id, payload in new:
                seen.add(event_id)
                pending = self.router.route(payload)
                if pending is None or (pending.license_id and pending.license_id != row.id):
                    continue
                found.append((payload, pending))
                ids |= set(pending.keys)

    async def _fold(
        self, conn: AsyncConnection, row: LicenseRow, event: dict[str, Any], change: Change
    ) -> tuple[str, LicenseEvent | None]:
        """Apply one event to the locked row: (outcome, its log entry if the license changed)."""
        created: int = event["created"]
        await LicenseStore.link_payments(conn, row.id, change.payments)
        state = self.router.apply(change, row.state, created)
        if state is None:
            return "stale", None
        row.stripe_customer_id = state["customer"] or change.customer or row.stripe_customer_id
        row.stripe_subscription_id = state["subscription"] or change.subscription or row.stripe_subscription_id
        row.last_event_created = max(row.last_event_created, created)
        visible_before = {k: v for k, v in row.state.items() if k != "versions"}
        visible_after = {k: v for k, v in state.items() if k != "versions"}
        row.state = state
        if visible_after == visible_before:
            # Saved all the same: the facet versions moved, which decides later ties and stale events.
            await LicenseStore.save(conn, row)
            return "unchanged", None
        row.seq += 1
        await LicenseStore.save(conn, row)
        appended = await EventLog.append(
            conn,
            row.id,
            row.seq,
            state,
            stripe_event_id=event["id"],
            stripe_event_type=event["type"],
            occurred_at=datetime.fromtimestamp(created, UTC),
        )
        return "applied", appended

    async def _publish(self, event: LicenseEvent) -> None:
        # After the commit the event is safe; a failed publish only delays it until the stream's
        # gap fetch or database sweep finds it, so it is logged and counted, never fatal.
        try:
            await self.runtime.transport.publish(event.license_id, event.data)
        except Exception as exc:
            metrics.PUBLISH_FAILURES.inc()
            log.warning("publish of %s seq %d failed: %s", event.license_id, event.seq, exc)
