"""broker.ingest.decide without a database: what it asks for, what it writes, how a batch moves
its snapshot on (the two paths that feed it: tests/test_ingest_differential.py), and the rows it
runs broker.stripe_ledger.binding's walk on (SnapshotRows: the memory rows' answers, or Missing)."""

from __future__ import annotations

import copy
import random
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.ingest.decide import Delivery, Missing, Need, Snapshot, SnapshotRows, Wants, decide
from broker.ingest.outcomes import Outcome, OutcomeKind
from broker.storage.licenses import initial_state
from broker.stripe_ledger.binding import MemoryLedger
from broker.stripe_ledger.ledger import LicenseRules
from broker.stripe_ledger.objects import report
from tests.stripe_objects import SHAPES, Shape
from tests.test_ledger_rows import events_of
from webhook.samples import SampleEvents

RULES = LicenseRules(["trialing", "active", "past_due"])
NOW = datetime(2026, 12, 3, tzinfo=UTC)
T = 1_790_000_000


def delivery(event: dict[str, Any]) -> Delivery:
    reported = report(event)
    assert reported is not None
    return Delivery(event, orjson.dumps(event), reported)


def test_an_empty_snapshot_asks_for_the_events_ids_first_and_writes_nothing() -> None:
    event = SampleEvents("lic_d").subscription_event("customer.subscription.updated", "active", T)
    d = delivery(event)
    decision = decide([d], Snapshot(), RULES, now=NOW, stripe_reads=False)
    assert decision.results == [Wants(Need.BASE, tuple(sorted(d.reported.ids)))]
    assert not decision.writes.events and not decision.writes.objects


def test_a_new_license_is_created_bound_and_logged_and_the_next_event_decides_on_it() -> None:
    sample = SampleEvents("lic_d")
    first = sample.subscription_event("customer.subscription.updated", "active", T)
    second = sample.subscription_event("customer.subscription.updated", "past_due", T + 1)
    d1, d2 = delivery(first), delivery(second)
    ids = d1.reported.ids | d2.reported.ids
    # What the batched READ gives for ids no object or link holds, and a license not there yet.
    snapshot = Snapshot(binding_known=set(ids), objects_known=set(ids), absent={"lic_d"})
    walk = decide([d1], snapshot, RULES, now=NOW, stripe_reads=False)
    assert [type(r) for r in walk.results] == [Wants] and walk.results[0].need is Need.WALK  # type: ignore[union-attr]
    snapshot.neighbours = {i: set() for i in ids}
    (wants,) = decide([d1], snapshot, RULES, now=NOW, stripe_reads=False).results
    assert wants == Wants(Need.CUSTOMER_OBJECTS, (str(d1.reported.customer),))
    snapshot.customers_known.add(str(d1.reported.customer))  # (it has none)
    decision = decide([d1, d2, d1], snapshot, RULES, now=NOW, stripe_reads=False)

    outcomes = decision.results
    assert all(isinstance(o, Outcome) for o in outcomes)
    assert [(o.kind, o.license_id, o.event.seq if o.event else None) for o in outcomes] == [  # type: ignore[union-attr]
        (OutcomeKind.APPLIED, "lic_d", 1),
        (OutcomeKind.APPLIED, "lic_d", 2),
        (OutcomeKind.DUPLICATE, None, None),
    ]
    writes = decision.writes
    assert set(writes.created) == {"lic_d"} and writes.licenses == {}
    assert writes.created["lic_d"][0] == 2 and writes.created["lic_d"][1]["status"] == "past_due"
    assert set(writes.bindings) == d1.reported.ids and set(writes.bindings.values()) == {"lic_d"}
    assert [(row["seq"], row["status"]) for row in writes.log] == [(1, "active"), (2, "past_due")]
    assert [row["outcome"] for row in writes.events] == ["applied", "applied"]
    assert snapshot.licenses["lic_d"][0] == 2 and not snapshot.absent


def test_a_license_named_by_a_payment_link_asks_for_its_customers_before_deciding() -> None:
    event = SampleEvents("lic_d").checkout_completed(T)
    event["data"]["object"]["metadata"] = {}
    event["data"]["object"]["client_reference_id"] = "lic_d"
    d = delivery(event)
    assert d.reported.by_reference
    snapshot = Snapshot(binding_known=set(d.reported.ids), objects_known=set(d.reported.ids))
    (wants,) = decide([d], snapshot, RULES, now=NOW, stripe_reads=False).results
    assert wants == Wants(Need.CLAIMED, ("lic_d",))
    snapshot.claimed["lic_d"] = {"cus_someone_else"}
    (rejected,) = decide([d], snapshot, RULES, now=NOW, stripe_reads=False).results
    assert isinstance(rejected, Outcome) and rejected.kind is OutcomeKind.REJECTED


def test_an_event_that_misses_rows_midway_leaves_the_snapshot_and_the_writes_as_they_were() -> None:
    """The walk stages its writes (the objects, the new binding) before it reaches what the
    snapshot lacks (the links of the ids it binds): none of them reaches the snapshot or Writes."""
    d = delivery(SampleEvents("lic_d").subscription_event("customer.subscription.updated", "active", T))
    ids = d.reported.ids
    snapshot = Snapshot(binding_known=set(ids), objects_known=set(ids), absent={"lic_d"})
    before = copy.deepcopy(snapshot)
    decision = decide([d], snapshot, RULES, now=NOW, stripe_reads=False)
    assert decision.results == [Wants(Need.WALK, tuple(sorted(ids)))]
    assert snapshot == before
    writes = decision.writes
    assert not (writes.events or writes.objects or writes.links or writes.bindings or writes.created or writes.log)


def full_snapshot(ledger: MemoryLedger) -> Snapshot:
    """A snapshot that read every row of the ledger (as the general path leaves it once it has
    read all a walk can reach)."""
    ids = {i for o in ledger.objects.values() for i in (o.id, *o.links)} | set(ledger.bindings)
    rows = ledger.rows
    licenses = set(ledger.bindings.values())
    customers = {c for o in ledger.objects.values() if (c := o.customer)}
    snapshot = Snapshot(
        bindings=dict(ledger.bindings),
        binding_known=set(ids),
        objects_known=set(ids),
        neighbours={i: set(ledger.neighbours.get(i, ())) for i in ids},
        licenses={lid: (0, initial_state()) for lid in licenses},
        claimed={lid: rows.customers_of(lid) for lid in licenses},
        customer_licenses={c: rows.licenses_of_customer(c) for c in customers},
        customers_known=customers,
    )
    snapshot.add_objects(ledger.objects.values())
    return snapshot


@settings(max_examples=25, deadline=None)
@given(st.sampled_from(SHAPES), st.randoms(use_true_random=False))
def test_snapshot_rows_answer_every_read_as_the_memory_rows_and_raise_for_rows_not_read(
    shape: Shape, rng: random.Random
) -> None:
    ledger = MemoryLedger()
    for event in events_of(shape, rng):
        ledger.apply(event)
    memory = ledger.rows
    rows = SnapshotRows(full_snapshot(ledger))
    ids = {i for o in ledger.objects.values() for i in (o.id, *o.links)}
    for wanted in (ids, set(), *(set(rng.sample(sorted(ids), k)) for k in (1, 2, 5))):
        assert rows.bindings(wanted) == memory.bindings(wanted)
        assert rows.neighbours(wanted) == memory.neighbours(wanted)
        assert rows.objects(wanted) == memory.objects(wanted)
    for license_id in sorted(set(ledger.bindings.values())):
        assert rows.customers_of(license_id) == memory.customers_of(license_id)
        assert rows.license_objects(license_id) == memory.license_objects(license_id)
    for customer in sorted({c for o in ledger.objects.values() if (c := o.customer)}):
        assert rows.licenses_of_customer(customer) == memory.licenses_of_customer(customer)
    for read, need in (
        (lambda: rows.bindings({"sub_unread"}), Need.BASE),
        (lambda: rows.bindings({"sub_unread"}, "found"), Need.WALK),
        (lambda: rows.neighbours({"sub_unread"}), Need.WALK),
        (lambda: rows.objects({"sub_unread"}), Need.BASE),
        (lambda: rows.customers_of("lic_unread"), Need.CLAIMED),
        (lambda: rows.licenses_of_customer("cus_unread"), Need.CUSTOMER_LICENSES),
        (lambda: rows.license_objects("lic_unread"), Need.LICENSES),
    ):
        with pytest.raises(Missing) as missing:
            read()
        assert missing.value.need is need
