"""The ingest's decision, written once: what a transaction writes for its events, and their
outcomes, from a snapshot of what it read with its locks held. No I/O here.

Two readers fill the snapshot (broker.ingest.general: per event through SQLAlchemy, asking for
more as `decide` names it; broker.ingest.batched: the READ round trip, for several events at
once), and two writers flush the writes (SQLAlchemy statements; the batched WRITE statement).
When the snapshot lacks something an event needs (`Wants`), the general path reads it and decides
again; the batched path gives the event to the general path, nothing of it written.

The order `decide_event` asks in is the general path's lock order: the event's ids, then the ids a
new binding walks to, then the license rows (sorted), all at once; what it asks after those takes
no lock."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import Enum
from typing import Any

import orjson
from sqlalchemy import String

from broker.ingest.outcomes import DUPLICATE, Outcome, OutcomeKind
from broker.storage.eventlog import LicenseEvent, log_entry
from broker.storage.licenses import LicenseState, initial_state
from broker.storage.schema import stripe_events
from broker.stripe_ledger.binding import resolve
from broker.stripe_ledger.ledger import CUSTOMER_KINDS, OLDER, LicenseRules, StripeObject, line_items_id, merge
from broker.stripe_ledger.objects import Reported, entitlements_id, needs_invoice_payments

_reason_type = stripe_events.c.reason.type
assert isinstance(_reason_type, String) and _reason_type.length is not None
REASON_LENGTH = _reason_type.length  # a longer reason is cut (it is the broker's own text)


class Need(Enum):
    """What a snapshot may lack, in the order `decide_event` asks for it."""

    BASE = "the event's ids: their locks, bindings and objects"
    CLAIMED = "the customers of the license a Payment Link names"
    REFRESH = "the primary object as Stripe's API reads it now"
    LINE_ITEMS = "a one-time Checkout's line items, from Stripe's API"
    ENTITLEMENTS = "every active entitlement of the customer, from Stripe's API"
    INVOICE_PAYMENTS = "a paid invoice's payments, from Stripe's API"
    WALK = "the ids a new binding walks to: their locks, bindings, links and objects"
    CUSTOMER_LICENSES = "the licenses that hold an object of the customer"
    LICENSES = "the license rows, locked, with every object bound to them"
    CUSTOMER_OBJECTS = "the customer-level objects of these customers"


STRIPE_READS = frozenset({Need.REFRESH, Need.LINE_ITEMS, Need.ENTITLEMENTS, Need.INVOICE_PAYMENTS})


@dataclass(frozen=True, slots=True)
class Wants:
    need: Need
    ids: tuple[str, ...] = ()  # the ids, licenses or customers to read


@dataclass(slots=True)
class Snapshot:
    """What the transaction read, its locks held; `decide` moves it on as each event it decides
    leaves it, so that the next event of a batch decides on it. An id, license or customer outside
    the `*_known` sets was not read: `decide_event` asks for it (Wants)."""

    recorded: set[str] = field(default_factory=set)  # event ids recorded before
    bindings: dict[str, str] = field(default_factory=dict)  # stripe id -> license
    binding_known: set[str] = field(default_factory=set)  # ids whose binding (or its absence) was read
    objects: dict[str, StripeObject] = field(default_factory=dict)  # the event's own with their links
    objects_known: set[str] = field(default_factory=set)  # ids whose object row (or its absence) was read
    neighbours: dict[str, set[str]] = field(default_factory=dict)  # the ids linked to an id, both ways
    licenses: dict[str, tuple[int, LicenseState]] = field(default_factory=dict)  # locked rows, all bound read
    absent: set[str] = field(default_factory=set)  # licenses known not to exist yet
    claimed: dict[str, set[str]] = field(default_factory=dict)  # license -> the customers of its objects
    customer_licenses: dict[str, set[str]] = field(default_factory=dict)  # customer -> licenses holding it
    by_customer: dict[str, dict[str, StripeObject]] = field(default_factory=dict)  # customer-level objects
    customers_known: set[str] = field(default_factory=set)  # customers whose customer-level objects were read

    def add_objects(self, objects: Iterable[StripeObject]) -> None:
        for obj in objects:
            self.objects[obj.id] = obj
            if obj.customer and obj.kind in CUSTOMER_KINDS:
                self.by_customer.setdefault(obj.customer, {})[obj.id] = obj


@dataclass(frozen=True, slots=True)
class Delivery:
    """One verified event, what it reports, and the body it came as (stored as it is)."""

    event: Mapping[str, Any]
    raw: bytes | None
    reported: Reported


@dataclass(slots=True)
class Writes:
    """The rows one transaction writes. `events`: each decided event's `stripe_events` row (the
    general path recorded it already and writes its outcome columns only)."""

    now: datetime
    events: list[dict[str, Any]] = field(default_factory=list)
    objects: dict[str, StripeObject] = field(default_factory=dict)
    links: set[tuple[str, str]] = field(default_factory=set)
    bindings: dict[str, str] = field(default_factory=dict)
    created: dict[str, tuple[int, LicenseState]] = field(default_factory=dict)  # new: seq, state
    licenses: dict[str, tuple[int, LicenseState]] = field(default_factory=dict)  # changed: seq, state
    log: list[dict[str, Any]] = field(default_factory=list)
    linked: dict[str, str] = field(default_factory=dict)  # object id -> license: its pending events now count

    def license(self, license_id: str, seq: int, state: LicenseState) -> None:
        (self.created if license_id in self.created else self.licenses)[license_id] = (seq, state)


@dataclass(frozen=True, slots=True)
class Decision:
    writes: Writes
    results: list[Outcome | Wants]  # one per delivery: its outcome, or what it needs read first


def decide(
    deliveries: Sequence[Delivery],
    snapshot: Snapshot,
    rules: LicenseRules,
    *,
    now: datetime,
    stripe_reads: bool,
    done: frozenset[Need] = frozenset(),
) -> Decision:
    """Each delivery in order, on the snapshot as the ones before it left it. `stripe_reads`: the
    reads from Stripe's API can give something (STRIPE_API_KEY); `done`: the ones made already."""
    writes = Writes(now)
    results = [decide_event(d, snapshot, writes, rules, stripe_reads=stripe_reads, done=done) for d in deliveries]
    return Decision(writes, results)


def _reason(text: str | None) -> str | None:
    return text[:REASON_LENGTH] if text else None


def _event_row(delivery: Delivery, outcome: Outcome) -> dict[str, Any]:
    event, raw = delivery.event, delivery.raw
    return {
        "id": event["id"],
        "type": event["type"],
        "created": event["created"],
        "livemode": bool(event.get("livemode")),
        "outcome": outcome.kind.value,
        "license_id": outcome.license_id,
        "object_id": outcome.object_id,
        "reason": _reason(outcome.reason),
        # The verified body, embedded as it is (it parsed as JSON).
        "payload": orjson.Fragment(raw) if raw is not None else event,
    }


def _record(snapshot: Snapshot, writes: Writes, delivery: Delivery, outcome: Outcome) -> Outcome:
    writes.events.append(_event_row(delivery, outcome))
    snapshot.recorded.add(delivery.event["id"])
    return outcome


def decide_event(
    delivery: Delivery,
    snapshot: Snapshot,
    writes: Writes,
    rules: LicenseRules,
    *,
    stripe_reads: bool,
    done: frozenset[Need] = frozenset(),
) -> Outcome | Wants:
    """One event: its outcome, its rows added to `writes` and the snapshot moved on; or what it
    needs read first (nothing written, the snapshot unchanged)."""
    event, reported = delivery.event, delivery.reported
    if event["id"] in snapshot.recorded:
        return DUPLICATE
    s = snapshot
    own_ids = [o.id for o in reported.objects]
    own = own_ids[0]
    ids = reported.ids
    unread = sorted((ids - s.binding_known) | (set(own_ids) - s.objects_known))
    if unread:
        return Wants(Need.BASE, tuple(unread))
    known = {i: s.bindings[i] for i in ids if i in s.bindings}
    claimed: set[str] = set()
    named = reported.license_id
    if named and reported.by_reference and reported.customer and not known.keys() & set(own_ids):
        if named not in s.claimed:
            return Wants(Need.CLAIMED, (named,))
        claimed = s.claimed[named]
    resolution = resolve(reported, known, claimed)
    if resolution.rejected:
        return _record(
            s, writes, delivery, Outcome(OutcomeKind.REJECTED, named, reason=resolution.rejected, object_id=own)
        )

    # Reads from Stripe's API the general path makes (the batched one gives such an event to it).
    held, proposed = s.objects.get(own), reported.primary
    if (
        stripe_reads
        and Need.REFRESH not in done
        and held is not None
        and proposed.version <= held.version
        and dict(held.state) != dict(proposed.state)
    ):
        # Not newer than the ledger, and saying something else: with STRIPE_API_KEY, apply the
        # object as Stripe's API reads it now (broker.stripe_ledger.refresh). A repeat of the held
        # snapshot (invoice.paid, then invoice.payment_succeeded of the same second) needs no read.
        return Wants(Need.REFRESH, (own,))
    if (
        Need.LINE_ITEMS not in done
        and rules.needs_line_items(proposed)
        and not any(o.kind == "line_items" for o in reported.objects)
    ):
        items = line_items_id(own)
        if items not in s.objects_known:
            return Wants(Need.BASE, (items,))
        if items not in s.objects:
            return Wants(Need.LINE_ITEMS, (own,))
    if (
        stripe_reads
        and Need.ENTITLEMENTS not in done
        and proposed.kind == "entitlements"
        and proposed.state.get("partial")
        and proposed.customer is not None
    ):
        return Wants(Need.ENTITLEMENTS, (proposed.customer,))
    if stripe_reads and Need.INVOICE_PAYMENTS not in done and needs_invoice_payments(event, proposed, held):
        return Wants(Need.INVOICE_PAYMENTS, (own,))

    # The ledger objects.
    merged: dict[str, StripeObject] = {}
    links: set[tuple[str, str]] = set()
    verdicts = set()
    for obj in reported.objects:
        before = merged.get(obj.id) or s.objects.get(obj.id)
        after, verdict = merge(before, obj)
        verdicts.add(verdict)
        if after is not None:
            merged[obj.id] = after
            links |= {(obj.id, i) for i in obj.links - (before.links if before else frozenset())}

    # The binding: the event's ids and every id linked to them, transitively, that no license holds.
    license_id = resolution.license_id
    newly: set[str] = set()
    if license_id is not None:
        edges: dict[str, set[str]] = {}
        for a, b in links:
            edges.setdefault(a, set()).add(b)
            edges.setdefault(b, set()).add(a)
        frontier, seen = set(ids), set[str]()
        while frontier:
            unread = sorted(frontier - s.binding_known)
            fresh = {i for i in frontier if i not in s.bindings}
            unread += sorted(fresh - s.neighbours.keys() - set(unread))
            if unread:
                return Wants(Need.WALK, tuple(unread))
            newly |= fresh
            seen |= frontier
            frontier = {n for i in fresh for n in (*s.neighbours[i], *edges.get(i, ()))} - seen
        unread = sorted((newly - set(merged)) - s.objects_known)
        if unread:
            return Wants(Need.WALK, tuple(unread))

    licenses: set[str] = {license_id} if license_id is not None else set()
    customer = reported.customer
    if reported.customer_level and customer:
        if customer not in s.customer_licenses:
            return Wants(Need.CUSTOMER_LICENSES, (customer,))
        licenses |= s.customer_licenses[customer]
    unread = sorted(lid for lid in licenses if lid not in s.licenses and lid not in s.absent)
    if unread:
        return Wants(Need.LICENSES, tuple(unread))

    # Every license's objects as this event leaves them, and the customer-level objects of their customers.
    def object_of(i: str) -> StripeObject | None:
        return merged.get(i) or s.objects.get(i)

    bound: dict[str, list[StripeObject]] = {lid: [] for lid in licenses}
    for i, lid in s.bindings.items():
        if lid in bound and (found := object_of(i)) is not None:
            bound[lid].append(found)
    for i in newly:
        if license_id is not None and (found := object_of(i)) is not None:
            bound[license_id].append(found)
    by_customer = dict(s.by_customer)
    for obj in merged.values():
        if obj.customer and obj.kind in CUSTOMER_KINDS:
            by_customer[obj.customer] = {**by_customer.get(obj.customer, {}), obj.id: obj}
    customers = {o.customer for objs in bound.values() for o in objs if o.customer}
    unread = sorted(customers - s.customers_known)
    if unread:
        return Wants(Need.CUSTOMER_OBJECTS, tuple(unread))

    # Decided: nothing below asks for more.
    stale = verdicts == {OLDER}
    occurred_at = datetime.fromtimestamp(event["created"], UTC)
    appended: list[LicenseEvent] = []
    states: dict[str, tuple[int, LicenseState]] = {}
    for lid in sorted(licenses):
        if lid in s.licenses:
            seq, held_state = s.licenses[lid]
        else:
            seq, held_state = 0, initial_state()
            writes.created[lid] = (seq, held_state)
        own_objects = {o.id: o for o in bound[lid]}
        license_customers = sorted({o.customer for o in own_objects.values() if o.customer})
        level = {o.id: o for c in license_customers for o in by_customer.get(c, {}).values()}
        state = rules.derive({**level, **own_objects}.values())
        if state != held_state:
            seq += 1
            entry, logged = log_entry(
                lid,
                seq,
                state,
                stripe_event_id=event["id"],
                stripe_event_type=event["type"],
                occurred_at=occurred_at,
                recorded_at=writes.now,
            )
            writes.log.append(entry)
            writes.license(lid, seq, state)
            appended.append(logged)
        states[lid] = (seq, state)

    if not licenses:
        outcome = Outcome(OutcomeKind.STALE if stale else OutcomeKind.PENDING, object_id=own)
    else:
        kind = OutcomeKind.APPLIED if appended else (OutcomeKind.STALE if stale else OutcomeKind.UNCHANGED)
        outcome = Outcome(kind, license_id or min(licenses), tuple(appended), object_id=own)

    # The writes, and the snapshot moved on.
    writes.objects.update(merged)
    writes.links |= links
    s.add_objects(merged.values())
    s.objects_known |= merged.keys()
    for a, b in links:
        for x, y in ((a, b), (b, a)):
            if x in s.neighbours:
                s.neighbours[x].add(y)
    if newly:
        assert license_id is not None
        for i in sorted(newly):
            s.bindings[i] = writes.bindings[i] = license_id
        s.binding_known |= newly
        if license_id in s.claimed:
            s.claimed[license_id] |= {o.customer for i in newly if (o := object_of(i)) and o.customer}
        for i in newly:
            if (
                (o := object_of(i))
                and o.customer
                and o.kind not in CUSTOMER_KINDS
                and o.customer in s.customer_licenses
            ):
                s.customer_licenses[o.customer].add(license_id)
        waiting = newly - ids
        if customer:
            # Customer-level objects that waited for a license of their customer.
            waiting |= {customer, entitlements_id(customer)}
        if waiting:
            _link_pending(writes, license_id, waiting)
    for lid, held_row in states.items():
        s.licenses[lid] = held_row
        s.absent.discard(lid)
    return _record(s, writes, delivery, outcome)


def _link_pending(writes: Writes, license_id: str, object_ids: set[str]) -> None:
    """Pending events of these objects now count for the license: those recorded before (their rows
    are updated), and those of this transaction (their rows are written so)."""
    for object_id in object_ids:
        writes.linked[object_id] = license_id
    for i, row in enumerate(writes.events):
        if row["outcome"] == OutcomeKind.PENDING.value and row["object_id"] in object_ids:
            writes.events[i] = {**row, "outcome": OutcomeKind.LINKED.value, "license_id": license_id}


def with_objects(reported: Reported, *objects: StripeObject, first: StripeObject | None = None) -> Reported:
    """`reported` with objects read from Stripe's API: after its own, or in place of its primary."""
    head = (first,) if first is not None else reported.objects[:1]
    return replace(reported, objects=(*head, *reported.objects[1:], *objects))
