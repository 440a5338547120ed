"""Which license an event's objects belong to: the binding rule (`resolve`), the walks that read
and write the ledger's rows to apply it (`bind`, `resolve_event`, `fold`, `apply`), the rows they
read as a protocol (`LedgerRows`, `AsyncLedgerRows`), and the in-memory ledger (the migration that
creates the ledger, `license-broker rebuild`, and the property tests).

Binding: an object belongs to a license only through `metadata.license_id`, a Checkout Session's
`client_reference_id`, or a link from an object already bound. A customer id alone never picks a
license. Bindings are set once and never moved: a later claim on a bound object does not take it.

One walk, three kinds of rows. The walks are written once, as generators that yield what they
need (a `Step`: a read, or a write) and are sent the answer; they do no I/O themselves and stay as
pure as the rules in broker.stripe_ledger.ledger. `run` answers their steps from rows held in
memory (`MemoryRows`: MemoryLedger, the property tests, rebuild; and
`broker.ingest.decide.SnapshotRows`: the webhook's ingest, on the snapshot its transaction read,
both paths), `run_async` from rows in the database (`broker.stripe_ledger.store.SqlRows`:
`LedgerStore.bind`, a trial's binding). So the property tests of tests/test_ledger.py run the
walk production runs, and only the answering of each step differs, which tests/test_ledger_rows.py
checks on the same rows in real Postgres (and tests/test_ingest_differential.py through both
ingest paths).

Why generators, and not an async walk or a reader that preloads the neighbourhood: an async walk
would make every in-memory caller (the sync migration, the hypothesis tests) drive an event loop,
or rely on coroutines that happen never to suspend; a preloading reader would have to know the
walk's reach before walking (the component of links through unbound ids, which only the walk
finds), and would read the bindings of ids found by links before locking them, so it would have
to lock and read again. The generator keeps the walk's order of reads and writes exactly (each
id's lock is taken, by the SQL rows, before its binding is read) and costs one `send` per step.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Generator, Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal, Protocol, TypeVar, assert_never

from broker.stripe_ledger.kinds import CUSTOMER_KINDS
from broker.stripe_ledger.ledger import StripeObject, merge
from broker.stripe_ledger.objects import Reported, Unprocessable, report

TAKEOVER = "client_reference_id names a license of another customer"

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Resolution:
    license_id: str | None
    rejected: str | None = None  # the reason, when the event may not touch the license it names


def resolve(reported: Reported, bindings: Mapping[str, str], claimed_customers: Iterable[str] = ()) -> Resolution:
    """The license of an event's objects. `bindings` holds the known bindings of `reported.ids`;
    `claimed_customers` the customers already on the license the event names."""
    own = [o.id for o in reported.objects]
    bound = next((bindings[i] for i in own if i in bindings), None)
    if reported.license_id is not None:
        if bound is not None:
            return Resolution(bound)
        customers = set(claimed_customers)
        # A Payment Link lets anyone set client_reference_id: it may start a license, or add to one
        # of the same customer, never move another customer's license.
        if reported.by_reference and reported.customer and customers and reported.customer not in customers:
            return Resolution(None, TAKEOVER)
        return Resolution(reported.license_id)
    if bound is not None:
        return Resolution(bound)
    linked = sorted(bindings[i] for i in reported.ids if i in bindings)
    return Resolution(linked[0] if linked else None)


# -- the rows the walks read and write --------------------------------------------------------

# How the ids of a binding read are locked, on rows that lock (Postgres: advisory locks, taken in
# sorted order; memory and SQLite need none). "held": the caller holds their locks already (an
# event's ids, locked before anything is read). "given": ids the caller named, waited for.
# "found": ids the walk reached by links while other locks are held: waited for, or, when the
# rows were opened with wait=False, taken only if free (else LocksBusy: the caller rolls back and
# starts again holding them from the start, so that no two transactions wait for each other).
Lock = Literal["held", "given", "found"]


class LedgerRows(Protocol):
    """What the walks (and `derive`) read and write: the ledger's rows, as stripe_objects,
    stripe_links and stripe_bindings hold them. Every read sees the writes made before it."""

    def bindings(self, ids: AbstractSet[str], lock: Lock = "held") -> dict[str, str]:
        """The license of each of `ids` that is bound to one."""
        ...

    def neighbours(self, ids: AbstractSet[str]) -> set[str]:
        """Every id linked to one of `ids`, either way (a link is an edge, whoever named it)."""
        ...

    def objects(self, ids: AbstractSet[str]) -> dict[str, StripeObject]:
        """The objects held under these ids, with their links."""
        ...

    def customers_of(self, license_id: str) -> set[str]:
        """The customers of the objects bound to the license."""
        ...

    def licenses_of_customer(self, customer: str) -> set[str]:
        """The licenses that hold an object of this customer, customer-level objects aside."""
        ...

    def license_objects(self, license_id: str) -> dict[str, StripeObject]:
        """What the license is derived from: every object bound to it, and the customer-level
        objects of its objects' customers; by id. Their links may be left out (`derive` reads
        none; SqlRows leaves them out)."""
        ...

    def write_object(self, obj: StripeObject, new_links: AbstractSet[str]) -> None:
        """Store the object (replacing the one held) and add `new_links` (links only accumulate)."""
        ...

    def write_bindings(self, license_id: str, ids: AbstractSet[str]) -> None:
        """Bind `ids` to the license; an id bound meanwhile keeps its license."""
        ...


class AsyncLedgerRows(Protocol):
    """LedgerRows whose reads and writes are awaited (the database's)."""

    async def bindings(self, ids: AbstractSet[str], lock: Lock = "held") -> dict[str, str]: ...
    async def neighbours(self, ids: AbstractSet[str]) -> set[str]: ...
    async def objects(self, ids: AbstractSet[str]) -> dict[str, StripeObject]: ...
    async def customers_of(self, license_id: str) -> set[str]: ...
    async def licenses_of_customer(self, customer: str) -> set[str]: ...
    async def license_objects(self, license_id: str) -> dict[str, StripeObject]: ...
    async def write_object(self, obj: StripeObject, new_links: AbstractSet[str]) -> None: ...
    async def write_bindings(self, license_id: str, ids: AbstractSet[str]) -> None: ...


# The steps a walk yields: one per method of the protocol it needs, answered by `run` / `run_async`.


@dataclass(frozen=True, slots=True)
class ReadBindings:
    ids: frozenset[str]
    lock: Lock = "held"


@dataclass(frozen=True, slots=True)
class ReadNeighbours:
    ids: frozenset[str]


@dataclass(frozen=True, slots=True)
class ReadObjects:
    ids: frozenset[str]


@dataclass(frozen=True, slots=True)
class ReadCustomersOf:
    license_id: str


@dataclass(frozen=True, slots=True)
class ReadLicensesOfCustomer:
    customer: str


@dataclass(frozen=True, slots=True)
class WriteObject:
    obj: StripeObject
    new_links: frozenset[str]


@dataclass(frozen=True, slots=True)
class WriteBindings:
    license_id: str
    ids: frozenset[str]


Read = ReadBindings | ReadNeighbours | ReadObjects | ReadCustomersOf | ReadLicensesOfCustomer
Step = Read | WriteObject | WriteBindings
# A walk: yields steps, is sent each step's answer (as the protocol's method returns it), returns T.
Walk = Generator[Step, Any, T]


def _answer(rows: LedgerRows, step: Step) -> Any:
    # isinstance in the order of how often each step comes (a `match` on class patterns cost the
    # in-memory fold twice its time); mypy checks that every step is answered (assert_never).
    if isinstance(step, ReadBindings):
        return rows.bindings(step.ids, step.lock)
    if isinstance(step, ReadNeighbours):
        return rows.neighbours(step.ids)
    if isinstance(step, WriteBindings):
        return rows.write_bindings(step.license_id, step.ids)
    if isinstance(step, WriteObject):
        return rows.write_object(step.obj, step.new_links)
    if isinstance(step, ReadObjects):
        return rows.objects(step.ids)
    if isinstance(step, ReadCustomersOf):
        return rows.customers_of(step.license_id)
    if isinstance(step, ReadLicensesOfCustomer):
        return rows.licenses_of_customer(step.customer)
    assert_never(step)


async def _answer_async(rows: AsyncLedgerRows, step: Step) -> Any:
    # _answer, awaited.
    if isinstance(step, ReadBindings):
        return await rows.bindings(step.ids, step.lock)
    if isinstance(step, ReadNeighbours):
        return await rows.neighbours(step.ids)
    if isinstance(step, WriteBindings):
        return await rows.write_bindings(step.license_id, step.ids)
    if isinstance(step, WriteObject):
        return await rows.write_object(step.obj, step.new_links)
    if isinstance(step, ReadObjects):
        return await rows.objects(step.ids)
    if isinstance(step, ReadCustomersOf):
        return await rows.customers_of(step.license_id)
    if isinstance(step, ReadLicensesOfCustomer):
        return await rows.licenses_of_customer(step.customer)
    assert_never(step)


def run(walk: Walk[T], rows: LedgerRows) -> T:
    """Walk on rows held in memory. An exception of the rows ends the walk (it holds nothing to
    release) and propagates to the caller."""
    try:
        step = next(walk)
        while True:
            step = walk.send(_answer(rows, step))
    except StopIteration as done:
        result: T = done.value
        return result


async def run_async(walk: Walk[T], rows: AsyncLedgerRows) -> T:
    """Walk on rows in the database, inside the caller's transaction (as `run`)."""
    try:
        step = next(walk)
        while True:
            step = walk.send(await _answer_async(rows, step))
    except StopIteration as done:
        result: T = done.value
        return result


# -- the walks --------------------------------------------------------------------------------


def bind(license_id: str, start: AbstractSet[str], known: Mapping[str, str]) -> Walk[set[str]]:
    """Bind `start` and every id linked to it, transitively, that no license holds yet; returns
    the ids bound just now. `known`: bindings already read (and locked) in this transaction, not
    read again. Ids of `start` not in `known` are read with lock "given", ids reached by links
    with lock "found".

    Guarantee: whatever order the events of a license arrive in, the objects linked to it end
    bound to it (tests/test_ledger.py, tests/test_license_scenarios.py: pending objects join
    their license when the event that binds one of their ids arrives). Invariant it relies on and
    keeps: the ids linked to a bound id are bound too (each id bound here has its links
    followed, and an event's own links are in its `ids`, the start of its walk), so the walk
    follows only ids bound just now, and an id held by another license stops it (never moved)."""
    frontier, seen, newly = set(start), set[str](), set[str]()
    while frontier:
        unknown = frontier - known.keys()
        owners = {i: known[i] for i in frontier if i in known}
        if unknown:
            owners |= yield ReadBindings(frozenset(unknown), "found" if seen else "given")
        fresh = frontier - owners.keys()
        if fresh:
            yield WriteBindings(license_id, frozenset(fresh))
            newly |= fresh
        seen |= frontier
        frontier = (set((yield ReadNeighbours(frozenset(fresh)))) if fresh else set()) - seen
    return newly


@dataclass(frozen=True, slots=True)
class Resolved:
    resolution: Resolution
    known: Mapping[str, str]  # the bindings of the event's ids, as read (under their locks)

    @property
    def license_id(self) -> str | None:
        return self.resolution.license_id


def resolve_event(reported: Reported) -> Walk[Resolved]:
    """The license of the event's objects (`resolve`) on the rows: the bindings of its ids (their
    locks held by the caller), and for a Payment Link's claim, the customers of the license it
    names (the takeover check).

    Guarantee: a bound object keeps its license whatever a later event names; a customer id alone
    never picks a license; a Payment Link's client_reference_id never moves another customer's
    license (tests/test_ledger.py::test_a_payment_link_of_another_customer_cannot_take_a_license)."""
    known: dict[str, str] = yield ReadBindings(frozenset(reported.ids))
    claimed: set[str] = set()
    # Read only where `resolve` weighs them: a named license, claimed by a Payment Link, for
    # objects no license holds yet (a bound object keeps its license, whoever claims it).
    unbound = not any(o.id in known for o in reported.objects)
    if reported.license_id and reported.by_reference and reported.customer and unbound:
        claimed = yield ReadCustomersOf(reported.license_id)
    return Resolved(resolve(reported, known, claimed), known)


@dataclass(frozen=True, slots=True)
class Folded:
    verdicts: frozenset[str]  # merge's verdict per object: {OLDER} when the event is stale
    licenses: set[str]  # the licenses the event may have changed, to derive again
    newly: set[str]  # the ids bound just now (pending objects among them joined the license)


def fold(reported: Reported, resolved: Resolved, current: Mapping[str, StripeObject]) -> Walk[Folded]:
    """Fold the event's objects into the rows (`merge`), then bind (`bind`) when it has a license.
    `current`: the rows of its objects, read after `resolve_event` (the caller may complete the
    event from Stripe's API in between: broker.ingest.decide).

    Guarantee: each object ends as the maximum of its snapshots whatever order they arrive in
    (broker.stripe_ledger.ledger.merge), and its links only accumulate; the objects are written
    before the walk, so it follows the links this event adds."""
    held = dict(current)
    verdicts: set[str] = set()
    for obj in reported.objects:
        before = held.get(obj.id)
        merged, verdict = merge(before, obj)
        verdicts.add(verdict)
        if merged is not None:
            held[obj.id] = merged
            yield WriteObject(merged, frozenset(obj.links - (before.links if before else frozenset())))
    licenses: set[str] = set()
    newly: set[str] = set()
    if resolved.license_id is not None:
        licenses.add(resolved.license_id)
        newly = yield from bind(resolved.license_id, reported.ids, resolved.known)
    if reported.customer_level and reported.customer:
        # A customer-level object (entitlements, a deleted customer) moves every license of its customer.
        licenses |= yield ReadLicensesOfCustomer(reported.customer)
    return Folded(frozenset(verdicts), licenses, newly)


def apply(reported: Reported) -> Walk[Folded | None]:
    """An event on the rows: resolve, fold; None when it is rejected (nothing written). What the
    ingest does, but for reading from Stripe's API between the two (broker.ingest.decide)."""
    resolved = yield from resolve_event(reported)
    if resolved.resolution.rejected:
        return None
    current = yield ReadObjects(frozenset(o.id for o in reported.objects))
    return (yield from fold(reported, resolved, current))


# -- the rows in memory -----------------------------------------------------------------------


@dataclass
class MemoryLedger:
    """The ledger held in memory, built by folding events in any order."""

    objects: dict[str, StripeObject] = field(default_factory=dict)
    bindings: dict[str, str] = field(default_factory=dict)
    neighbours: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))

    @cached_property
    def rows(self) -> MemoryRows:
        return MemoryRows(self)

    def apply(self, event: Mapping[str, Any]) -> set[str]:
        """Fold one event (the walk the webhook runs); the licenses it may have changed."""
        try:
            reported = report(event)
        except Unprocessable:
            return set()
        if reported is None:
            return set()
        folded = run(apply(reported), self.rows)
        return folded.licenses if folded is not None else set()

    def seed(self, objects: Iterable[StripeObject]) -> None:
        """Start from these rows (unbound): what no event carries (broker.stripe_ledger.fill)."""
        for obj in objects:
            self.rows.write_object(obj, obj.links)

    def bind(self, license_id: str, start: Iterable[str]) -> set[str]:
        """`bind` on these rows, knowing no binding beforehand."""
        return run(bind(license_id, set(start), {}), self.rows)

    def customers_of(self, license_id: str) -> set[str]:
        return self.rows.customers_of(license_id)

    def licenses_of_customer(self, customer: str) -> set[str]:
        return self.rows.licenses_of_customer(customer)

    def objects_of(self, license_id: str) -> list[StripeObject]:
        """What the license is derived from (LedgerRows.license_objects)."""
        return list(self.rows.license_objects(license_id).values())

    def links(self) -> set[tuple[str, str]]:
        return {(o.id, linked) for o in self.objects.values() for linked in o.links}


@dataclass(frozen=True, slots=True)
class MemoryRows:
    """LedgerRows on a MemoryLedger's dicts (its attributes stay the dicts fill.py writes out)."""

    ledger: MemoryLedger

    def bindings(self, ids: AbstractSet[str], lock: Lock = "held") -> dict[str, str]:
        held = self.ledger.bindings  # one process, nothing to lock
        return {i: held[i] for i in ids if i in held}

    def neighbours(self, ids: AbstractSet[str]) -> set[str]:
        linked = self.ledger.neighbours
        return {n for i in ids for n in linked.get(i, ())}

    def objects(self, ids: AbstractSet[str]) -> dict[str, StripeObject]:
        held = self.ledger.objects
        return {i: held[i] for i in ids if i in held}

    def _bound(self, license_id: str) -> list[StripeObject]:
        bindings = self.ledger.bindings
        return [o for o in self.ledger.objects.values() if bindings.get(o.id) == license_id]

    def customers_of(self, license_id: str) -> set[str]:
        return {o.customer for o in self._bound(license_id) if o.customer}

    def licenses_of_customer(self, customer: str) -> set[str]:
        bindings = self.ledger.bindings
        return {
            bindings[o.id]
            for o in self.ledger.objects.values()
            if o.customer == customer and o.kind not in CUSTOMER_KINDS and o.id in bindings
        }

    def license_objects(self, license_id: str) -> dict[str, StripeObject]:
        own = self._bound(license_id)
        customers = {o.customer for o in own if o.customer}
        shared = [o for o in self.ledger.objects.values() if o.kind in CUSTOMER_KINDS and o.customer in customers]
        return {o.id: o for o in (*shared, *own)}

    def write_object(self, obj: StripeObject, new_links: AbstractSet[str]) -> None:
        self.ledger.objects[obj.id] = obj
        for linked in new_links:
            self.ledger.neighbours[obj.id].add(linked)
            self.ledger.neighbours[linked].add(obj.id)

    def write_bindings(self, license_id: str, ids: AbstractSet[str]) -> None:
        for i in ids:
            self.ledger.bindings.setdefault(i, license_id)
