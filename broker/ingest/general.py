"""The general path: one event, one transaction, through SQLAlchemy (Postgres and SQLite). Every
event can take it: bindings that walk to pending objects, customer-level objects, the Payment Link
takeover check, reads from Stripe's API (a refresh, line items, entitlements, invoice payments)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from broker.ingest.outcomes import DUPLICATE, Outcome, OutcomeKind
from broker.ingest.records import mark_linked, record, set_outcome
from broker.storage.eventlog import EventLog, LicenseEvent
from broker.storage.licenses import LicenseStore
from broker.stripe_ledger.binding import resolve
from broker.stripe_ledger.ledger import OLDER, LicenseRules, StripeObject, line_items_id, merge
from broker.stripe_ledger.objects import (
    Reported,
    complete_entitlements,
    entitlements_id,
    invoice_payments,
    line_items,
    needs_invoice_payments,
)
from broker.stripe_ledger.refresh import Refresher, StripeUnavailable
from broker.stripe_ledger.store import LedgerStore, LocksBusy

log = logging.getLogger("broker.ingest")

LOCK_ATTEMPTS = 3


class GeneralIngest:
    def __init__(self, engine: AsyncEngine, rules: LicenseRules, refresher: Refresher) -> None:
        self.engine = engine
        self.rules = rules
        self.refresher = refresher

    async def record(self, event: dict[str, Any], raw: bytes | None, outcome: Outcome) -> Outcome:
        """An event decided without the database: one statement records it with its outcome."""
        async with self.engine.begin() as conn:
            return outcome if await record(conn, event, raw, outcome) else DUPLICATE

    async def commit(self, event: dict[str, Any], raw: bytes | None, reported: Reported) -> Outcome:
        # Linked ids the walk of a new binding finds locked elsewhere: rolled back, and taken in
        # sorted order with the event's own at the next attempt (the last one waits for them).
        extra: set[str] = set()
        for attempt in range(1, LOCK_ATTEMPTS + 1):
            try:
                async with self.engine.begin() as conn:
                    if not await record(conn, event, raw):
                        return DUPLICATE
                    outcome = await self.apply_reported(
                        conn, reported, event, extra_locks=extra, wait=attempt == LOCK_ATTEMPTS
                    )
                    await set_outcome(conn, event["id"], outcome)
                    return outcome
            except LocksBusy as busy:
                extra |= busy.ids
        raise AssertionError("the last attempt waits for its locks")

    async def apply_reported(
        self,
        conn: AsyncConnection,
        reported: Reported,
        event: dict[str, Any],
        *,
        refresh: bool = True,
        extra_locks: AbstractSet[str] = frozenset(),
        wait: bool = True,
    ) -> Outcome:
        own = reported.primary.id
        ids = reported.ids
        await LedgerStore.lock_ids(conn, ids | extra_locks | ({reported.customer} if reported.customer else set()))
        known = await LedgerStore.bindings(conn, ids)
        claimed: set[str] = set()
        if reported.license_id and reported.by_reference and reported.customer:
            claimed = await LedgerStore.customers_of(conn, reported.license_id)
        resolution = resolve(reported, known, claimed)
        if resolution.rejected:
            return Outcome(OutcomeKind.REJECTED, reported.license_id, reason=resolution.rejected, object_id=own)
        current = await LedgerStore.objects(conn, [o.id for o in reported.objects] + [line_items_id(own)])
        held, proposed = current.get(own), reported.primary
        if (
            refresh
            and held is not None
            and proposed.version <= held.version
            and dict(held.state) != dict(proposed.state)
        ):
            # Not newer than the ledger, and saying something else: with STRIPE_API_KEY, apply the
            # object as Stripe's API reads it now (broker.stripe_ledger.refresh). A repeat of the held
            # snapshot (invoice.paid, then invoice.payment_succeeded of the same second) needs no
            # read. The request runs inside this transaction, under the locks of the event's ids,
            # bounded by REFRESH_TIMEOUT; newer events never wait for it.
            fresh = await self.refresher.refresh(event, proposed, held.version)
            if fresh is not None:
                return await self.apply_reported(conn, fresh, event, refresh=False, extra_locks=extra_locks, wait=wait)
        reported = await self._read_line_items(reported, event, current)
        reported = await self._read_entitlements(reported, event)
        reported = await self._read_invoice_payments(reported, event, held)
        ids = reported.ids
        verdicts = set()
        for obj in reported.objects:
            before = current.get(obj.id)
            merged, verdict = merge(before, obj)
            verdicts.add(verdict)
            if merged is not None:
                await LedgerStore.save(conn, merged, new_links=obj.links - (before.links if before else frozenset()))
        licenses: set[str] = set()
        if resolution.license_id is not None:
            licenses.add(resolution.license_id)
            newly = await LedgerStore.bind(conn, resolution.license_id, ids, known, wait=wait)
            waiting = newly - ids
            if newly and reported.customer:
                # Customer-level objects that waited for a license of their customer.
                waiting |= {reported.customer, entitlements_id(reported.customer)}
            if waiting:
                await mark_linked(conn, resolution.license_id, waiting)
        if reported.customer_level and reported.customer:
            licenses |= set(await LedgerStore.licenses_of_customer(conn, reported.customer))
        # Stale: every object it reports holds a newer snapshot (recorded for audit, not pushed).
        stale = verdicts == {OLDER}
        if not licenses:
            return Outcome(OutcomeKind.STALE if stale else OutcomeKind.PENDING, object_id=own)
        appended = [e for lid in sorted(licenses) if (e := await self._derive(conn, lid, event)) is not None]
        kind = OutcomeKind.APPLIED if appended else (OutcomeKind.STALE if stale else OutcomeKind.UNCHANGED)
        first = resolution.license_id or min(licenses)
        return Outcome(kind, first, tuple(appended), object_id=own)

    async def _read_line_items(
        self, reported: Reported, event: dict[str, Any], current: Mapping[str, StripeObject]
    ) -> Reported:
        """A one-time purchase judged by LICENSE_PRODUCTS gets its line items from Stripe's API,
        once: no webhook carries them. A failed read raises StripeUnavailable (nothing recorded,
        503: Stripe delivers the event again); without a key that can read them it is judged
        without (it grants nothing)."""
        session = reported.primary
        if not self.rules.needs_line_items(session) or line_items_id(session.id) in current:
            return reported
        if any(o.kind == "line_items" for o in reported.objects):
            return reported
        products = await self.refresher.line_items(event, session.id)
        if products is None:
            log.warning("the line items of %s cannot be read (no key of its mode): it grants nothing", session.id)
            return reported
        read = line_items(session, products, event["created"], fetched=True)
        return replace(reported, objects=(*reported.objects, read))

    async def _read_entitlements(self, reported: Reported, event: dict[str, Any]) -> Reported:
        """A summary that lists only the first entitlements (`has_more`) is completed from Stripe's
        API (every active entitlement of the customer); without a key, or when the read fails, it
        applies as it is and the license says its features are partial."""
        summary = reported.primary
        if summary.kind != "entitlements" or not summary.state.get("partial") or summary.customer is None:
            return reported
        try:
            features = await self.refresher.entitlements(event, summary.customer)
        except StripeUnavailable:
            return reported
        if features is None:
            return reported
        return replace(reported, objects=(complete_entitlements(summary, features), *reported.objects[1:]))

    async def _read_invoice_payments(
        self, reported: Reported, event: dict[str, Any], held: StripeObject | None
    ) -> Reported:
        """A paid invoice of an API version whose events name no payment (UNLINKED_VERSIONS) gets
        its payments from Stripe's API, so that their refunds and disputes reach it; without a key,
        or when the read fails, it applies as it is."""
        invoice = reported.primary
        if not needs_invoice_payments(event, invoice, held):
            return reported
        try:
            items = await self.refresher.invoice_payments(event, invoice.id)
        except StripeUnavailable:
            return reported
        return replace(reported, objects=(*reported.objects, *invoice_payments(items or [], event["created"])))

    async def _derive(self, conn: AsyncConnection, license_id: str, event: dict[str, Any]) -> LicenseEvent | None:
        """Lock the license, derive it from its objects; its log entry if it changed."""
        row = await LicenseStore.lock(conn, license_id)
        state = self.rules.derive(await LedgerStore.license_objects(conn, license_id))
        return await EventLog.advance(
            conn,
            row,
            state,
            stripe_event_id=event["id"],
            stripe_event_type=event["type"],
            occurred_at=datetime.fromtimestamp(event["created"], UTC),
        )
