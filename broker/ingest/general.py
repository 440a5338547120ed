"""The general path: one event, one transaction, through SQLAlchemy (Postgres and SQLite). It reads
the snapshot `broker.ingest.decide` decides on as the decision asks for it (the event's ids, a
Payment Link's license, the ids a new binding walks to, the license rows, the customer-level
objects) and makes the reads from Stripe's API it names (a refresh, line items, entitlements,
invoice payments); then flushes the writes. Every event can take it."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from broker.ingest.decide import STRIPE_READS, Delivery, Need, Snapshot, Wants, Writes, decide, with_objects
from broker.ingest.outcomes import DUPLICATE, Outcome
from broker.ingest.records import mark_linked, record, set_outcome
from broker.storage.db import upsert_into
from broker.storage.licenses import LicenseRow, LicenseStore
from broker.storage.schema import stripe_bindings, stripe_links, stripe_objects, subscription_event_logs
from broker.stripe_ledger.kinds import CUSTOMER_KINDS
from broker.stripe_ledger.ledger import LicenseRules, StripeObject
from broker.stripe_ledger.objects import (
    Reported,
    complete_entitlements,
    invoice_payments,
    line_items,
)
from broker.stripe_ledger.refresh import NoRefresh, Refresher, StripeUnavailable
from broker.stripe_ledger.store import LedgerStore, LocksBusy

log = logging.getLogger("broker.ingest")

LOCK_ATTEMPTS = 3
# No decision asks for more rounds of reads than this (its ids, a walk to the edge of its bindings,
# the license rows, the customer's objects, each read from Stripe's API once): asking more is a bug
# that would otherwise read for ever inside the transaction, holding its locks.
MAX_READS = 100


class GeneralIngest:
    def __init__(self, engine: AsyncEngine, rules: LicenseRules, refresher: Refresher) -> None:
        self.engine = engine
        self.rules = rules
        self.refresher = refresher
        self.stripe_reads = not isinstance(refresher, NoRefresh)

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
                    # Recorded first: a second delivery of the id racing this one waits on its key.
                    if not await record(conn, event, raw):
                        return DUPLICATE
                    reader = _Reader(conn, extra, wait=attempt == LOCK_ATTEMPTS)
                    outcome, writes = await self._decide(reader, Delivery(event, raw, reported))
                    await _flush(conn, writes, outcome, event["id"])
                    return outcome
            except LocksBusy as busy:
                extra |= busy.ids
        raise AssertionError("the last attempt waits for its locks")

    async def _decide(self, reader: _Reader, delivery: Delivery) -> tuple[Outcome, Writes]:
        snapshot, done = Snapshot(), set[Need]()
        for _ in range(MAX_READS):
            decision = decide(
                [delivery],
                snapshot,
                self.rules,
                now=datetime.now(UTC),
                stripe_reads=self.stripe_reads,
                done=frozenset(done),
            )
            (result,) = decision.results
            if isinstance(result, Outcome):
                return result, decision.writes
            if result.need in STRIPE_READS:
                done.add(result.need)
                reported = await self._read_stripe(result, delivery, snapshot)
                delivery = Delivery(delivery.event, delivery.raw, reported)
            else:
                await reader.read(result, snapshot, delivery.reported)
        raise AssertionError(f"the decision of {delivery.event.get('id')} asked for more than {MAX_READS} reads")

    async def _read_stripe(self, wants: Wants, delivery: Delivery, snapshot: Snapshot) -> Reported:
        """`reported` with what Stripe's API gives now. A failed refresh or line items read raises
        StripeUnavailable (nothing recorded, 503: Stripe delivers the event again); the others apply
        the event as it is."""
        event, reported = delivery.event, delivery.reported
        primary = reported.primary
        if wants.need is Need.REFRESH:
            # The request runs inside this transaction, under the locks of the event's ids, bounded
            # by REFRESH_TIMEOUT; newer events never wait for it.
            held = snapshot.objects[primary.id]
            return await self.refresher.refresh(event, primary, held.version) or reported
        if wants.need is Need.LINE_ITEMS:
            # A one-time purchase judged by LICENSE_PRODUCTS: no webhook carries its line items.
            products = await self.refresher.line_items(event, primary.id)
            if products is None:
                log.warning("the line items of %s cannot be read (no key of its mode): it grants nothing", primary.id)
                return reported
            return with_objects(reported, line_items(primary, products, event["created"], fetched=True))
        try:
            if wants.need is Need.ENTITLEMENTS:
                # A summary that lists only the first entitlements (`has_more`): without a key, or
                # when the read fails, the license says its features are partial.
                assert primary.customer is not None
                features = await self.refresher.entitlements(event, primary.customer)
                if features is None:
                    return reported
                return with_objects(reported, first=complete_entitlements(primary, features))
            # A paid invoice of an API version whose events name no payment (UNLINKED_VERSIONS):
            # its payments, so that their refunds and disputes reach it.
            items = await self.refresher.invoice_payments(event, primary.id)
            return with_objects(reported, *invoice_payments(items or [], event["created"]))
        except StripeUnavailable:
            return reported


class _Reader:
    """The snapshot's reads, through SQLAlchemy, inside the event's transaction: locks first (ids,
    sorted; then license rows, sorted), then what they guard."""

    def __init__(self, conn: AsyncConnection, extra_locks: set[str], *, wait: bool) -> None:
        self.conn = conn
        self.extra = extra_locks
        self.wait = wait  # ids a walk finds later: waited for (the last attempt), or LocksBusy
        self.locked: set[str] = set()

    async def _lock(self, ids: Iterable[str], *, wait: bool = True) -> None:
        wanted = set(ids) - self.locked
        if wanted:
            await LedgerStore.lock_ids(self.conn, wanted, wait=wait)
            self.locked |= wanted

    async def _bindings_and_objects(self, snapshot: Snapshot, ids: list[str]) -> None:
        """The bindings and the objects (with their links) of these ids, those not read yet."""
        unread = [i for i in ids if i not in snapshot.binding_known]
        if unread:
            snapshot.bindings.update(await LedgerStore.bindings(self.conn, unread))
            snapshot.binding_known.update(unread)
        unread = [i for i in ids if i not in snapshot.objects_known]
        if unread:
            snapshot.add_objects((await LedgerStore.objects(self.conn, unread)).values())
            snapshot.objects_known.update(unread)

    async def read(self, wants: Wants, snapshot: Snapshot, reported: Reported) -> None:
        conn, ids = self.conn, list(wants.ids)
        need = wants.need
        if need is Need.BASE:
            first = not self.locked
            customers = {reported.customer} if reported.customer else set()
            await self._lock({*ids, *(self.extra | customers if first else ())})
            await self._bindings_and_objects(snapshot, ids)
        elif need is Need.CLAIMED:
            (license_id,) = ids
            snapshot.claimed[license_id] = await LedgerStore.customers_of(conn, license_id)
        elif need is Need.WALK:
            await self._lock(ids, wait=self.wait)
            await self._bindings_and_objects(snapshot, ids)
            for i in ids:
                snapshot.neighbours.setdefault(i, set())
            t = stripe_links
            query = sa.select(t.c.object_id, t.c.linked_id).where(
                sa.or_(t.c.object_id.in_(ids), t.c.linked_id.in_(ids))
            )
            for a, b in (await conn.execute(query)).all():
                for x, y in ((a, b), (b, a)):
                    if x in snapshot.neighbours:
                        snapshot.neighbours[x].add(y)
        elif need is Need.CUSTOMER_LICENSES:
            (customer,) = ids
            snapshot.customer_licenses[customer] = set(await LedgerStore.licenses_of_customer(conn, customer))
        elif need is Need.LICENSES:
            for license_id in sorted(ids):
                held = await LicenseStore.lock(conn, license_id)  # created if new, then locked
                snapshot.licenses[license_id] = (held.seq, held.state)
            # Every id bound to them, with its object (links are read for the event's own only).
            b, o = stripe_bindings, stripe_objects
            query = (
                sa.select(b.c.stripe_id, b.c.license_id, o)
                .select_from(b.outerjoin(o, o.c.id == b.c.stripe_id))
                .where(b.c.license_id.in_(ids))
            )
            customers = {c for obj in snapshot.objects.values() if (c := obj.customer)}
            for row in await conn.execute(query):
                snapshot.bindings[row.stripe_id] = row.license_id
                snapshot.binding_known.add(row.stripe_id)
                if row.stripe_id not in snapshot.objects_known:
                    snapshot.objects_known.add(row.stripe_id)
                    if row.id is not None:
                        snapshot.add_objects([_object(row)])
                if row.customer:
                    customers.add(row.customer)
            # The customer-level objects of their customers' and the event's, in the same go.
            await self._customer_objects(snapshot, sorted(customers - snapshot.customers_known))
        elif need is Need.CUSTOMER_OBJECTS:
            await self._customer_objects(snapshot, ids)
        else:
            raise AssertionError(need)

    async def _customer_objects(self, snapshot: Snapshot, customers: list[str]) -> None:
        if not customers:
            return
        o = stripe_objects
        query = sa.select(o).where(o.c.customer.in_(customers), o.c.kind.in_(sorted(CUSTOMER_KINDS)))
        snapshot.add_objects(
            _object(row) for row in await self.conn.execute(query) if row.id not in snapshot.objects_known
        )
        snapshot.customers_known.update(customers)


def _object(row: Any) -> StripeObject:
    return StripeObject(row.id, row.kind, row.version, row.rank, row.state, row.customer)


async def _flush(conn: AsyncConnection, writes: Writes, outcome: Outcome, event_id: str) -> None:
    for obj in writes.objects.values():
        new_links = {linked for a, linked in writes.links if a == obj.id}
        await LedgerStore.save(conn, obj, new_links=new_links)
    if writes.bindings:
        rows = [
            {"stripe_id": i, "license_id": lid, "bound_at": writes.now} for i, lid in sorted(writes.bindings.items())
        ]
        await conn.execute(upsert_into(conn, stripe_bindings).values(rows).on_conflict_do_nothing())
    linked: dict[str, set[str]] = defaultdict(set)
    for object_id, license_id in writes.linked.items():
        linked[license_id].add(object_id)
    for license_id, object_ids in sorted(linked.items()):
        await mark_linked(conn, license_id, object_ids)
    assert not writes.created, "the general path's license rows exist once locked"
    for license_id, (seq, state) in sorted(writes.licenses.items()):
        await LicenseStore.save(conn, LicenseRow(license_id, seq, state, state["customer"], state["subscription"]))
    if writes.log:
        await conn.execute(subscription_event_logs.insert().values(writes.log))
    await set_outcome(conn, event_id, outcome)
