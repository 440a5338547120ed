"""Which license an event's objects belong to, and the in-memory ledger that folds stored events
(the migration that creates the ledger, `license-broker rebuild`, and the property tests).

Binding: an object belongs to a license only through `metadata.license_id`, a Checkout Session's
`client_reference_id`, or a link from an object already bound. A customer id alone never picks a
license. Bindings are set once and never moved: a later claim on a bound object does not take it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from broker.stripe_ledger.ledger import CUSTOMER_KINDS, StripeObject, merge
from broker.stripe_ledger.objects import Reported, Unprocessable, report

TAKEOVER = "client_reference_id names a license of another customer"


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


@dataclass
class MemoryLedger:
    """The ledger held in memory, built by folding events in any order."""

    objects: dict[str, StripeObject] = field(default_factory=dict)
    bindings: dict[str, str] = field(default_factory=dict)
    neighbours: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))

    def apply(self, event: Mapping[str, Any]) -> set[str]:
        """Fold one event; the licenses it may have changed."""
        try:
            reported = report(event)
        except Unprocessable:
            return set()
        if reported is None:
            return set()
        claimed = self.customers_of(reported.license_id) if reported.license_id else set()
        resolution = resolve(reported, self.bindings, claimed)
        if resolution.rejected:
            return set()
        for obj in reported.objects:
            merged, _ = merge(self.objects.get(obj.id), obj)
            if merged is not None:
                self.objects[obj.id] = merged
            for linked in obj.links:
                self.neighbours[obj.id].add(linked)
                self.neighbours[linked].add(obj.id)
        touched: set[str] = set()
        if resolution.license_id is not None:
            self.bind(resolution.license_id, reported.ids)
            touched.add(resolution.license_id)
        if reported.customer_level and reported.customer:
            touched |= self.licenses_of_customer(reported.customer)
        return touched

    def seed(self, objects: Iterable[StripeObject]) -> None:
        """Start from these rows (unbound): what no event carries (broker.stripe_ledger.fill)."""
        for obj in objects:
            self.objects[obj.id] = obj
            for linked in obj.links:
                self.neighbours[obj.id].add(linked)
                self.neighbours[linked].add(obj.id)

    def bind(self, license_id: str, start: Iterable[str]) -> set[str]:
        """As LedgerStore.bind: binds what no license holds, following the links of what it binds."""
        frontier, seen, newly = set(start), set[str](), set[str]()
        while frontier:
            seen |= frontier
            fresh = {i for i in frontier if i not in self.bindings}
            self.bindings.update(dict.fromkeys(fresh, license_id))
            newly |= fresh
            frontier = {n for i in fresh for n in self.neighbours.get(i, ())} - seen
        return newly

    def customers_of(self, license_id: str) -> set[str]:
        return {o.customer for o in self.objects_of(license_id, customer_level=False) if o.customer}

    def licenses_of_customer(self, customer: str) -> set[str]:
        return {
            self.bindings[o.id]
            for o in self.objects.values()
            if o.customer == customer and o.kind not in CUSTOMER_KINDS and o.id in self.bindings
        }

    def objects_of(self, license_id: str, *, customer_level: bool = True) -> list[StripeObject]:
        own = [o for o in self.objects.values() if self.bindings.get(o.id) == license_id]
        if not customer_level:
            return own
        customers = {o.customer for o in own if o.customer}
        return own + [o for o in self.objects.values() if o.kind in CUSTOMER_KINDS and o.customer in customers]

    def links(self) -> set[tuple[str, str]]:
        return {(o.id, linked) for o in self.objects.values() for linked in o.links}
