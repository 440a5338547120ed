"""One Stripe event, one transaction: record it, update the ledger object it reports, bind it to
its license, derive the license from its objects and append to the log; then publish.

Early events: an object whose license is not known yet (an invoice before the Checkout Session that
names its subscription) is kept in the ledger unbound ("pending"); the event that binds one of its
ids binds it too, and the license derived then includes it. A customer-level object (entitlement
summary, deleted customer) moves every license that holds an object of its customer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from broker import metrics
from broker.runtime import Runtime
from broker.storage.db import upsert_into
from broker.storage.eventlog import EventLog, LicenseEvent
from broker.storage.licenses import LicenseStore
from broker.storage.schema import stripe_events
from broker.stripe_ledger.binding import resolve
from broker.stripe_ledger.ledger import OLDER, LicenseRules, StripeObject, line_items_id, merge
from broker.stripe_ledger.objects import (
    MAX_CREATED,
    MAX_ID,
    BadLicenseId,
    EventFilter,
    Reported,
    Unprocessable,
    complete_entitlements,
    entitlements_id,
    invoice_payments,
    line_items,
    needs_invoice_payments,
    report,
    unlinked_version,
)
from broker.stripe_ledger.refresh import NoRefresh, Refresher, StripeUnavailable
from broker.stripe_ledger.store import LedgerStore, LocksBusy
from webhook.fast_ingest import FastIngest

log = logging.getLogger("webhook.ingest")

NOT_MATCHED = ("pending", "unmatched", "rejected", "ignored")
LOCK_ATTEMPTS = 3


@dataclass(frozen=True, slots=True)
class Outcome:
    # applied | unchanged | duplicate | stale | ignored | pending | rejected | unmatched
    kind: str
    license_id: str | None = None
    appended: tuple[LicenseEvent, ...] = ()  # log entries, one per license the event changed
    reason: str | None = None  # why it changed nothing (ignored, rejected, unmatched)
    object_id: str | None = None
    # False: the event is recorded without its payload (JSON null): its id, type and time only.
    keep_payload: bool = True

    @property
    def event(self) -> LicenseEvent | None:
        """The log entry of `license_id`, if the event changed it."""
        return next((e for e in self.appended if e.license_id == self.license_id), None)

    @property
    def to_publish(self) -> list[LicenseEvent]:
        return list(self.appended)


AfterCommit = Callable[[Outcome], None]


def _envelope_problem(event: dict[str, Any]) -> str | None:
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


async def _record(
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
            outcome=outcome.kind if outcome else "received",
            license_id=outcome.license_id if outcome else None,
            object_id=outcome.object_id if outcome else None,
            reason=outcome.reason[:200] if outcome and outcome.reason else None,
            payload=_payload(conn, event, raw, outcome),
            received_at=datetime.now(UTC),
        )
        .on_conflict_do_nothing(index_elements=["id"])
        .returning(stripe_events.c.id)
    )
    return (await conn.execute(query)).first() is not None


async def _set_outcome(conn: AsyncConnection, event_id: str, outcome: Outcome) -> None:
    await conn.execute(
        stripe_events.update()
        .where(stripe_events.c.id == event_id)
        .values(
            outcome=outcome.kind,
            license_id=outcome.license_id,
            object_id=outcome.object_id,
            reason=outcome.reason[:200] if outcome.reason else None,
        )
    )


async def unmatched_events(engine: AsyncEngine, limit: int = 100) -> list[dict[str, Any]]:
    """Events that changed no license, with the reason (pending: waiting for a link; unmatched,
    rejected, ignored: see docs/stripe.md), oldest first."""
    t = stripe_events
    query = (
        sa.select(t.c.id, t.c.type, t.c.created, t.c.outcome, t.c.reason, t.c.object_id, t.c.payload)
        .where(t.c.outcome.in_(NOT_MATCHED))
        .order_by(t.c.created, t.c.id)
        .limit(limit)
    )
    async with engine.connect() as conn:
        return [dict(row) for row in (await conn.execute(query)).mappings()]


class Ingestor:
    def __init__(
        self,
        runtime: Runtime,
        rules: LicenseRules,
        event_filter: EventFilter | None = None,
        refresher: Refresher | None = None,
        after_commit: AfterCommit | None = None,
    ) -> None:
        self.runtime = runtime
        self.rules = rules
        self.filter = event_filter or EventFilter()
        self.refresher = refresher or NoRefresh()
        # Postgres: the common path in two round trips (webhook.fast_ingest); SQLite: the general one.
        self._fast = (
            FastIngest(runtime.engine, rules, refreshes=not isinstance(self.refresher, NoRefresh))
            if runtime.engine.dialect.name == "postgresql"
            else None
        )
        # Called between the commit and the publish (the fault tests kill the process there).
        self.after_commit = after_commit
        self._warned_unlinked = False

    async def ingest(self, event: dict[str, Any], raw: bytes | None = None) -> Outcome:
        """`raw`: the verified body `event` was parsed from, stored as it is (default: re-encoded)."""
        problem = _envelope_problem(event)
        if problem is not None:
            # Not even storable under its id; answered 2xx all the same (a retry cannot fix it).
            log.warning("webhook event not recorded: %s", problem)
            return Outcome("unmatched", reason=problem)
        try:
            outcome = await self._commit(event, raw)
        except sa.exc.DataError as exc:
            # Content the database refuses (not an outage): recorded without it, never a 5xx,
            # which Stripe would retry for three days.
            log.warning("webhook %s: content refused by the database (%s)", event["id"], type(exc.orig).__name__)
            outcome = await self._record_refused(event)
        if self.after_commit is not None:
            self.after_commit(outcome)
        for appended in outcome.to_publish:
            await self._publish(appended)
        return outcome

    async def _record_refused(self, event: dict[str, Any]) -> Outcome:
        outcome = Outcome("unmatched", reason="content the database refuses")
        stub = {"id": event["id"], "type": event["type"], "created": event["created"], "refused": True}
        async with self.runtime.engine.begin() as conn:
            await _record(conn, stub, outcome=outcome)
        return outcome

    async def _commit(self, event: dict[str, Any], raw: bytes | None) -> Outcome:
        decided = self._decide(event)
        if isinstance(decided, Outcome):
            # Decided without the database: one statement records the event with its outcome.
            async with self.runtime.engine.begin() as conn:
                return decided if await _record(conn, event, raw, decided) else Outcome("duplicate")
        if self._fast is not None and FastIngest.eligible(decided):
            result = await self._fast.apply(event, raw, decided)
            if result is not None:
                kind, license_id, appended, object_id = result
                if kind == "duplicate":
                    return Outcome("duplicate")
                return Outcome(kind, license_id, (appended,) if appended else (), object_id=object_id)
        # Linked ids the walk of a new binding finds locked elsewhere: rolled back, and taken in
        # sorted order with the event's own at the next attempt (the last one waits for them).
        extra: set[str] = set()
        for attempt in range(1, LOCK_ATTEMPTS + 1):
            try:
                async with self.runtime.engine.begin() as conn:
                    if not await _record(conn, event, raw):
                        return Outcome("duplicate")
                    outcome = await self.apply_reported(
                        conn, decided, event, extra_locks=extra, wait=attempt == LOCK_ATTEMPTS
                    )
                    await _set_outcome(conn, event["id"], outcome)
                    return outcome
            except LocksBusy as busy:
                extra |= busy.ids
        raise AssertionError("the last attempt waits for its locks")

    def _decide(self, event: dict[str, Any]) -> Outcome | Reported:
        """What the event reports, or its outcome when it cannot change a license."""
        reason = self.filter.reason(event)
        if reason is not None:
            return Outcome("ignored", reason=reason)
        if not self._warned_unlinked and unlinked_version(event.get("api_version")):
            self._warn_unlinked(event["api_version"])
        try:
            reported = report(event)
        except BadLicenseId as exc:
            return Outcome("rejected", reason=str(exc))
        except Unprocessable as exc:
            return Outcome("unmatched", reason=str(exc))
        if reported is None:
            # A type no rule reads (customer.created, with its name and address): nothing will
            # ever read its payload, so only the id (idempotency), type and time are recorded.
            # Events ignored by STRIPE_LIVEMODE or STRIPE_ACCOUNTS keep theirs: after fixing the
            # setting, `license-broker rebuild` applies them (prune drops it after the retention).
            return Outcome("ignored", reason="event type not used", keep_payload=False)
        return reported

    def _warn_unlinked(self, api_version: str) -> None:
        """Once per process: the endpoint's API version cannot link subscription payments."""
        self._warned_unlinked = True
        if isinstance(self.refresher, NoRefresh):
            log.warning(
                "Stripe events of API version %s name no payment on their invoices and come without "
                "invoice_payment.paid: refunds and disputes of subscription payments cannot reach their "
                "licenses. Set STRIPE_API_KEY (the broker then reads each paid invoice's payments) or move "
                "the webhook endpoint to API version 2025-05-28 or later (docs/stripe.md)",
                api_version,
            )

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
            return Outcome("rejected", reported.license_id, reason=resolution.rejected, object_id=own)
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
                await _mark_linked(conn, resolution.license_id, waiting)
        if reported.customer_level and reported.customer:
            licenses |= set(await LedgerStore.licenses_of_customer(conn, reported.customer))
        # Stale: every object it reports holds a newer snapshot (recorded for audit, not pushed).
        stale = verdicts == {OLDER}
        if not licenses:
            return Outcome("stale" if stale else "pending", object_id=own)
        appended = [e for lid in sorted(licenses) if (e := await self._derive(conn, lid, event)) is not None]
        kind = "applied" if appended else ("stale" if stale else "unchanged")
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

    async def _publish(self, event: LicenseEvent) -> None:
        # After the commit the event is safe; a failed publish only delays it until the stream's
        # gap fetch or database sweep finds it, so it is logged and counted, never fatal.
        try:
            await self.runtime.transport.publish(event.license_id, event.data)
        except Exception as exc:
            metrics.PUBLISH_FAILURES.inc()
            log.warning("publish of %s seq %d failed: %s", event.license_id, event.seq, exc)


async def _mark_linked(conn: AsyncConnection, license_id: str, object_ids: set[str]) -> None:
    """Pending events whose objects were just bound now count for the license."""
    t = stripe_events
    await conn.execute(
        t.update()
        .where(t.c.outcome == "pending", t.c.object_id.in_(sorted(object_ids)))
        .values(outcome="linked", license_id=license_id)
    )
