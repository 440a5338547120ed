"""The ingest's decision, written once: what a transaction writes for its events, and their
outcomes, from a snapshot of what it read with its locks held. No I/O here.

Two readers fill the snapshot (broker.ingest.general: per event through SQLAlchemy, asking for
more as `decide` names it; broker.ingest.batched: the READ round trip, for several events at
once), and two writers flush the writes (SQLAlchemy statements; the batched WRITE statement).
When the snapshot lacks something an event needs (`Wants`), the general path reads it and decides
again; the batched path gives the event to the general path, nothing of it written.

Which license an event's objects belong to is decided by the binding walks of
broker.stripe_ledger.binding (`resolve_event`, `fold`), the ones the SQL ledger and the in-memory
ledger of the property tests run, here on `SnapshotRows`: the snapshot's rows, with the event's
writes staged until it is decided. A read the snapshot cannot answer raises `Missing`, which
`decide_event` returns as `Wants`.

The order `decide_event` asks in is the general path's lock order: the event's ids, then the ids a
new binding walks to, then the license rows (sorted), all at once; what it asks after those takes
no lock."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
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
from broker.stripe_ledger.binding import Lock, fold, resolve_event, run
from broker.stripe_ledger.kinds import CUSTOMER_KINDS
from broker.stripe_ledger.ledger import OLDER, LicenseRules, StripeObject, line_items_id
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


class Missing(Exception):
    """A read of SnapshotRows the snapshot cannot answer: `decide_event` asks for it (Wants)."""

    def __init__(self, need: Need, ids: Iterable[str]) -> None:
        super().__init__(need, ids)
        self.need = need
        self.ids = tuple(sorted(ids))


class SnapshotRows:
    """broker.stripe_ledger.binding's LedgerRows on a Snapshot, for one event: its reads answer
    from the snapshot and the writes of the event made before them, or raise Missing when the
    snapshot did not read the rows (the general path reads them and decides again; the batched
    path gives the event to the general path). Its writes are staged until `commit`, when the
    event is decided: an event that raises midway leaves the snapshot and Writes as they were.

    What each read answers from: bindings, the snapshot's (the batched READ: the batch's ids and
    every member of their licenses), any other id raises (BASE for an event's ids, WALK for the
    ids a walk reaches); neighbours, the links the snapshot read (none, in the batched READ, for an
    unbound id no object or link holds; an entangled id raises) and the links written in this
    batch; customers_of, the claimed customers read for a Payment Link's license; licenses_of_customer,
    the licenses read for a customer (the batched READ reads none: customer-level events are not
    eligible there); license_objects, every id bound to the license (all read with its row) and the
    customer-level objects of their customers."""

    __slots__ = ("links", "new_bindings", "new_license", "new_objects", "snapshot")

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        self.new_objects: dict[str, StripeObject] = {}
        self.links: set[tuple[str, str]] = set()
        self.new_bindings: set[str] = set()
        self.new_license: str | None = None  # an event binds to one license

    def _object(self, i: str) -> StripeObject | None:
        return self.new_objects.get(i) or self.snapshot.objects.get(i)

    def bindings(self, ids: AbstractSet[str], lock: Lock = "held") -> dict[str, str]:
        s = self.snapshot
        unread = ids - s.binding_known - self.new_bindings
        if unread:
            raise Missing(Need.BASE if lock == "held" else Need.WALK, unread)
        found = {i: s.bindings[i] for i in ids if i in s.bindings}
        if self.new_license is not None:
            found |= {i: self.new_license for i in ids & self.new_bindings if i not in found}
        return found

    def neighbours(self, ids: AbstractSet[str]) -> set[str]:
        s = self.snapshot
        # The walk binds these ids: their objects are read with their links (WALK).
        unread = {i for i in ids if i not in s.neighbours or (i not in s.objects_known and i not in self.new_objects)}
        if unread:
            raise Missing(Need.WALK, unread)
        found = {n for i in ids for n in s.neighbours[i]}
        for a, b in self.links:
            if a in ids:
                found.add(b)
            if b in ids:
                found.add(a)
        return found

    def objects(self, ids: AbstractSet[str]) -> dict[str, StripeObject]:
        s = self.snapshot
        unread = ids - s.objects_known - self.new_objects.keys()
        if unread:
            raise Missing(Need.BASE, unread)
        return {i: o for i in ids if (o := self._object(i)) is not None}

    def customers_of(self, license_id: str) -> set[str]:
        claimed = self.snapshot.claimed.get(license_id)
        if claimed is None:
            raise Missing(Need.CLAIMED, (license_id,))
        return claimed | self._new_customers(license_id)

    def _new_customers(self, license_id: str) -> set[str]:
        if self.new_license != license_id:
            return set()
        return {o.customer for i in self.new_bindings if (o := self._object(i)) and o.customer}

    def licenses_of_customer(self, customer: str) -> set[str]:
        held = self.snapshot.customer_licenses.get(customer)
        if held is None:
            raise Missing(Need.CUSTOMER_LICENSES, (customer,))
        if self.new_license is not None and any(
            (o := self._object(i)) and o.customer == customer and o.kind not in CUSTOMER_KINDS
            for i in self.new_bindings
        ):
            return held | {self.new_license}
        return held

    def license_objects(self, license_id: str) -> dict[str, StripeObject]:
        s = self.snapshot
        if license_id not in s.licenses and license_id not in s.absent:
            raise Missing(Need.LICENSES, (license_id,))
        own = {i: o for i, lid in s.bindings.items() if lid == license_id and (o := self._object(i)) is not None}
        if self.new_license == license_id:
            own |= {i: o for i in self.new_bindings if (o := self._object(i)) is not None}
        customers = {o.customer for o in own.values() if o.customer}
        unread = customers - s.customers_known
        if unread:
            raise Missing(Need.CUSTOMER_OBJECTS, unread)
        level: dict[str, StripeObject] = {}
        for c in sorted(customers):
            level |= s.by_customer.get(c, {})
        for obj in self.new_objects.values():
            if obj.customer in customers and obj.kind in CUSTOMER_KINDS:
                level[obj.id] = obj
        return level | own

    def write_object(self, obj: StripeObject, new_links: AbstractSet[str]) -> None:
        self.new_objects[obj.id] = obj
        self.links |= {(obj.id, i) for i in new_links}

    def write_bindings(self, license_id: str, ids: AbstractSet[str]) -> None:
        assert self.new_license in (None, license_id), "an event binds to one license"
        self.new_license = license_id
        self.new_bindings |= ids - self.snapshot.bindings.keys()

    def commit(self, writes: Writes) -> None:
        """The event decided: its writes go to `writes`, and the snapshot moves on."""
        s = self.snapshot
        writes.objects.update(self.new_objects)
        writes.links |= self.links
        s.add_objects(self.new_objects.values())
        s.objects_known |= self.new_objects.keys()
        for a, b in self.links:
            for x, y in ((a, b), (b, a)):
                if x in s.neighbours:
                    s.neighbours[x].add(y)
        license_id = self.new_license
        if license_id is None or not self.new_bindings:
            return
        newly = self.new_bindings
        if license_id in s.claimed:
            s.claimed[license_id] |= self._new_customers(license_id)
        for i in sorted(newly):
            s.bindings[i] = writes.bindings[i] = license_id
        s.binding_known |= newly
        for i in newly:
            if (
                (o := self._object(i))
                and o.customer
                and o.kind not in CUSTOMER_KINDS
                and o.customer in s.customer_licenses
            ):
                s.customer_licenses[o.customer].add(license_id)


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
    own = reported.primary.id
    # The event's writes are staged on `rows` until it is decided: a Missing midway leaves nothing.
    rows = SnapshotRows(s)
    try:
        resolved = run(resolve_event(reported), rows)
    except Missing as missing:
        return Wants(missing.need, missing.ids)
    resolution = resolved.resolution
    if resolution.rejected:
        return _record(
            s,
            writes,
            delivery,
            Outcome(OutcomeKind.REJECTED, reported.license_id, reason=resolution.rejected, object_id=own),
        )
    # The event's own objects, and a one-time Checkout's line items (read from Stripe's API below
    # when no row holds them).
    wanted = {o.id for o in reported.objects}
    items = None
    if (
        Need.LINE_ITEMS not in done
        and rules.needs_line_items(reported.primary)
        and not any(o.kind == "line_items" for o in reported.objects)
    ):
        items = line_items_id(own)
        wanted.add(items)
    try:
        current = rows.objects(wanted)
    except Missing as missing:
        return Wants(missing.need, missing.ids)

    # Reads from Stripe's API the general path makes (the batched one gives such an event to it).
    held, proposed = current.get(own), reported.primary
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
    if items is not None and items not in current:
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

    # The ledger objects, and the binding: broker.stripe_ledger.binding's walk, on the snapshot.
    try:
        folded = run(fold(reported, resolved, current), rows)
        license_id = resolution.license_id
        licenses = folded.licenses
        # The license rows, locked after the ids the walk reached: all at once (sorted).
        unread = sorted(lid for lid in licenses if lid not in s.licenses and lid not in s.absent)
        if unread:
            return Wants(Need.LICENSES, tuple(unread))
        # Every license's objects as this event leaves them, and the customer-level objects of their customers.
        derived = {lid: rows.license_objects(lid) for lid in sorted(licenses)}
    except Missing as missing:
        return Wants(missing.need, missing.ids)

    # Decided: nothing below asks for more.
    stale = folded.verdicts == {OLDER}
    occurred_at = datetime.fromtimestamp(event["created"], UTC)
    appended: list[LicenseEvent] = []
    states: dict[str, tuple[int, LicenseState]] = {}
    for lid, objects in derived.items():
        if lid in s.licenses:
            seq, held_state = s.licenses[lid]
        else:
            seq, held_state = 0, initial_state()
            writes.created[lid] = (seq, held_state)
        state = rules.derive(objects.values())
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
    rows.commit(writes)
    newly = folded.newly
    if newly:
        assert license_id is not None
        # Every id this event bound, its own included: their events recorded before (pending:
        # no license yet) now count for it (a Checkout Session naming a subscription whose
        # `customer.subscription.created` came first).
        waiting = set(newly)
        if reported.customer:
            # Customer-level objects that waited for a license of their customer.
            waiting |= {reported.customer, entitlements_id(reported.customer)}
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
