"""One Stripe event, one transaction: record it, move the license, append to the log; then publish."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from broker import metrics
from broker.eventlog import EventLog, LicenseEvent
from broker.licenses import LicenseStore
from broker.runtime import Runtime
from broker.schema import stripe_events
from webhook.rules import StripeEventRouter

log = logging.getLogger("webhook.ingest")


@dataclass(frozen=True, slots=True)
class Outcome:
    # applied | unchanged | duplicate | stale | ignored | unmatched
    kind: str
    license_id: str | None = None
    event: LicenseEvent | None = None


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


class Ingestor:
    def __init__(self, runtime: Runtime, router: StripeEventRouter) -> None:
        self.runtime = runtime
        self.router = router
        # Fault injection for the crash-between-commit-and-publish test; never set in production.
        self._crash_after_commit = os.environ.get("LICENSE_BROKER_FAULT") == "exit-after-commit"

    async def ingest(self, event: dict[str, Any]) -> Outcome:
        outcome = await self._commit(event)
        if outcome.event is not None:
            if self._crash_after_commit:
                os._exit(86)
            await self._publish(outcome.event)
        return outcome

    async def _commit(self, event: dict[str, Any]) -> Outcome:
        async with self.runtime.engine.begin() as conn:
            if not await _record(conn, event):
                return Outcome("duplicate")
            outcome = await self._apply(conn, event)
            await conn.execute(
                stripe_events.update()
                .where(stripe_events.c.id == event["id"])
                .values(outcome=outcome.kind, license_id=outcome.license_id)
            )
            return outcome

    async def _apply(self, conn: AsyncConnection, event: dict[str, Any]) -> Outcome:
        change = self.router.route(event)
        if change is None:
            return Outcome("ignored")
        license_id = change.license_id or await LicenseStore.find(
            conn, customer=change.customer, subscription=change.subscription
        )
        if license_id is None:
            return Outcome("unmatched")
        row = await LicenseStore.lock(conn, license_id)
        created: int = event["created"]
        state = self.router.apply(change, row.state, created, row.last_event_created)
        if state is None:
            return Outcome("stale", license_id)
        row.stripe_customer_id = change.customer or row.stripe_customer_id
        row.stripe_subscription_id = change.subscription or row.stripe_subscription_id
        row.last_event_created = max(row.last_event_created, created)
        if state == row.state:
            await LicenseStore.save(conn, row)
            return Outcome("unchanged", license_id)
        row.seq += 1
        row.state = state
        await LicenseStore.save(conn, row)
        appended = await EventLog.append(
            conn,
            license_id,
            row.seq,
            state,
            stripe_event_id=event["id"],
            stripe_event_type=event["type"],
            occurred_at=datetime.fromtimestamp(created, UTC),
        )
        return Outcome("applied", license_id, appended)

    async def _publish(self, event: LicenseEvent) -> None:
        # After the commit the event is safe; a failed publish only delays it until the stream's
        # gap fetch or database sweep finds it, so it is logged and counted, never fatal.
        try:
            await self.runtime.transport.publish(event.license_id, event.data)
        except Exception as exc:
            metrics.PUBLISH_FAILURES.inc()
            log.warning("publish of %s seq %d failed: %s", event.license_id, event.seq, exc)
