"""`license-broker rebuild`: refill the ledger from the stored Stripe events and derive licenses
again, appending an event only where a license's state changes (what an operator runs after a
rules fix or after migration 0003). Clients receive the appended events through the database
sweep (redis, poll) or on their next reconnect."""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa

from broker.settings import Settings
from broker.storage.db import create_engine
from broker.storage.eventlog import EventLog
from broker.storage.licenses import LicenseStore
from broker.storage.schema import licenses
from broker.stripe_ledger.fill import fill_ledger
from broker.stripe_ledger.ledger import LicenseRules
from broker.stripe_ledger.objects import EventFilter


async def rebuild(settings: Settings, license_id: str | None = None) -> list[tuple[str, int]]:
    rules = LicenseRules.from_settings(settings)
    event_filter = EventFilter(settings.stripe_livemode, settings.stripe_accounts)
    engine = create_engine(settings)
    changed: list[tuple[str, int]] = []
    try:
        async with engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                # Webhooks wait while the ledger is refilled, so that none writes into a half-built one.
                await conn.execute(
                    sa.text("LOCK TABLE stripe_objects, stripe_links, stripe_bindings IN EXCLUSIVE MODE")
                )
            now = datetime.now(UTC)
            ledger = await conn.run_sync(lambda c: fill_ledger(c, now, lambda e: event_filter.reason(e) is None))
            if license_id is not None:
                ids = {license_id}
            else:
                ids = set(ledger.bindings.values()) | set(await conn.scalars(sa.select(licenses.c.id)))
            for each in sorted(ids):
                row = await LicenseStore.lock(conn, each)
                state = rules.derive(ledger.objects_of(each))
                appended = await EventLog.advance(
                    conn, row, state, stripe_event_id=None, stripe_event_type="rebuild", occurred_at=now
                )
                if appended is not None:
                    changed.append((each, appended.seq))
    finally:
        await engine.dispose()
    return changed
