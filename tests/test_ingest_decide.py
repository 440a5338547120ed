"""broker.ingest.decide without a database: what it asks for, what it writes, how a batch moves
its snapshot on (the two paths that feed it: tests/test_ingest_differential.py), and the rows it
runs broker.stripe_ledger.binding's walk on (SnapshotRows: the memory rows' answers, or Missing)."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import logging
import random
import re
from dataclasses import replace
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import orjson
import psycopg
import pytest
import sqlalchemy as sa
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY
from sqlalchemy.dialects import postgresql, sqlite

from broker.ingest import batched, general
from broker.ingest.decide import (
    REASON_LENGTH,
    STRIPE_READS,
    Delivery,
    Missing,
    Need,
    Snapshot,
    SnapshotRows,
    Wants,
    Writes,
    _event_row,
    _link_pending,
    decide,
    decide_event,
    with_objects,
)
from broker.ingest.errors import IngestRefused, IngestUnavailable, database_errors
from broker.ingest.general import LOCK_ATTEMPTS, GeneralIngest
from broker.ingest.outcomes import DUPLICATE, Outcome, OutcomeKind
from broker.ingest.records import _payload, envelope_problem, mark_linked, record, set_outcome, unmatched_events
from broker.ingest.service import Ingestor
from broker.ingest.statements import BINDINGS, CREATED, EVENTS, LICENSES, LINKS, LOG, OBJECTS, WRITE, Rows
from broker.storage.eventlog import LicenseEvent
from broker.storage.licenses import initial_state
from broker.stripe_ledger.binding import TAKEOVER, MemoryLedger
from broker.stripe_ledger.ledger import FETCHED_RANK, Kind, LicenseRules, StripeObject, line_items_id
from broker.stripe_ledger.objects import (
    MAX_CREATED,
    MAX_ID,
    EventFilter,
    Reported,
    complete_entitlements,
    invoice_payments,
    line_items,
    report,
)
from broker.stripe_ledger.refresh import NoRefresh, StripeUnavailable
from broker.stripe_ledger.store import LedgerStore, LocksBusy
from tests.stripe_objects import SHAPES, Shape
from tests.support.waiting import async_wait_until
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


# -- each rule on its own, from ledger rows ----------------------------------------------------
# The decision reads a Snapshot and a Reported (what an event reports: ledger rows); these tests
# build both directly, one rule and its boundary at a time, without a database (docs/testing.md:
# the story tests above reach most rules without checking them).

CUS = "cus_1"


def row(
    object_id: str,
    kind: Kind = "subscription",
    version: int = T,
    customer: str | None = CUS,
    links: tuple[str, ...] = (),
    **state: Any,
) -> StripeObject:
    return StripeObject(object_id, kind, version, 0, state or {"status": "active"}, customer, frozenset(links))


def sent(
    *objects: StripeObject,
    license_id: str | None = "lic_1",
    event_id: str = "evt_1",
    created: int = T,
    event_type: str = "customer.subscription.updated",
    by_reference: bool = False,
    customer_level: bool = False,
    **envelope: Any,
) -> Delivery:
    """A delivery of an event reporting these rows (the first its own), without a body."""
    reported = Reported(objects, license_id, by_reference=by_reference, customer_level=customer_level)
    return Delivery({"id": event_id, "type": event_type, "created": created, **envelope}, None, reported)


def ready(*deliveries: Delivery, licenses: dict[str, tuple[int, Any]] | None = None) -> Snapshot:
    """What a transaction reads for these events when no row holds their ids: every id known unbound
    with no object and no link, the licenses they name absent, their customers without objects."""
    ids = {i for d in deliveries for i in d.reported.ids}
    named = {lid for d in deliveries if (lid := d.reported.license_id)}
    return Snapshot(
        binding_known=set(ids),
        objects_known=set(ids),
        neighbours={i: set() for i in ids},
        licenses=dict(licenses or {}),
        absent=named - set(licenses or {}),
        customers_known={c for d in deliveries if (c := d.reported.customer)},
    )


def decided(
    d: Delivery,
    snapshot: Snapshot,
    rules: LicenseRules = RULES,
    *,
    stripe_reads: bool = False,
    done: frozenset[Need] = frozenset(),
) -> tuple[Outcome | Wants, Writes]:
    writes = Writes(NOW)
    return decide_event(d, snapshot, writes, rules, stripe_reads=stripe_reads, done=done), writes


def test_a_snapshot_files_customer_level_objects_under_their_customer_only() -> None:
    """Entitlement summaries and deleted customers apply to every license of their customer
    (broker.stripe_ledger.kinds: customer_level): the snapshot keeps them by customer too; other
    objects, and customer-level ones without a customer, only by id."""
    s = Snapshot()
    summary = row("entitlements:cus_1", "entitlements", features=["sync"])
    other = row("entitlements:cus_2", "entitlements", customer="cus_2", features=[])
    deleted = row("cus_1", "customer", deleted=True)
    orphan = row("entitlements:x", "entitlements", customer=None, features=[])
    sub = row("sub_1")
    s.add_objects([summary, other, deleted, orphan, sub])
    assert s.objects == {o.id: o for o in (summary, other, deleted, orphan, sub)}
    assert s.by_customer == {"cus_1": {summary.id: summary, "cus_1": deleted}, "cus_2": {other.id: other}}


def test_missing_names_what_is_lacking_and_its_ids_sorted() -> None:
    missing = Missing(Need.WALK, {"sub_b", "in_a", "ch_c"})
    assert (missing.need, missing.ids) == (Need.WALK, ("ch_c", "in_a", "sub_b"))
    assert missing.args == (Need.WALK, {"sub_b", "in_a", "ch_c"})


def test_bindings_answer_from_the_snapshot_and_the_events_new_binding_and_raise_for_ids_not_read() -> None:
    """The event's ids are read with their locks held (BASE); ids a walk reaches by links are the
    walk's to read (WALK, lock "given" or "found"). An id this event bound is bound to its license,
    an id bound before keeps its license (bindings are never moved)."""
    s = Snapshot(bindings={"sub_1": "lic_old"}, binding_known={"sub_1", "in_1", "ch_1"})
    rows = SnapshotRows(s)
    assert rows.bindings({"sub_1", "in_1"}) == {"sub_1": "lic_old"}
    for lock, need in (("held", Need.BASE), ("given", Need.WALK), ("found", Need.WALK)):
        with pytest.raises(Missing) as missing:
            rows.bindings({"sub_1", "pi_2", "ch_3"}, lock)  # type: ignore[arg-type]
        assert (missing.value.need, missing.value.ids) == (need, ("ch_3", "pi_2"))
    with pytest.raises(Missing) as missing:
        rows.bindings({"pi_2"})  # the default: the event's own ids, locks held
    assert missing.value.need is Need.BASE
    rows.write_bindings("lic_new", {"sub_1", "in_1", "pi_2"})
    assert rows.new_bindings == {"in_1", "pi_2"}  # sub_1 was bound before
    assert rows.bindings({"sub_1", "in_1", "pi_2", "ch_1"}) == {
        "sub_1": "lic_old",
        "in_1": "lic_new",
        "pi_2": "lic_new",
    }
    assert s.bindings == {"sub_1": "lic_old"}  # staged, not in the snapshot


def test_one_event_binds_to_one_license() -> None:
    rows = SnapshotRows(Snapshot())
    rows.write_bindings("lic_1", {"sub_1"})
    rows.write_bindings("lic_1", {"in_1"})
    with pytest.raises(AssertionError, match=r"^an event binds to one license$"):
        rows.write_bindings("lic_2", {"ch_1"})
    assert (rows.new_license, rows.new_bindings) == ("lic_1", {"sub_1", "in_1"})


def test_neighbours_are_the_links_read_and_those_written_either_way_and_unread_ids_raise() -> None:
    """A link is an edge whoever named it (LedgerRows.neighbours); the walk binds what it reaches,
    so an id whose links or whose object row were not read is the walk's to read (WALK)."""
    s = Snapshot(neighbours={"sub_1": {"in_1"}, "in_9": set(), "pi_1": set()}, objects_known={"sub_1", "pi_1", "x_1"})
    rows = SnapshotRows(s)
    assert rows.neighbours({"sub_1", "pi_1"}) == {"in_1"}
    assert rows.neighbours(set()) == set()
    rows.write_object(row("pi_1", "payment_intent", links=()), {"ch_1"})
    rows.write_object(row("ch_2", "charge"), {"sub_1"})
    rows.write_object(row("ch_3", "charge"), {"ch_4"})  # neither end asked for
    assert rows.neighbours({"sub_1"}) == {"in_1", "ch_2"}
    assert rows.neighbours({"pi_1"}) == {"ch_1"}
    with pytest.raises(Missing) as no_links:
        rows.neighbours({"sub_1", "x_1"})  # its object read, not its links
    assert (no_links.value.need, no_links.value.ids) == (Need.WALK, ("x_1",))
    with pytest.raises(Missing) as no_object:
        rows.neighbours({"in_9"})  # its links read, not its object
    assert (no_object.value.need, no_object.value.ids) == (Need.WALK, ("in_9",))
    s.neighbours["ch_2"] = set()
    assert rows.neighbours({"ch_2"}) == {"sub_1"}  # its object is the one this event wrote


def test_objects_answer_the_events_writes_first_and_leave_out_ids_without_a_row() -> None:
    held = row("sub_1", state_of="held")
    s = Snapshot(objects={"sub_1": held}, objects_known={"sub_1", "in_1"})
    rows = SnapshotRows(s)
    assert rows.objects({"sub_1", "in_1"}) == {"sub_1": held}  # in_1: read, no row
    newer = row("sub_1", version=T + 1)
    rows.write_object(newer, set())
    rows.write_object(row("ch_1", "charge"), set())
    assert rows.objects({"sub_1", "ch_1"}) == {"sub_1": newer, "ch_1": row("ch_1", "charge")}
    with pytest.raises(Missing) as missing:
        rows.objects({"sub_1", "pi_2", "in_3"})
    assert (missing.value.need, missing.value.ids) == (Need.BASE, ("in_3", "pi_2"))


def test_the_customers_of_a_license_are_those_read_and_those_this_event_binds_to_it() -> None:
    """The takeover check of a Payment Link (broker.stripe_ledger.binding.resolve) reads the
    customers already on the license it names (CLAIMED)."""
    s = Snapshot(claimed={"lic_1": {"cus_a"}, "lic_2": {"cus_z"}})
    rows = SnapshotRows(s)
    with pytest.raises(Missing) as missing:
        rows.customers_of("lic_9")
    assert (missing.value.need, missing.value.ids) == (Need.CLAIMED, ("lic_9",))
    rows.write_object(row("sub_1", customer="cus_b"), set())
    rows.write_object(row("in_1", "invoice", customer=None), set())
    rows.write_bindings("lic_1", {"sub_1", "in_1", "ch_unknown"})
    assert rows.customers_of("lic_1") == {"cus_a", "cus_b"}
    assert rows.customers_of("lic_2") == {"cus_z"}
    assert s.claimed == {"lic_1": {"cus_a"}, "lic_2": {"cus_z"}}  # the snapshot's sets untouched


def test_the_licenses_of_a_customer_count_the_license_this_event_binds_an_object_of_it_to() -> None:
    """A customer-level object moves every license holding an object of its customer
    (CUSTOMER_LICENSES), customer-level objects aside."""
    s = Snapshot(customer_licenses={"cus_1": {"lic_a"}, "cus_2": set()})
    rows = SnapshotRows(s)
    with pytest.raises(Missing) as missing:
        rows.licenses_of_customer("cus_9")
    assert (missing.value.need, missing.value.ids) == (Need.CUSTOMER_LICENSES, ("cus_9",))
    assert rows.licenses_of_customer("cus_1") == {"lic_a"}
    rows.write_object(row("entitlements:cus_2", "entitlements", customer="cus_2", features=[]), set())
    rows.write_object(row("sub_1"), set())
    rows.write_bindings("lic_b", {"sub_1", "entitlements:cus_2"})
    assert rows.licenses_of_customer("cus_1") == {"lic_a", "lic_b"}
    assert rows.licenses_of_customer("cus_2") == set()  # only a customer-level object of cus_2
    assert s.customer_licenses == {"cus_1": {"lic_a"}, "cus_2": set()}


def test_the_licenses_of_a_customer_ignore_objects_staged_without_a_binding() -> None:
    s = Snapshot(customer_licenses={"cus_1": set()})
    rows = SnapshotRows(s)
    rows.write_object(row("sub_1"), set())
    assert rows.licenses_of_customer("cus_1") == set()


def test_a_licenses_objects_are_those_bound_to_it_and_its_customers_customer_level_objects() -> None:
    """LedgerRows.license_objects: every object bound to the license (an id bound without a row
    left out), this event's new bindings included, and the customer-level objects of all their
    customers, the event's own writes first; a license row or customer not read raises."""
    sub, inv = row("sub_1"), row("in_1", "invoice", customer="cus_2")
    summary_1 = row("entitlements:cus_1", "entitlements", features=["a"])
    summary_2 = row("entitlements:cus_2", "entitlements", customer="cus_2", features=["b"])
    elsewhere = row("entitlements:cus_3", "entitlements", customer="cus_3", features=["c"])
    s = Snapshot(
        bindings={"sub_1": "lic_1", "in_1": "lic_1", "ch_no_row": "lic_1", "ch_anon": "lic_1", "sub_9": "lic_9"},
        licenses={"lic_1": (3, initial_state())},
        absent={"lic_new"},
        customers_known={"cus_1", "cus_2", "cus_3"},
    )
    anonymous = row("ch_anon", "charge", customer=None)  # no customer: none to read
    s.add_objects([sub, inv, anonymous, summary_1, summary_2, elsewhere, row("sub_9", customer="cus_3")])
    rows = SnapshotRows(s)
    expected = {o.id: o for o in (sub, inv, anonymous, summary_1, summary_2)}
    assert rows.license_objects("lic_1") == expected
    assert rows.license_objects("lic_new") == {}  # absent: known not to exist yet
    with pytest.raises(Missing) as missing:
        rows.license_objects("lic_unread")
    assert (missing.value.need, missing.value.ids) == (Need.LICENSES, ("lic_unread",))

    newer_summary = row("entitlements:cus_1", "entitlements", version=T + 1, features=["a", "z"])
    deleted_3 = row("cus_3", "customer", customer="cus_3", deleted=True)
    rows.write_object(newer_summary, set())
    rows.write_object(deleted_3, set())  # a customer-level object of a customer not on lic_1
    rows.write_object(row("in_loose", "invoice", customer="cus_1"), set())  # of cus_1, bound to nothing
    rows.write_object(row("pi_1", "payment_intent", customer="cus_4"), set())
    rows.write_bindings("lic_1", {"pi_1"})
    with pytest.raises(Missing) as unread:
        rows.license_objects("lic_1")  # cus_4's customer-level objects were not read
    assert (unread.value.need, unread.value.ids) == (Need.CUSTOMER_OBJECTS, ("cus_4",))
    s.customers_known.add("cus_4")
    assert rows.license_objects("lic_1") == expected | {
        newer_summary.id: newer_summary,
        "pi_1": rows.new_objects["pi_1"],
    }
    assert rows.license_objects("lic_new") == {}  # this event's bindings are lic_1's


def test_a_commit_moves_the_snapshot_on_with_what_the_event_wrote() -> None:
    """The next event of a batch decides on the snapshot as this one left it: its objects, the
    links of ids whose links were read, its new bindings, the customers they add to a claimed
    license and the licenses they add to a customer."""
    s = Snapshot(
        bindings={"sub_0": "lic_1"},
        binding_known={"sub_0", "pi_unbound"},
        neighbours={"sub_1": set(), "in_1": {"x"}},
        claimed={"lic_1": {"cus_0"}},
        customer_licenses={"cus_1": {"lic_0"}},
    )
    rows = SnapshotRows(s)
    sub, summary = row("sub_1", links=("in_1",)), row("entitlements:cus_1", "entitlements", features=[])
    other = row("ch_1", "charge", customer="cus_9")
    rows.write_object(sub, {"in_1", "pi_1"})
    rows.write_object(summary, set())
    rows.write_object(other, set())
    rows.write_bindings("lic_1", {"sub_0", "sub_1", "entitlements:cus_1", "ch_1", "in_1"})
    writes = Writes(NOW)
    rows.commit(writes)
    assert writes.objects == {"sub_1": sub, summary.id: summary, "ch_1": other}
    assert writes.links == {("sub_1", "in_1"), ("sub_1", "pi_1")}
    assert writes.bindings == {i: "lic_1" for i in ("sub_1", "entitlements:cus_1", "ch_1", "in_1")}
    assert s.objects == writes.objects and s.by_customer == {"cus_1": {summary.id: summary}}
    assert s.objects_known == {"sub_1", summary.id, "ch_1"}
    # Links reach the neighbours of ids whose links were read; pi_1's were not (still unread).
    assert s.neighbours == {"sub_1": {"in_1", "pi_1"}, "in_1": {"x", "sub_1"}}
    assert s.bindings == {"sub_0": "lic_1"} | writes.bindings
    assert s.binding_known == {"sub_0", "pi_unbound", "sub_1", "entitlements:cus_1", "ch_1", "in_1"}
    assert s.claimed == {"lic_1": {"cus_0", "cus_1", "cus_9"}}
    # cus_1 holds lic_1 now (by sub_1, not by its summary); cus_9's licenses were not read.
    assert s.customer_licenses == {"cus_1": {"lic_0", "lic_1"}}


def test_a_commit_adds_no_license_to_a_customer_for_its_customer_level_objects() -> None:
    s = Snapshot(customer_licenses={"cus_1": set()}, claimed={})
    rows = SnapshotRows(s)
    rows.write_object(row("entitlements:cus_1", "entitlements", features=[]), set())
    rows.write_object(row("in_1", "invoice", customer=None), set())
    rows.write_bindings("lic_1", {"entitlements:cus_1", "in_1"})
    rows.commit(Writes(NOW))
    assert s.customer_licenses == {"cus_1": set()} and s.claimed == {}
    assert s.bindings == {"entitlements:cus_1": "lic_1", "in_1": "lic_1"}


def test_a_commit_without_a_new_binding_writes_no_binding() -> None:
    s = Snapshot(bindings={"sub_1": "lic_1"}, claimed={"lic_1": {"cus_1"}})
    rows = SnapshotRows(s)
    rows.write_object(row("sub_1", customer="cus_2"), set())
    rows.write_bindings("lic_1", {"sub_1"})  # bound before
    writes = Writes(NOW)
    rows.commit(writes)
    assert writes.bindings == {} and s.binding_known == set() and s.claimed == {"lic_1": {"cus_1"}}
    assert writes.objects == {"sub_1": row("sub_1", customer="cus_2")}


def test_a_license_changed_twice_in_one_transaction_stays_a_new_row_if_it_was_created_in_it() -> None:
    writes = Writes(NOW)
    writes.created["lic_new"] = (0, initial_state())
    writes.license("lic_new", 1, {"status": "active"})  # type: ignore[typeddict-item]
    writes.license("lic_old", 5, {"status": "active"})  # type: ignore[typeddict-item]
    assert writes.created == {"lic_new": (1, {"status": "active"})}
    assert writes.licenses == {"lic_old": (5, {"status": "active"})}


def holding(*objects: StripeObject, license_id: str = "lic_1", seq: int = 1, also: tuple[str, ...] = ()) -> Snapshot:
    """A snapshot of a license that exists with these objects bound to it, at `seq`, in the state they
    derive; `also`: more ids read, unbound, without rows or links."""
    ids = {i for o in objects for i in (o.id, *o.links)} | set(also)
    s = Snapshot(
        bindings={i: license_id for i in ids - set(also)},
        binding_known=set(ids),
        objects_known=set(ids),
        neighbours={i: set() for i in ids},
        licenses={license_id: (seq, RULES.derive(objects))},
        customers_known={c for o in objects if (c := o.customer)},
    )
    s.add_objects(objects)
    return s


def test_an_event_recorded_before_is_a_duplicate_and_changes_nothing() -> None:
    d = sent(row("sub_1"))
    s = ready(d)
    s.recorded.add("evt_1")
    before = copy.deepcopy(s)
    outcome, writes = decided(d, s)
    assert outcome is DUPLICATE
    assert s == before and writes == Writes(NOW)


def test_a_payment_link_claim_on_another_customers_license_is_recorded_as_rejected_and_writes_nothing_else() -> None:
    """A Payment Link lets anyone set client_reference_id (broker.stripe_ledger.binding.TAKEOVER)."""
    d = sent(row("cs_1", "checkout", customer="cus_b", mode="subscription"), by_reference=True)
    s = ready(d)
    s.claimed["lic_1"] = {"cus_a"}
    outcome, writes = decided(d, s)
    assert outcome == Outcome(OutcomeKind.REJECTED, "lic_1", reason=TAKEOVER, object_id="cs_1")
    assert [(r["outcome"], r["license_id"], r["object_id"], r["reason"]) for r in writes.events] == [
        ("rejected", "lic_1", "cs_1", TAKEOVER)
    ]
    assert s.recorded == {"evt_1"}
    assert not (writes.objects or writes.bindings or writes.created or writes.log or s.objects or s.bindings)


def test_an_events_row_is_its_envelope_and_outcome_with_the_body_embedded_as_sent() -> None:
    """stripe_events: the id, type, created, livemode (false unless Stripe says true), the outcome,
    and the verified body stored byte for byte (re-encoded only when there is none)."""
    event = {"id": "evt_1", "type": "invoice.paid", "created": T, "data": {"object": {}}}
    body = b'{"id": "evt_1",  "type": "invoice.paid"}'
    reported = Reported((row("in_1", "invoice"),))
    outcome = Outcome(OutcomeKind.PENDING, object_id="in_1", reason="r" * (REASON_LENGTH + 1))
    stored = _event_row(Delivery(event, body, reported), outcome)
    payload = stored.pop("payload")
    assert isinstance(payload, orjson.Fragment) and orjson.dumps(payload) == body
    assert stored == {
        "id": "evt_1",
        "type": "invoice.paid",
        "created": T,
        "livemode": False,
        "outcome": "pending",
        "license_id": None,
        "object_id": "in_1",
        "reason": "r" * REASON_LENGTH,
    }
    live = _event_row(Delivery({**event, "livemode": True}, None, reported), Outcome(OutcomeKind.APPLIED, "lic_1"))
    assert (live["livemode"], live["payload"], live["license_id"], live["reason"]) == (
        True,
        {**event, "livemode": True},
        "lic_1",
        None,
    )
    assert _event_row(Delivery(event, None, reported), Outcome(OutcomeKind.STALE, reason=""))["reason"] is None


def test_a_new_license_starts_at_seq_one_with_a_log_entry_of_its_first_change() -> None:
    """A license's log starts at seq 1 (docs/protocol.md): its row is created at the state it
    derives, its entry names the Stripe event, when it occurred (the event's `created`) and when
    the transaction recorded it."""
    d = sent(row("sub_1", links=("in_1",)), event_type="customer.subscription.created", created=T + 7)
    s = ready(d)
    outcome, writes = decided(d, s)
    state = RULES.derive([row("sub_1", links=("in_1",))])
    assert isinstance(outcome, Outcome)
    assert (outcome.kind, outcome.license_id, outcome.object_id) == (OutcomeKind.APPLIED, "lic_1", "sub_1")
    assert [(e.license_id, e.seq) for e in outcome.appended] == [("lic_1", 1)]
    assert writes.created == {"lic_1": (1, state)} and writes.licenses == {}
    (entry,) = writes.log
    assert {k: entry[k] for k in ("license_id", "seq", "stripe_event_id", "stripe_event_type", "status")} == {
        "license_id": "lic_1",
        "seq": 1,
        "stripe_event_id": "evt_1",
        "stripe_event_type": "customer.subscription.created",
        "status": "active",
    }
    assert entry["occurred_at"] == datetime.fromtimestamp(T + 7, UTC) and entry["recorded_at"] == NOW
    assert writes.bindings == {"sub_1": "lic_1", "in_1": "lic_1"}
    assert writes.objects == {"sub_1": row("sub_1", links=("in_1",))} and writes.links == {("sub_1", "in_1")}
    assert [(r["id"], r["outcome"], r["license_id"]) for r in writes.events] == [("evt_1", "applied", "lic_1")]
    assert s.licenses == {"lic_1": (1, state)} and s.absent == set() and s.recorded == {"evt_1"}


def test_a_new_license_that_derives_nothing_is_created_at_seq_zero_and_unchanged() -> None:
    d = sent(row("in_1", "invoice", status="draft"), event_type="invoice.created")
    s = ready(d)
    outcome, writes = decided(d, s)
    assert isinstance(outcome, Outcome)
    assert (outcome.kind, outcome.license_id, outcome.appended) == (OutcomeKind.UNCHANGED, "lic_1", ())
    assert writes.created == {"lic_1": (0, initial_state())} and writes.log == [] and writes.licenses == {}
    assert s.licenses == {"lic_1": (0, initial_state())} and s.absent == set()


def test_a_license_that_changes_takes_the_next_seq_and_one_that_does_not_keeps_its_own() -> None:
    held = row("sub_1", version=T - 10)
    s = holding(held, seq=4)
    outcome, writes = decided(sent(row("sub_1", status="past_due")), s)
    assert isinstance(outcome, Outcome) and outcome.kind is OutcomeKind.APPLIED
    assert outcome.event is not None and outcome.event.seq == 5
    assert writes.created == {} and set(writes.licenses) == {"lic_1"} and writes.licenses["lic_1"][0] == 5
    assert [entry["seq"] for entry in writes.log] == [5] and s.licenses["lic_1"][0] == 5
    # A newer snapshot that derives the same license: applied to the ledger, the license unchanged.
    again, writes = decided(sent(row("sub_1", version=T + 1, status="past_due", note="x"), event_id="evt_2"), s)
    assert isinstance(again, Outcome)
    assert (again.kind, again.license_id, again.appended) == (OutcomeKind.UNCHANGED, "lic_1", ())
    assert writes.licenses == {} and writes.log == [] and s.licenses["lic_1"][0] == 5
    assert writes.objects == {"sub_1": row("sub_1", version=T + 1, status="past_due", note="x")}


def test_an_event_all_of_whose_objects_hold_newer_snapshots_is_stale() -> None:
    """Stripe does not order deliveries (https://docs.stripe.com/webhooks#event-ordering): an
    event every object of which is older than the ledger's changes nothing and says so, bound or not."""
    newer = row("sub_1", version=T + 5, status="canceled")
    outcome, writes = decided(sent(row("sub_1", status="active")), holding(newer))
    assert isinstance(outcome, Outcome)
    assert (outcome.kind, outcome.license_id, outcome.appended) == (OutcomeKind.STALE, "lic_1", ())
    assert writes.objects == {} and writes.log == [] and writes.licenses == {}
    assert [r["outcome"] for r in writes.events] == ["stale"]
    # Unbound and older: stale too, not pending.
    unbound = sent(row("in_1", "invoice", version=T, status="open"), license_id=None, event_id="evt_2")
    s = ready(unbound)
    s.add_objects([row("in_1", "invoice", version=T + 5, status="paid")])
    outcome, _ = decided(unbound, s)
    assert outcome == Outcome(OutcomeKind.STALE, object_id="in_1")
    # One object older, one newer: not stale.
    mixed = sent(row("sub_1", status="active"), row("in_2", "invoice", status="paid"), event_id="evt_3")
    outcome, _ = decided(mixed, holding(newer, also=("in_2",)))
    assert isinstance(outcome, Outcome) and outcome.kind is OutcomeKind.UNCHANGED


def test_an_event_whose_objects_no_license_holds_is_pending() -> None:
    """An invoice before the Checkout Session that names its subscription: kept in the ledger
    unbound, waiting for a link (broker.ingest.service)."""
    d = sent(row("in_1", "invoice", status="paid", links=("sub_1",)), license_id=None)
    s = ready(d)
    outcome, writes = decided(d, s)
    assert outcome == Outcome(OutcomeKind.PENDING, object_id="in_1")
    assert writes.objects == {"in_1": d.reported.primary} and writes.bindings == {} and writes.created == {}
    assert [(r["outcome"], r["object_id"], r["license_id"]) for r in writes.events] == [("pending", "in_1", None)]
    assert s.objects == {"in_1": d.reported.primary} and s.licenses == {}


def test_a_binding_links_the_pending_events_of_its_ids_and_of_its_customers_customer_level_objects() -> None:
    """The event that binds pending objects makes their events count for the license ("linked"),
    those of earlier transactions (Writes.linked) and those of its own (their rows rewritten); the
    customer's entitlement summary and deletion too, which waited for a license of their customer."""
    pending = sent(row("in_1", "invoice", status="paid"), license_id=None, event_id="evt_in")
    unrelated = sent(
        row("in_9", "invoice", status="paid", customer="cus_9", links=("sub_9",)), license_id=None, event_id="evt_other"
    )
    binding = sent(row("sub_1", links=("in_1",)), event_id="evt_sub")
    s = ready(pending, unrelated, binding)
    decision = decide([pending, unrelated, binding], s, RULES, now=NOW, stripe_reads=False)
    assert [o.kind for o in decision.results] == ["pending", "pending", "applied"]  # type: ignore[union-attr]
    writes = decision.writes
    assert writes.links == {("in_9", "sub_9"), ("sub_1", "in_1")}  # every event's
    assert set(writes.objects) == {"in_1", "in_9", "sub_1"}
    assert writes.linked == {i: "lic_1" for i in ("sub_1", "in_1", "cus_1", "entitlements:cus_1")}
    assert [(r["id"], r["outcome"], r["license_id"]) for r in writes.events] == [
        ("evt_in", "linked", "lic_1"),
        ("evt_other", "pending", None),
        ("evt_sub", "applied", "lic_1"),
    ]
    # Without a customer, only the ids bound.
    d = sent(row("sub_2", customer=None, links=("in_2",)), license_id="lic_2", event_id="evt_2")
    _, writes = decided(d, ready(d))
    assert writes.linked == {"sub_2": "lic_2", "in_2": "lic_2"}


def test_linking_rewrites_only_pending_rows_of_the_objects_bound() -> None:
    writes = Writes(NOW)
    writes.events = [
        {"id": "e1", "outcome": "pending", "object_id": "in_1", "license_id": None},
        {"id": "e2", "outcome": "stale", "object_id": "in_1", "license_id": None},
        {"id": "e3", "outcome": "pending", "object_id": "in_2", "license_id": None},
    ]
    _link_pending(writes, "lic_1", {"in_1", "cus_1"})
    assert writes.linked == {"in_1": "lic_1", "cus_1": "lic_1"}
    assert [(r["outcome"], r["license_id"]) for r in writes.events] == [
        ("linked", "lic_1"),
        ("stale", None),
        ("pending", None),
    ]


def test_an_event_bound_to_nothing_new_links_nothing() -> None:
    s = holding(row("sub_1", version=T - 1))
    _, writes = decided(sent(row("sub_1", status="past_due")), s)
    assert writes.linked == {} and writes.bindings == {}


def test_a_customer_level_event_moves_every_license_of_its_customer_named_by_the_least() -> None:
    """An entitlement summary applies to every license holding an object of its customer
    (broker.stripe_ledger.binding.fold); no license is named by it, so the outcome names the least."""
    summary = row("entitlements:cus_1", "entitlements", features=["sync"], partial=False)
    d = sent(
        summary, license_id=None, customer_level=True, event_type="entitlements.active_entitlement_summary.updated"
    )
    s = ready(d)
    (wants, _) = decided(d, copy.deepcopy(s))
    assert wants == Wants(Need.CUSTOMER_LICENSES, ("cus_1",))
    s.customer_licenses["cus_1"] = {"lic_b", "lic_a"}
    assert decided(d, copy.deepcopy(s))[0] == Wants(Need.LICENSES, ("lic_a", "lic_b"))
    s.licenses["lic_b"] = (2, initial_state())
    assert decided(d, copy.deepcopy(s))[0] == Wants(Need.LICENSES, ("lic_a",))
    s.absent.add("lic_a")
    s.bindings |= {"sub_a": "lic_a", "sub_b": "lic_b"}
    s.add_objects([row("sub_a"), row("sub_b")])
    outcome, writes = decided(d, s)
    assert isinstance(outcome, Outcome)
    assert (outcome.kind, outcome.license_id) == (OutcomeKind.APPLIED, "lic_a")
    assert sorted((e.license_id, e.seq) for e in outcome.appended) == [("lic_a", 1), ("lic_b", 3)]
    assert set(writes.created) == {"lic_a"} and set(writes.licenses) == {"lic_b"}
    assert s.licenses["lic_b"][1]["features"] == ["sync"] and s.licenses["lic_a"][1]["features"] == ["sync"]


def test_an_event_that_resolves_a_license_is_named_by_it_whatever_else_it_moves() -> None:
    summary = row("entitlements:cus_1", "entitlements", features=["sync"], partial=False)
    d = sent(summary, license_id="lic_z", customer_level=True)
    s = ready(d, licenses={"lic_a": (0, initial_state())})
    s.customer_licenses["cus_1"] = {"lic_a"}
    outcome, _ = decided(d, s)
    assert isinstance(outcome, Outcome) and outcome.license_id == "lic_z"


def test_an_event_not_newer_than_its_object_and_saying_something_else_asks_stripe_for_the_object() -> None:
    """With STRIPE_API_KEY, a snapshot of the held version or older that differs from the held one
    is applied as Stripe's API reads the object now (broker.stripe_ledger.refresh); a repeat of the
    held snapshot, a newer one, an object not held, or a refresh made already needs no read."""
    held = row("sub_1", status="active")

    def asks(proposed: StripeObject, *, stripe_reads: bool = True, done: frozenset[Need] = frozenset()) -> bool:
        result, _ = decided(sent(proposed), holding(held), stripe_reads=stripe_reads, done=done)
        assert isinstance(result, Outcome) or result == Wants(Need.REFRESH, ("sub_1",)), result
        return isinstance(result, Wants)

    assert asks(row("sub_1", status="past_due"))  # the held version
    assert asks(row("sub_1", version=T - 1, status="past_due"))
    assert not asks(row("sub_1", version=T + 1, status="past_due"))
    assert not asks(row("sub_1", version=T - 1, status="active"))  # the held snapshot again
    assert not asks(row("sub_1", status="past_due"), stripe_reads=False)
    assert not asks(row("sub_1", status="past_due"), done=frozenset({Need.REFRESH}))
    d = sent(row("sub_1", status="past_due"))
    assert isinstance(decided(d, ready(d), stripe_reads=True)[0], Outcome)  # not held


def test_a_one_time_checkout_judged_by_its_products_asks_for_its_line_items_once() -> None:
    """Webhooks never carry a Checkout Session's line items
    (https://docs.stripe.com/api/checkout/sessions/line_items): while LICENSE_PRODUCTS lists one-time
    products, a row holding them is read, and without one they are asked of Stripe's API, once."""
    rules = LicenseRules(["active"], ["perpetual:price_life"])
    session = row("cs_1", "checkout", mode="payment", status="complete", payment_status="paid")
    d = sent(session, event_type="checkout.session.completed")
    s = ready(d)
    items = line_items_id("cs_1")
    assert decided(d, copy.deepcopy(s), rules)[0] == Wants(Need.BASE, (items,))
    s.objects_known.add(items)  # read: no row (nor binding, nor link)
    s.binding_known.add(items)
    s.neighbours[items] = set()
    assert decided(d, copy.deepcopy(s), rules)[0] == Wants(Need.LINE_ITEMS, ("cs_1",))
    assert isinstance(decided(d, copy.deepcopy(s), rules, done=frozenset({Need.LINE_ITEMS}))[0], Outcome)
    assert isinstance(decided(d, copy.deepcopy(s), RULES)[0], Outcome)  # no one-time products listed
    fetched = row(items, "line_items", mode="payment", products=["price_life"])
    assert isinstance(decided(sent(session, fetched), copy.deepcopy(s), rules)[0], Outcome)  # read just now
    s.add_objects([fetched])  # a row holds them
    outcome, _ = decided(d, s, rules)
    assert isinstance(outcome, Outcome) and outcome.kind is OutcomeKind.APPLIED


def test_a_partial_entitlement_summary_asks_stripe_for_the_customers_entitlements() -> None:
    """Stripe's summary event lists the first entitlements only (`has_more`,
    https://docs.stripe.com/api/entitlements/active-entitlement/list): with STRIPE_API_KEY the
    customer's are read, once; otherwise the license says its features are partial."""

    def result(summary: StripeObject, *, stripe_reads: bool = True, done: frozenset[Need] = frozenset()) -> Any:
        d = sent(summary, license_id=None, customer_level=True)
        return decided(d, ready(d), stripe_reads=stripe_reads, done=done)[0]

    partial = row("entitlements:cus_1", "entitlements", features=["a"], partial=True)
    assert result(partial) == Wants(Need.ENTITLEMENTS, ("cus_1",))
    # Otherwise the decision goes on: the licenses of the customer come next.
    after = Wants(Need.CUSTOMER_LICENSES, ("cus_1",))
    assert result(partial, stripe_reads=False) == after
    assert result(partial, done=frozenset({Need.ENTITLEMENTS})) == after
    assert result(row("entitlements:cus_1", "entitlements", features=["a"], partial=False)) == after
    assert result(row("sub_1", partial=True)) == after
    orphan = row("entitlements:x", "entitlements", customer=None, features=["a"], partial=True)
    assert result(orphan) == Outcome(OutcomeKind.PENDING, object_id="entitlements:x")


def test_a_paid_invoice_of_an_api_version_that_names_no_payment_asks_stripe_for_its_payments() -> None:
    """API versions 2025-03-31 to 2025-05-28 name no payment on invoices
    (https://docs.stripe.com/changelog/basil/2025-03-31/add-support-for-multiple-partial-payments-on-invoices):
    with STRIPE_API_KEY a newly paid invoice's payments are read, once."""
    paid = row("in_1", "invoice", status="paid")
    version = {"api_version": "2025-04-30.basil"}

    def result(d: Delivery, s: Snapshot | None = None, **kw: Any) -> Any:
        return decided(d, s or ready(d), stripe_reads=kw.get("stripe_reads", True), done=kw.get("done", frozenset()))[0]

    assert result(sent(paid, **version)) == Wants(Need.INVOICE_PAYMENTS, ("in_1",))
    assert isinstance(result(sent(paid, **version), stripe_reads=False), Outcome)
    assert isinstance(result(sent(paid, **version), done=frozenset({Need.INVOICE_PAYMENTS})), Outcome)
    assert isinstance(result(sent(paid, api_version="2025-06-30.basil")), Outcome)
    assert isinstance(result(sent(row("in_1", "invoice", status="paid", charge="ch_1"), **version)), Outcome)
    known_paid = holding(row("in_1", "invoice", version=T - 1, status="paid", note="held"))
    assert isinstance(result(sent(paid, **version), known_paid), Outcome)


def test_a_license_row_not_read_is_asked_for_before_deciding() -> None:
    d = sent(row("sub_1"))
    s = ready(d)
    s.absent.clear()
    before = copy.deepcopy(s)
    outcome, writes = decided(d, s)
    assert outcome == Wants(Need.LICENSES, ("lic_1",))
    assert s == before and writes == Writes(NOW)


def test_a_batch_is_decided_in_order_with_the_stripe_reads_it_may_make() -> None:
    """`decide`: each delivery on the snapshot as the ones before it left it, one result each;
    `stripe_reads` and `done` reach every decision."""
    held = row("sub_1", status="active")
    same_version = sent(row("sub_1", status="past_due"))
    decision = decide([same_version], holding(held), RULES, now=NOW, stripe_reads=True)
    assert decision.results == [Wants(Need.REFRESH, ("sub_1",))] and decision.writes == Writes(NOW)
    decision = decide([same_version], holding(held), RULES, now=NOW, stripe_reads=True, done=frozenset({Need.REFRESH}))
    assert [o.kind for o in decision.results] == ["applied"]  # type: ignore[union-attr]
    assert decision.writes.now == NOW and decision.writes.log[0]["recorded_at"] == NOW


def test_objects_read_from_stripe_come_after_the_events_own_or_in_place_of_its_primary() -> None:
    primary, second = row("in_1", "invoice"), row("ch_1", "charge")
    reported = Reported((primary, second), "lic_1", by_reference=True)
    fetched, more = row("inpay_1", "invoice_payment"), row("inpay_2", "invoice_payment")
    assert with_objects(reported, fetched, more) == replace(reported, objects=(primary, second, fetched, more))
    refreshed = row("in_1", "invoice", version=T + 1)
    assert with_objects(reported, first=refreshed).objects == (refreshed, second)
    assert with_objects(reported, fetched, first=refreshed).objects == (refreshed, second, fetched)
    assert with_objects(reported, fetched).license_id == "lic_1"


# -- the stripe_events rows (broker.ingest.records), the ingest's errors and outcomes ---------------


def test_an_event_is_storable_only_with_a_stripe_id_a_type_and_a_timestamp() -> None:
    """The envelope is stored under its id whatever the rest says; an id, type or `created` the
    columns cannot hold (stripe_events: id 255, type 200, BIGINT) is refused with its reason."""
    ok = {"id": "evt_1", "type": "invoice.paid", "created": 0}
    assert envelope_problem(ok) is None
    assert envelope_problem({**ok, "id": "e" * MAX_ID, "type": "t" * 200, "created": MAX_CREATED - 1}) is None
    assert envelope_problem({**ok, "id": "e", "type": "t"}) is None
    for bad_id in ("", "e" * (MAX_ID + 1), "evt_\x00", "evt\n1"):
        assert envelope_problem({**ok, "id": bad_id}) == "event id is not a Stripe id", bad_id
    for bad_type in ("", "t" * 201, "invoice.paid\x00"):
        assert envelope_problem({**ok, "type": bad_type}) == "event type is not a Stripe event type", bad_type
    for bad_created in (-1, MAX_CREATED, MAX_CREATED + 1):
        assert envelope_problem({**ok, "created": bad_created}) == "created is not a timestamp", bad_created


class _Result:
    def __init__(self, first: Any = None, rows: list[dict[str, Any]] | None = None) -> None:
        self._first, self._rows = first, rows or []

    def first(self) -> Any:
        return self._first

    def mappings(self) -> list[dict[str, Any]]:
        return self._rows


class _Connection:
    """What records.py asks of a connection: its dialect's name, and statements executed (kept)."""

    def __init__(self, dialect: str = "postgresql", first: Any = ("evt_1",), rows: Any = None) -> None:
        self.dialect = SimpleNamespace(name=dialect)
        self.statements: list[Any] = []
        self._result = _Result(first, rows)

    async def execute(self, statement: Any) -> _Result:
        self.statements.append(statement)
        return self._result

    def compiled(self, n: int = -1) -> Any:
        dialect = postgresql.dialect() if self.dialect.name == "postgresql" else sqlite.dialect()  # type: ignore[no-untyped-call]
        return self.statements[n].compile(dialect=dialect)


async def test_an_event_is_recorded_once_with_its_outcome_and_the_body_as_stripe_sent_it() -> None:
    """The INSERT does nothing on a second delivery of the id (ON CONFLICT, RETURNING nothing):
    a duplicate, never an error. On Postgres the body is cast to JSON from its text, as sent."""
    conn = _Connection()
    event = {"id": "evt_1", "type": "invoice.paid", "created": T, "livemode": True}
    outcome = Outcome(OutcomeKind.APPLIED, "lic_1", object_id="in_1", reason="r" * (REASON_LENGTH + 5))
    before = datetime.now(UTC)
    assert await record(conn, event, b'{"id":  "evt_1"}', outcome) is True  # type: ignore[arg-type]
    compiled = conn.compiled()
    params = dict(compiled.params)
    assert before <= params.pop("received_at") <= datetime.now(UTC)
    assert params == {
        "id": "evt_1",
        "type": "invoice.paid",
        "created": T,
        "livemode": True,
        "license_id": "lic_1",
        "outcome": "applied",
        "object_id": "in_1",
        "reason": "r" * REASON_LENGTH,
        "param_1": '{"id":  "evt_1"}',
    }
    assert "CAST(%(param_1)s::VARCHAR AS JSON)" in str(compiled)
    assert str(compiled).endswith("ON CONFLICT (id) DO NOTHING RETURNING stripe_events.id")
    assert await record(_Connection(first=None), event) is False  # type: ignore[arg-type]


async def test_an_event_recorded_before_its_outcome_is_received_and_keeps_its_parsed_body_without_one() -> None:
    conn = _Connection("sqlite")
    event = {"id": "evt_1", "type": "invoice.paid", "created": T}
    await record(conn, event)  # type: ignore[arg-type]
    params = dict(conn.compiled().params)
    params.pop("received_at")
    assert params == {
        "id": "evt_1",
        "type": "invoice.paid",
        "created": T,
        "livemode": False,
        "license_id": None,
        "outcome": "received",
        "object_id": None,
        "reason": None,
        "payload": event,
    }
    await record(conn, event, b'{"id": "evt_1"}', Outcome(OutcomeKind.PENDING, reason=""))  # type: ignore[arg-type]
    params = dict(conn.compiled().params)
    assert (params["param_1"], params["reason"], params["outcome"]) == ('{"id": "evt_1"}', None, "pending")
    assert "CAST" not in str(conn.compiled())  # SQLite stores the text as it is
    # A type no rule reads: recorded by id, type and time, its body not kept (JSON null).
    await record(conn, event, b'{"id": "evt_1"}', Outcome(OutcomeKind.IGNORED, keep_payload=False))  # type: ignore[arg-type]
    assert conn.compiled().params["payload"] is sa.JSON.NULL


def test_the_payload_of_an_event_whose_payload_is_not_kept_is_json_null() -> None:
    """A type no rule reads (customer.created) is recorded by id, type and time only
    (tests/test_event_payloads.py), whatever body came with it."""
    conn: Any = _Connection()
    event = {"id": "evt_1"}
    dropped = Outcome(OutcomeKind.IGNORED, keep_payload=False)
    assert _payload(conn, event, b"{}", dropped) is sa.JSON.NULL
    assert _payload(conn, event, None, dropped) is sa.JSON.NULL
    assert _payload(conn, event, None, Outcome(OutcomeKind.IGNORED)) is event
    assert _payload(conn, event, None, None) is event
    kept = _payload(conn, event, b'{"a":1}', None)
    assert isinstance(kept, sa.Cast) and isinstance(kept.type, sa.JSON)
    assert isinstance(kept.clause.type, sa.Text) and kept.clause.clause.value == '{"a":1}'  # type: ignore[attr-defined]
    text = _payload(_Connection("sqlite"), event, b'{"a":1}', None)  # type: ignore[arg-type]
    assert isinstance(text.type, sa.Text) and text.clause.value == '{"a":1}'


async def test_an_outcome_is_set_on_the_events_row_and_pending_rows_become_linked() -> None:
    conn = _Connection()
    await set_outcome(conn, "evt_1", Outcome(OutcomeKind.UNCHANGED, "lic_1", object_id="sub_1", reason="x" * 300))  # type: ignore[arg-type]
    compiled = conn.compiled()
    assert dict(compiled.params) == {
        "outcome": "unchanged",
        "license_id": "lic_1",
        "object_id": "sub_1",
        "reason": "x" * REASON_LENGTH,
        "id_1": "evt_1",
    }
    assert str(compiled).endswith("WHERE stripe_events.id = %(id_1)s::VARCHAR")
    await mark_linked(conn, "lic_1", {"sub_1", "in_1"})  # type: ignore[arg-type]
    compiled = conn.compiled()
    assert dict(compiled.params) == {
        "outcome": "linked",
        "license_id": "lic_1",
        "outcome_1": "pending",
        "object_id_1": ["in_1", "sub_1"],
    }
    assert "WHERE stripe_events.outcome = %(outcome_1)s::VARCHAR AND stripe_events.object_id IN" in str(compiled)


async def test_unmatched_lists_the_events_that_changed_no_license_oldest_first() -> None:
    """`license-broker unmatched`: pending, unmatched, rejected and ignored events (NOT_MATCHED),
    with what explains them, by `created` then id, 100 unless told."""
    conn = _Connection(rows=[{"id": "evt_1"}])

    class Engine:
        @contextlib.asynccontextmanager
        async def connect(self) -> Any:
            yield conn

    assert await unmatched_events(Engine()) == [{"id": "evt_1"}]  # type: ignore[arg-type]
    compiled = conn.compiled()
    sql = " ".join(str(compiled).split())
    assert sql.startswith(
        "SELECT stripe_events.id, stripe_events.type, stripe_events.created, stripe_events.outcome, "
        "stripe_events.reason, stripe_events.object_id, stripe_events.payload FROM stripe_events "
        "WHERE stripe_events.outcome IN (__[POSTCOMPILE_outcome_1]) "
        "ORDER BY stripe_events.created, stripe_events.id LIMIT %(param_1)s"
    )
    assert dict(compiled.params) == {"outcome_1": ["pending", "unmatched", "rejected", "ignored"], "param_1": 100}
    await unmatched_events(Engine(), limit=7)  # type: ignore[arg-type]
    assert conn.compiled().params["param_1"] == 7


def test_the_log_entry_of_an_outcome_is_that_of_its_license() -> None:
    """An event may change several licenses (a customer-level one); `event` is the entry of the
    license the outcome names, and every entry is published, in order."""
    a, b = LicenseEvent("lic_a", 3, b"{}"), LicenseEvent("lic_b", 1, b"{}")
    outcome = Outcome(OutcomeKind.APPLIED, "lic_b", (a, b))
    assert outcome.event is b and outcome.to_publish == [a, b]
    assert Outcome(OutcomeKind.APPLIED, "lic_c", (a, b)).event is None
    assert Outcome(OutcomeKind.UNCHANGED, "lic_a").event is None and Outcome(OutcomeKind.UNCHANGED).to_publish == []


def test_database_errors_are_the_ingests_content_refused_or_database_unavailable() -> None:
    """A value the database refuses is no outage (IngestRefused, named by the driver's error: the
    event is then recorded without its content); any other driver or network error is
    (IngestUnavailable: 503, Stripe retries); what is not the database's passes through."""
    out_of_range = psycopg.errors.NumericValueOutOfRange("bigint out of range")
    wrapped = sa.exc.DataError("INSERT", {}, out_of_range)
    for error, name in ((wrapped, "NumericValueOutOfRange"), (out_of_range, "NumericValueOutOfRange")):
        with pytest.raises(IngestRefused) as refused, database_errors():
            raise error
        assert str(refused.value) == name and refused.value.__cause__ is error
    with pytest.raises(IngestRefused, match=r"^DataError$"), database_errors():
        raise psycopg.DataError("plain")
    outage = sa.exc.OperationalError("SELECT 1", {}, psycopg.OperationalError("connection refused"))
    for error in (
        outage,
        sa.exc.InterfaceError("SELECT 1", {}, Exception("closed")),
        psycopg.OperationalError("server closed the connection"),
        ConnectionRefusedError("refused"),
        TimeoutError("pool timeout"),
    ):
        with pytest.raises(IngestUnavailable) as unavailable, database_errors():
            raise error
        assert unavailable.value.what == "database" and unavailable.value.__cause__ is error
        assert str(unavailable.value) == str(error)
    with pytest.raises(ValueError, match=r"^not the database's$"), database_errors():
        raise ValueError("not the database's")
    with database_errors():
        pass


def test_an_unavailable_service_is_named_and_its_message_is_the_causes() -> None:
    cause = TimeoutError("read timed out")
    error = IngestUnavailable("Stripe API", cause)
    assert (error.what, str(error), error.args) == ("Stripe API", "read timed out", ("read timed out",))


# -- the batched WRITE statement's column lists (broker.ingest.statements) ------------------------
# WRITE is built once at import; these call the Rows methods themselves (what mutmut mutates).

_T = sa.Table(
    "t",
    sa.MetaData(),
    sa.Column("id", sa.String(10), primary_key=True),
    sa.Column("n", sa.BigInteger),
    sa.Column("doc", sa.JSON),
    sa.Column("note", sa.Text),
    sa.Column("at", sa.DateTime(timezone=True)),
    sa.Column("legacy", sa.String(5)),
)


def test_a_json_row_carries_every_column_not_stamped_or_defaulted_typed_as_postgres_reads_it() -> None:
    """Strings as text (the column's own length applies on assignment), other types as Postgres
    names them."""
    rows = Rows(_T, "things", stamped=("at",), defaulted=("legacy",))
    assert rows.columns == ["id", "n", "doc", "note"]
    assert rows.source("x") == "json_to_recordset(%(things)s::json) AS x(id text, n BIGINT, doc JSON, note text)"
    every = Rows(_T, "all")
    assert every.columns == ["id", "n", "doc", "note", "at", "legacy"]
    assert every.source("a").endswith(
        "(id text, n BIGINT, doc JSON, note text, at TIMESTAMP WITH TIME ZONE, legacy text)"
    )


def test_a_stamped_column_is_set_to_the_transactions_time_and_a_defaulted_one_is_not_written() -> None:
    rows = Rows(_T, "things", stamped=("at",), defaulted=("legacy",))
    source = rows.source("x")
    assert (
        rows.insert("x")
        == f"INSERT INTO t (id, n, doc, note, at)\n    SELECT x.id, x.n, x.doc, x.note, %(now)s\n    FROM {source}"
    )
    assert rows.insert("x", "ON CONFLICT DO NOTHING") == (
        f"INSERT INTO t (id, n, doc, note, at)\n    SELECT x.id, x.n, x.doc, x.note, %(now)s\n    FROM {source}\n"
        "    ON CONFLICT DO NOTHING"
    )
    assert rows.update("x") == (
        f"UPDATE t t SET n = x.n, doc = x.doc, note = x.note, at = %(now)s\n    FROM {source}\n    WHERE t.id = x.id"
    )
    assert rows.update("x", ("id", "n")) == (
        f"UPDATE t t SET doc = x.doc, note = x.note, at = %(now)s\n    FROM {source}\n"
        "    WHERE t.id = x.id AND t.n = x.n"
    )
    assert rows.upsert_all("x") == rows.insert(
        "x", "ON CONFLICT (id) DO UPDATE SET n = excluded.n, doc = excluded.doc, note = excluded.note, at = excluded.at"
    )
    assert rows.upsert_all("x", ("id", "note")).endswith(
        "ON CONFLICT (id, note) DO UPDATE SET n = excluded.n, doc = excluded.doc, at = excluded.at"
    )
    unstamped = Rows(_T, "plain", defaulted=("at", "legacy"))
    assert unstamped.insert("p").startswith("INSERT INTO t (id, n, doc, note)\n    SELECT p.id, p.n, p.doc, p.note\n")


def test_a_column_named_stamped_or_defaulted_must_be_the_tables() -> None:
    with pytest.raises(ValueError, match=re.escape("t has no column ['when']")):
        Rows(_T, "x", stamped=("at", "when"))
    with pytest.raises(ValueError, match=re.escape("t has no column ['gone', 'old']")):
        Rows(_T, "x", defaulted=("old", "legacy", "gone"))


def test_the_write_statement_writes_each_table_as_the_general_path_does() -> None:
    """The times are the transaction's (stamped); the legacy lookup columns of stripe_events and
    the log's serial are left to their defaults; a license row is created with both times and
    updated with its updated_at only (tests/test_ingest_differential.py compares the rows)."""
    assert EVENTS.columns == [
        "id",
        "type",
        "created",
        "livemode",
        "license_id",
        "outcome",
        "object_id",
        "reason",
        "payload",
    ]
    assert (EVENTS.stamped, OBJECTS.stamped, BINDINGS.stamped, LINKS.stamped) == (
        ("received_at",),
        ("updated_at",),
        ("bound_at",),
        (),
    )
    assert OBJECTS.columns == ["id", "kind", "version", "rank", "customer", "state"]
    assert (BINDINGS.columns, LINKS.columns) == (["stripe_id", "license_id"], ["object_id", "linked_id"])
    license_columns = ["id", "seq", "status", "entitled", "state", "stripe_customer_id", "stripe_subscription_id"]
    assert CREATED.columns == LICENSES.columns == license_columns
    assert (CREATED.stamped, LICENSES.stamped) == (("created_at", "updated_at"), ("updated_at",))
    assert LOG.columns == [c.name for c in LOG.table.c if c.name != "id"]
    for piece in (
        EVENTS.insert("e", "ON CONFLICT (id) DO NOTHING RETURNING id"),
        OBJECTS.upsert_all("o"),
        BINDINGS.insert("b", "ON CONFLICT DO NOTHING RETURNING stripe_id"),
        CREATED.insert("c", "ON CONFLICT DO NOTHING RETURNING id"),
        LINKS.insert("k", "ON CONFLICT DO NOTHING"),
        LICENSES.update("u"),
        LOG.insert("g"),
    ):
        assert piece in WRITE
    assert "occurred_at TIMESTAMP WITH TIME ZONE" in LOG.source("g") and "payload JSON" in EVENTS.source("e")


# -- the batched path's parameters (broker.ingest.batched.params) ---------------------------------


def test_the_write_parameters_are_one_json_document_per_table_and_the_counts_the_division_checks() -> None:
    """WRITE fails (division by zero) unless every event, binding and new license it was given was
    written: `n`, `n_bindings`, `n_created` are what it was given."""
    state = RULES.derive([row("sub_1")])
    writes = Writes(NOW)
    writes.events = [{"id": "evt_1", "payload": orjson.Fragment(b'{"id":"evt_1"}')}, {"id": "evt_2"}]
    sub = row("sub_1", links=("in_1",))
    writes.objects = {"sub_1": sub}
    writes.links = {("sub_1", "in_2"), ("sub_1", "in_1")}
    writes.bindings = {"sub_1": "lic_1", "in_1": "lic_1", "in_2": "lic_1"}
    writes.created = {"lic_1": (1, state)}
    writes.licenses = {"lic_b": (4, initial_state()), "lic_a": (2, state)}
    writes.log = [{"seq": 1}]
    writes.linked = {"in_2": "lic_1", "cus_1": "lic_1"}
    p = batched.params(writes)
    assert (p["now"], p["n"], p["n_bindings"], p["n_created"]) == (NOW, 2, 3, 1)
    assert orjson.loads(p["events"]) == [{"id": "evt_1", "payload": {"id": "evt_1"}}, {"id": "evt_2"}]
    assert '"payload":{"id":"evt_1"}' in p["events"]  # the body embedded as it came
    assert orjson.loads(p["objects"]) == [sub.row()]
    assert orjson.loads(p["links"]) == [
        {"object_id": "sub_1", "linked_id": "in_1"},
        {"object_id": "sub_1", "linked_id": "in_2"},
    ]
    assert orjson.loads(p["bindings"]) == [{"stripe_id": i, "license_id": "lic_1"} for i in ("sub_1", "in_1", "in_2")]
    assert orjson.loads(p["created"]) == [
        {
            "id": "lic_1",
            "seq": 1,
            "status": "active",
            "entitled": True,
            "state": state,
            "stripe_customer_id": "cus_1",
            "stripe_subscription_id": "sub_1",
        }
    ]
    assert [(r["id"], r["seq"], r["status"], r["entitled"]) for r in orjson.loads(p["licenses"])] == [
        ("lic_a", 2, "active", True),
        ("lic_b", 4, "none", False),
    ]
    assert orjson.loads(p["log"]) == [{"seq": 1}]
    assert orjson.loads(p["linked"]) == [
        {"object_id": "cus_1", "license_id": "lic_1"},
        {"object_id": "in_2", "license_id": "lic_1"},
    ]
    tables = {"events", "objects", "links", "bindings", "licenses", "created", "log", "linked"}
    assert set(p) == {"now", "n", "n_bindings", "n_created", *tables}


def test_only_events_of_no_customer_level_object_take_the_batched_path() -> None:
    """The batched READ reads no customer's licenses: a customer-level event goes to the general path."""
    assert batched.BatchedIngest.eligible(Reported((row("sub_1"),), "lic_1"))
    assert not batched.BatchedIngest.eligible(
        Reported((row("entitlements:cus_1", "entitlements"),), customer_level=True)
    )


# -- the batched path's transactions (broker.ingest.batched.BatchedIngest), the database faked ------


def requested(d: Delivery) -> batched._Request:
    return batched._Request(d, asyncio.get_running_loop().create_future())


async def test_at_most_two_transactions_run_at_once_and_the_events_waiting_meanwhile_share_the_next() -> None:
    """Group commit (batched.RUNNERS): an event arriving while two transactions are in flight waits
    for one of them to end, and goes with every event that waited with it in one transaction."""
    ingest = batched.BatchedIngest(None, RULES, refreshes=False)  # type: ignore[arg-type]
    started: list[list[str]] = []
    release = asyncio.Event()
    in_flight = most = 0

    async def transaction(batch: list[batched._Request]) -> list[Outcome | None]:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        started.append([r.delivery.event["id"] for r in batch])
        await release.wait()
        in_flight -= 1
        return [Outcome(OutcomeKind.APPLIED, r.delivery.event["id"]) for r in batch]

    ingest._transaction = transaction  # type: ignore[method-assign]

    def arrives(n: int) -> asyncio.Task[Outcome | None]:
        d = sent(row(f"sub_{n}"), event_id=f"evt_{n}")
        return asyncio.create_task(ingest.apply(d.event, d.raw, d.reported))

    applies = [arrives(1)]  # each of the first two starts a transaction of its own
    await async_wait_until(lambda: len(started) == 1, what="the first transaction")
    applies.append(arrives(2))
    await async_wait_until(lambda: len(started) == 2, what="the second transaction")
    applies += [arrives(3), arrives(4)]
    await async_wait_until(lambda: len(ingest._waiting) + sum(map(len, started)) == 4, what="events 3 and 4 taken")
    assert most == 2 and started == [["evt_1"], ["evt_2"]]  # 3 and 4 wait
    release.set()
    outcomes = await asyncio.gather(*applies)
    assert [o.license_id for o in outcomes] == ["evt_1", "evt_2", "evt_3", "evt_4"]  # type: ignore[union-attr]
    assert started == [["evt_1"], ["evt_2"], ["evt_3", "evt_4"]] and most == 2
    assert ingest._runners == set()  # each runner ended with the events it found


async def test_a_cancelled_runner_cancels_its_events_and_the_last_one_every_event_still_waiting_for_good() -> None:
    """The process stopping cancels the runners: nobody waits for ever. A runner cancelled while
    another runs cancels its own batch only (the other takes the events waiting); the last one
    cancels the events still waiting too."""
    ingest = batched.BatchedIngest(None, RULES, refreshes=False)  # type: ignore[arg-type]
    started: list[str] = []

    async def transaction(batch: list[batched._Request]) -> list[Outcome | None]:
        started.extend(r.delivery.event["id"] for r in batch)
        await asyncio.Event().wait()  # until cancelled
        raise AssertionError("not cancelled")

    ingest._transaction = transaction  # type: ignore[method-assign]

    def arrives(n: int) -> asyncio.Task[Outcome | None]:
        d = sent(row(f"sub_{n}"), event_id=f"evt_{n}")
        return asyncio.create_task(ingest.apply(d.event, d.raw, d.reported))

    first = arrives(1)
    await async_wait_until(lambda: started == ["evt_1"], what="the first transaction")
    (runner_1,) = ingest._runners
    second = arrives(2)
    await async_wait_until(lambda: started == ["evt_1", "evt_2"], what="the second transaction")
    (runner_2,) = ingest._runners - {runner_1}
    waiting = [arrives(3), arrives(4)]
    await async_wait_until(lambda: len(ingest._waiting) == 2, what="events 3 and 4 waiting")
    requests = list(ingest._waiting)

    runner_1.cancel()
    await asyncio.gather(runner_1, return_exceptions=True)
    assert runner_1.cancelled() and ingest._runners == {runner_2}
    await async_wait_until(first.done, what="the first event's end")
    assert first.cancelled()
    assert list(ingest._waiting) == requests and not any(r.future.done() for r in requests)

    runner_2.cancel()
    await asyncio.gather(runner_2, return_exceptions=True)
    assert runner_2.cancelled() and ingest._runners == set()
    assert all(r.future.cancelled() for r in requests)
    await async_wait_until(lambda: second.done() and all(t.done() for t in waiting), what="the other events' end")
    assert second.cancelled() and all(t.cancelled() for t in waiting)
    assert started == ["evt_1", "evt_2"]  # 3 and 4 never reached a transaction

    async def commits(batch: list[batched._Request]) -> list[Outcome | None]:
        started.extend(r.delivery.event["id"] for r in batch)
        return [Outcome(OutcomeKind.APPLIED, r.delivery.event["id"]) for r in batch]

    ingest._transaction = commits  # type: ignore[method-assign]
    assert await arrives(5) == Outcome(OutcomeKind.APPLIED, "evt_5")
    assert started == ["evt_1", "evt_2", "evt_5"]  # the cancelled 3 and 4 are not committed later


async def test_a_batch_that_fails_is_retried_one_event_per_transaction_and_each_ends_as_it_would_alone() -> None:
    """A batch failing as a whole (content one event carries that the database refuses) is retried
    one event per transaction, so one event never decides another's fate: the others are decided,
    the refusing one's caller reads the driver's error (broker.ingest.errors); an event whose lone
    transaction found its rows written meanwhile (the WRITE's division by zero) goes to the general
    path (None)."""
    ingest = batched.BatchedIngest(None, RULES, refreshes=False)  # type: ignore[arg-type]
    refused = psycopg.errors.NumericValueOutOfRange("bigint out of range")
    tried: list[list[str]] = []

    async def transaction(batch: list[batched._Request]) -> list[Outcome | None]:
        ids = [r.delivery.event["id"] for r in batch]
        tried.append(ids)
        if "evt_refused" in ids:
            raise refused
        if "evt_written" in ids:
            raise psycopg.errors.DivisionByZero("division by zero")
        return [Outcome(OutcomeKind.APPLIED, i) for i in ids]

    ingest._transaction = transaction  # type: ignore[method-assign]
    good, bad = (requested(sent(row(f"sub_{n}"), event_id=f"evt_{n}")) for n in ("good", "refused"))
    await ingest._settle([good, bad])
    assert tried == [["evt_good", "evt_refused"], ["evt_good"], ["evt_refused"]]
    assert good.future.result() == Outcome(OutcomeKind.APPLIED, "evt_good")
    assert bad.future.exception() is refused
    tried.clear()
    good, written = (requested(sent(row(f"sub_{n}"), event_id=f"evt_{n}")) for n in ("good", "written"))
    await ingest._settle([written, good])
    assert tried == [["evt_written", "evt_good"], ["evt_written"], ["evt_good"]]
    assert written.future.result() is None and good.future.result() == Outcome(OutcomeKind.APPLIED, "evt_good")


class FakePg:
    """A psycopg connection in a pipeline: the statements executed, with their parameters."""

    def __init__(self) -> None:
        self.executed: list[tuple[str, Any]] = []

    @contextlib.asynccontextmanager
    async def pipeline(self) -> Any:
        yield

    async def execute(self, query: str, params: Any = None) -> None:
        self.executed.append((query, params))


async def test_a_batched_transaction_writes_what_it_decides_in_utc_and_leaves_stripe_reads_to_the_general_path() -> (
    None
):
    """With STRIPE_API_KEY (`refreshes`), an event the decision would apply as Stripe's API reads
    its object is given up (None: the general path reads Stripe), nothing written; an event it
    decides is written with the transaction's time, aware and in UTC (the rows' timestamptz
    columns), and committed in the same pipeline."""
    held = row("sub_1", status="active")
    ingest = batched.BatchedIngest(None, RULES, refreshes=True)  # type: ignore[arg-type]

    async def read(pg: Any, deliveries: list[Delivery]) -> Snapshot:
        return holding(held)

    ingest._read = read  # type: ignore[method-assign]
    pg = FakePg()
    saying_else = sent(row("sub_1", status="past_due"))  # the held version, saying something else
    assert await ingest._apply(pg, [requested(saying_else)]) == [None]  # type: ignore[arg-type]
    assert pg.executed == []
    newer = sent(row("sub_1", version=T + 1, status="past_due"))
    before = datetime.now(UTC)
    (outcome,) = await ingest._apply(pg, [requested(newer)])  # type: ignore[arg-type]
    assert outcome is not None and (outcome.kind, outcome.license_id) == (OutcomeKind.APPLIED, "lic_1")
    (write, params), commit = pg.executed
    assert write == WRITE and params["n"] == 1 and commit[0].upper() == "COMMIT"
    assert params["now"].tzinfo is UTC and before <= params["now"] <= datetime.now(UTC)


# -- the general path's reads from Stripe's API (broker.ingest.general), with a fake API ------------


class FakeApi:
    """A Refresher whose answers the test sets; each call noted, and the event it was asked for
    (whose livemode picks the key: broker.stripe_ledger.refresh)."""

    def __init__(self, **answers: Any) -> None:
        self.answers = answers
        self.calls: list[tuple[str, Any]] = []
        self.events: list[Any] = []

    def _answer(self, name: str, event: Any, arg: Any) -> Any:
        # No test asks this many: a decision that asks for a read again and again fails here, not
        # by hanging its test until pytest's timeout.
        assert len(self.calls) < 20, f"Stripe's API asked {len(self.calls)} times: {self.calls[-3:]}"
        self.calls.append((name, arg))
        self.events.append(event)
        answer = self.answers.get(name)
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def refresh(self, event: Any, obj: StripeObject, held_version: int) -> Reported | None:
        return self._answer("refresh", event, (obj.id, held_version))  # type: ignore[no-any-return]

    async def line_items(self, event: Any, session_id: str) -> list[str] | None:
        return self._answer("line_items", event, session_id)  # type: ignore[no-any-return]

    async def entitlements(self, event: Any, customer: str) -> list[str] | None:
        return self._answer("entitlements", event, customer)  # type: ignore[no-any-return]

    async def invoice_payments(self, event: Any, invoice_id: str) -> list[dict[str, Any]] | None:
        return self._answer("invoice_payments", event, invoice_id)  # type: ignore[no-any-return]


def general_with(api: Any) -> GeneralIngest:
    return GeneralIngest(None, RULES, api)  # type: ignore[arg-type]  # these reads touch no database


def test_the_general_path_reads_stripe_only_with_a_key() -> None:
    assert general_with(FakeApi()).stripe_reads is True
    assert general_with(NoRefresh()).stripe_reads is False


async def test_a_refresh_replaces_what_the_event_reports_unless_stripe_gives_nothing() -> None:
    """The object as Stripe's API reads it now (broker.stripe_ledger.refresh), asked with the held
    version; None (no key of its mode, a kind with nothing to read): the event as it is."""
    d = sent(row("sub_1", status="past_due"))
    s = holding(row("sub_1", version=T - 3))
    now_read = Reported((row("sub_1", version=T + 9, status="canceled"),), "lic_1")
    api = FakeApi(refresh=now_read)
    assert await general_with(api)._read_stripe(Wants(Need.REFRESH, ("sub_1",)), d, s) is now_read
    assert api.calls == [("refresh", ("sub_1", T - 3))] and api.events == [d.event]
    assert await general_with(FakeApi())._read_stripe(Wants(Need.REFRESH, ("sub_1",)), d, s) is d.reported
    with pytest.raises(StripeUnavailable):
        await general_with(FakeApi(refresh=StripeUnavailable("timeout")))._read_stripe(
            Wants(Need.REFRESH, ("sub_1",)), d, s
        )


async def test_line_items_read_from_stripe_are_added_as_a_fetched_object_of_the_session(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Webhooks never carry line items (https://docs.stripe.com/api/checkout/sessions/line_items):
    read, they join the event as an object of their own, outranking webhook snapshots; unreadable
    (no key of the event's mode), the purchase is judged without them and a warning says so; a
    failed read is a 503 (StripeUnavailable: Stripe retries)."""
    session = row("cs_1", "checkout", mode="payment")
    d = sent(session, created=T + 4)
    wants = Wants(Need.LINE_ITEMS, ("cs_1",))
    api = FakeApi(line_items=["price_life", "prod_x", "price_life"])
    reported = await general_with(api)._read_stripe(wants, d, Snapshot())
    assert api.calls == [("line_items", "cs_1")] and api.events == [d.event]
    assert reported.objects == (session, line_items(session, ["price_life", "prod_x"], T + 4, fetched=True))
    assert reported.objects[1].rank == FETCHED_RANK and reported.objects[1].version == T + 4
    with caplog.at_level(logging.WARNING, "broker.ingest"):
        assert await general_with(FakeApi())._read_stripe(wants, d, Snapshot()) is d.reported
    assert caplog.messages == ["the line items of cs_1 cannot be read (no key of its mode): it grants nothing"]
    with pytest.raises(StripeUnavailable):
        await general_with(FakeApi(line_items=StripeUnavailable("503")))._read_stripe(wants, d, Snapshot())


async def test_a_partial_summary_is_completed_with_the_customers_entitlements_when_they_can_be_read() -> None:
    """The summary is replaced by one listing every active entitlement (partial no more); when they
    cannot be read, or the read fails, the event applies as it is (the license says its features
    are partial) rather than a 503."""
    summary = row("entitlements:cus_1", "entitlements", features=["a"], partial=True)
    d = sent(summary, license_id=None, customer_level=True)
    wants = Wants(Need.ENTITLEMENTS, ("cus_1",))
    api = FakeApi(entitlements=["b", "a", "b"])
    reported = await general_with(api)._read_stripe(wants, d, Snapshot())
    assert api.calls == [("entitlements", "cus_1")] and api.events == [d.event]
    assert reported.objects == (complete_entitlements(summary, ["a", "b"]),)
    assert reported.objects[0].state == {"features": ["a", "b"], "partial": False}
    assert reported.customer_level and reported.license_id is None
    assert await general_with(FakeApi())._read_stripe(wants, d, Snapshot()) is d.reported
    failing = FakeApi(entitlements=StripeUnavailable("timeout"))
    assert await general_with(failing)._read_stripe(wants, d, Snapshot()) is d.reported


async def test_a_paid_invoices_payments_read_from_stripe_join_the_event_the_paid_ones_only() -> None:
    """Invoice payments, as `invoice_payment.paid` would report them
    (https://docs.stripe.com/api/invoice-payment/object), so that refunds and disputes reach the
    invoice; none readable, or the read failing: the event as it is."""
    invoice = row("in_1", "invoice", status="paid")
    d = sent(invoice, created=T + 2)
    wants = Wants(Need.INVOICE_PAYMENTS, ("in_1",))
    items = [
        {"id": "inpay_1", "invoice": "in_1", "status": "paid", "payment": {"type": "charge", "charge": "ch_1"}},
        {"id": "inpay_2", "invoice": "in_1", "status": "open", "payment": {"type": "charge", "charge": "ch_2"}},
    ]
    api = FakeApi(invoice_payments=items)
    reported = await general_with(api)._read_stripe(wants, d, Snapshot())
    assert api.calls == [("invoice_payments", "in_1")] and api.events == [d.event]
    assert reported.objects == (invoice, *invoice_payments(items[:1], T + 2))
    assert [o.id for o in reported.objects] == ["in_1", "inpay_1"]
    assert (await general_with(FakeApi())._read_stripe(wants, d, Snapshot())).objects == (invoice,)
    failing = FakeApi(invoice_payments=StripeUnavailable("timeout"))
    assert await general_with(failing)._read_stripe(wants, d, Snapshot()) is d.reported


class EmptyDatabase:
    """The general path's reader on a database holding nothing yet: every id unbound, without a row
    or a link, a license row created when locked (LicenseStore.lock). Each read noted."""

    def __init__(self) -> None:
        self.reads: list[Wants] = []

    async def read(self, wants: Wants, snapshot: Snapshot, reported: Reported) -> None:
        self.reads.append(wants)
        ids = set(wants.ids)
        if wants.need in (Need.BASE, Need.WALK):
            snapshot.binding_known |= ids
            snapshot.objects_known |= ids
            for i in ids:
                snapshot.neighbours.setdefault(i, set())
        elif wants.need is Need.LICENSES:
            snapshot.licenses |= {lid: (0, initial_state()) for lid in ids}
        elif wants.need is Need.CUSTOMER_OBJECTS:
            snapshot.customers_known |= ids
        elif wants.need is Need.CUSTOMER_LICENSES:
            snapshot.customer_licenses |= {c: set() for c in ids}
        else:
            raise AssertionError(wants)


async def test_the_general_path_reads_what_the_decision_asks_and_each_stripe_read_once() -> None:
    """`_decide`: the snapshot read as the decision asks for it (ids, license rows, customers), the
    reads from Stripe's API made once each (`done`), the event decided on what they gave."""
    session = row("cs_1", "checkout", mode="payment", status="paid")
    event = {"id": "evt_1", "type": "checkout.session.completed", "created": T}
    raw = b'{"id": "evt_1"}'
    d = Delivery(event, raw, Reported((session,), "lic_1"))
    rules = LicenseRules(["active"], ["perpetual:price_life"])
    api = FakeApi(line_items=None)  # not readable: a warning, then decided without them
    general = GeneralIngest(None, rules, api)  # type: ignore[arg-type]
    reader = EmptyDatabase()
    outcome, writes = await general._decide(reader, d)  # type: ignore[arg-type]
    assert api.calls == [("line_items", "cs_1")]
    items = line_items_id("cs_1")
    assert [(w.need, w.ids) for w in reader.reads] == [
        (Need.BASE, ("cs_1",)),
        (Need.BASE, (items,)),
        (Need.LICENSES, ("lic_1",)),
        (Need.CUSTOMER_OBJECTS, ("cus_1",)),
    ]
    assert (outcome.kind, outcome.license_id) == (OutcomeKind.APPLIED, "lic_1")
    assert writes.licenses["lic_1"][1]["entitled"] is False  # its products not known: it grants nothing
    assert items not in writes.objects
    api = FakeApi(line_items=["price_life"])
    general = GeneralIngest(None, rules, api)  # type: ignore[arg-type]
    outcome, writes = await general._decide(EmptyDatabase(), d)  # type: ignore[arg-type]
    assert api.calls == [("line_items", "cs_1")] and outcome.kind is OutcomeKind.APPLIED
    assert items in writes.objects and writes.licenses["lic_1"][1]["entitled"] is True
    assert writes.now.tzinfo is UTC and orjson.dumps(writes.events[0]["payload"]) == raw  # the body as sent
    # A read only a key allows (entitlements), made once, and the event decided on what it gave.
    summary = row("entitlements:cus_1", "entitlements", features=["a"], partial=True)
    d = Delivery(
        {**event, "type": "entitlements.active_entitlement_summary.updated"},
        raw,
        Reported((summary,), customer_level=True),
    )
    api = FakeApi(entitlements=["a", "b"])
    outcome, writes = await GeneralIngest(None, RULES, api)._decide(EmptyDatabase(), d)  # type: ignore[arg-type]
    assert api.calls == [("entitlements", "cus_1")] and outcome.kind is OutcomeKind.PENDING
    assert writes.objects[summary.id].state == {"features": ["a", "b"], "partial": False}


async def test_a_decision_that_asks_for_reads_without_end_is_a_bug_said_so_after_max_reads() -> None:
    """A reader that reads nothing (the decision asks for the same rows again): `_decide` stops
    after MAX_READS rounds and says so, rather than read for ever inside the transaction."""

    class ReadsNothing:
        def __init__(self) -> None:
            self.reads: list[Wants] = []

        async def read(self, wants: Wants, snapshot: Snapshot, reported: Reported) -> None:
            self.reads.append(wants)

    reader = ReadsNothing()
    d = Delivery({"id": "evt_1", "type": "invoice.paid", "created": T}, None, Reported((row("in_1", "invoice"),)))
    with pytest.raises(AssertionError) as raised:
        await GeneralIngest(None, RULES, FakeApi())._decide(reader, d)  # type: ignore[arg-type]
    assert raised.value.args == (f"the decision of evt_1 asked for more than {general.MAX_READS} reads",)
    assert len(reader.reads) == general.MAX_READS == 100
    assert {(w.need, w.ids) for w in reader.reads} == {(Need.BASE, ("in_1",))}


# -- the general path's transaction (GeneralIngest.commit, _Reader's locks, _flush), faked ---------


class FakeEngine:
    """An engine whose transactions (counted) all hand out `conn`."""

    def __init__(self, conn: Any = None) -> None:
        self.conn = conn
        self.transactions = 0

    @contextlib.asynccontextmanager
    async def begin(self) -> Any:
        self.transactions += 1
        yield self.conn


class BusyAttempts(GeneralIngest):
    """The general path whose decision finds ids locked elsewhere (LocksBusy): at attempt n the
    ids `busy[n - 1]`, or at every attempt (`busy=None`); past them it decides. Each attempt's
    reader (whether it waits, the ids it takes first) and delivery noted."""

    def __init__(self, busy: list[set[str]] | None) -> None:
        super().__init__(FakeEngine(), RULES, NoRefresh())  # type: ignore[arg-type]
        self.busy = busy
        self.readers: list[tuple[bool, set[str]]] = []
        self.deliveries: list[Delivery] = []

    async def _decide(self, reader: Any, delivery: Delivery) -> tuple[Outcome, Writes]:
        self.readers.append((reader.wait, set(reader.extra)))
        self.deliveries.append(delivery)
        attempt = len(self.readers)
        if self.busy is None or attempt <= len(self.busy):
            raise LocksBusy(self.busy[attempt - 1] if self.busy else {f"ch_{attempt}"})
        return Outcome(OutcomeKind.APPLIED, "lic_1"), Writes(NOW)


@pytest.fixture
def committed(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[Any]]:
    """general.py's record and _flush faked: the event ids recorded (each attempt records its event
    anew: the attempts before were rolled back) and the (outcome, event id) flushed."""
    seen: dict[str, list[Any]] = {"recorded": [], "flushed": []}

    async def recorded(conn: Any, event: dict[str, Any], raw: bytes | None = None, outcome: Any = None) -> bool:
        seen["recorded"].append(event["id"])
        return True

    async def flushed(conn: Any, writes: Writes, outcome: Outcome, event_id: str) -> None:
        seen["flushed"].append((outcome, event_id))

    monkeypatch.setattr(general, "record", recorded)
    monkeypatch.setattr(general, "_flush", flushed)
    return seen


async def test_a_commit_that_finds_ids_locked_elsewhere_starts_again_holding_them_and_waits_at_the_last_attempt(
    committed: dict[str, list[Any]],
) -> None:
    """LocksBusy rolls the attempt back; the next takes first every id found busy so far (sorted,
    with the event's own: no wait on an id while holding others); only the last attempt of
    LOCK_ATTEMPTS waits for the ids its walk finds. Every attempt decides the event as delivered."""
    ingest = BusyAttempts([{"ch_2"}, {"ch_1"}])
    event = {"id": "evt_1", "type": "customer.subscription.updated", "created": T}
    raw = b'{"id":  "evt_1"}'
    reported = Reported((row("sub_1"),), "lic_1")
    outcome = await ingest.commit(event, raw, reported)

    assert LOCK_ATTEMPTS == 3
    assert ingest.readers == [(False, set()), (False, {"ch_2"}), (True, {"ch_1", "ch_2"})]
    assert ingest.engine.transactions == 3  # type: ignore[attr-defined]
    assert committed["recorded"] == ["evt_1"] * 3
    assert committed["flushed"] == [(outcome, "evt_1")] and outcome.kind is OutcomeKind.APPLIED
    assert all(d.event is event and d.raw is raw and d.reported is reported for d in ingest.deliveries)


async def test_a_commit_whose_waiting_attempt_still_finds_locks_busy_is_a_bug_said_so(
    committed: dict[str, list[Any]],
) -> None:
    """The last attempt waits for every lock, so LocksBusy cannot reach it: if it did, the commit
    fails loudly after LOCK_ATTEMPTS rather than trying for ever or answering as if decided."""
    ingest = BusyAttempts(None)
    with pytest.raises(AssertionError) as raised:
        await ingest.commit({"id": "evt_1"}, None, Reported((row("sub_1"),), "lic_1"))
    assert raised.value.args == ("the last attempt waits for its locks",)
    assert [wait for wait, _ in ingest.readers] == [False, False, True]
    assert committed["flushed"] == []


async def test_a_commit_recorded_before_is_a_duplicate_and_decides_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    async def recorded_before(*args: Any) -> bool:
        return False

    monkeypatch.setattr(general, "record", recorded_before)
    ingest = BusyAttempts([])
    assert await ingest.commit({"id": "evt_1"}, None, Reported((row("sub_1"),), "lic_1")) is DUPLICATE
    assert ingest.readers == []


async def test_an_event_decided_without_the_database_is_recorded_with_its_outcome_and_body_as_sent() -> None:
    conn = _Connection()
    event = {"id": "evt_1", "type": "invoice.paid", "created": T}
    outcome = Outcome(OutcomeKind.UNMATCHED, reason="no license")
    ingest = GeneralIngest(FakeEngine(conn), RULES, NoRefresh())  # type: ignore[arg-type]
    assert await ingest.record(event, b'{"id":  "evt_1"}', outcome) is outcome
    params = conn.compiled().params
    assert (params["param_1"], params["outcome"], params["reason"]) == ('{"id":  "evt_1"}', "unmatched", "no license")
    again = GeneralIngest(FakeEngine(_Connection(first=None)), RULES, NoRefresh())  # type: ignore[arg-type]
    assert await again.record(event, b"{}", outcome) is DUPLICATE


class HoldingDatabase(EmptyDatabase):
    """The reader on a database holding what `held` read (its first read fills the snapshot with
    it), else as EmptyDatabase."""

    def __init__(self, held: Snapshot) -> None:
        super().__init__()
        self.held = held

    async def read(self, wants: Wants, snapshot: Snapshot, reported: Reported) -> None:
        if not self.reads:
            for f in dataclasses.fields(Snapshot):
                setattr(snapshot, f.name, copy.deepcopy(getattr(self.held, f.name)))
        await super().read(wants, snapshot, reported)


async def test_the_general_path_refreshes_an_object_from_stripe_with_the_version_it_holds() -> None:
    """A snapshot of the held version saying something else: Stripe's API is asked for the object
    (with the version the database holds), and the event decided on what it reads now."""
    held = row("sub_1", status="active")
    now_read = Reported((row("sub_1", version=T + 9, status="canceled"),), "lic_1")
    api = FakeApi(refresh=now_read)
    d = sent(row("sub_1", status="past_due"))
    outcome, writes = await general_with(api)._decide(HoldingDatabase(holding(held)), d)  # type: ignore[arg-type]
    assert api.calls == [("refresh", ("sub_1", T))]
    assert (outcome.kind, outcome.license_id) == (OutcomeKind.APPLIED, "lic_1")
    assert writes.objects["sub_1"] == now_read.primary
    assert writes.licenses["lic_1"][1]["status"] == "canceled"


async def test_the_general_path_never_flushes_a_new_license_row_it_locks_every_row_first() -> None:
    """_Reader creates each license row as it locks it (LicenseStore.lock): a decision that still
    creates one is a bug, said so before anything of it is written."""
    writes = Writes(NOW, created={"lic_1": (1, initial_state())})
    with pytest.raises(AssertionError) as raised:
        await general._flush(None, writes, Outcome(OutcomeKind.APPLIED, "lic_1"), "evt_1")  # type: ignore[arg-type]
    assert raised.value.args == ("the general path's license rows exist once locked",)


@pytest.fixture
def locks(monkeypatch: pytest.MonkeyPatch) -> list[tuple[set[str | None], bool]]:
    """LedgerStore on a database holding nothing: no binding, no object; each lock_ids call noted
    (the ids, and whether it waits; its own default: wait)."""
    taken: list[tuple[set[str | None], bool]] = []

    async def lock_ids(conn: Any, ids: Any, *, wait: bool = True) -> None:
        taken.append((set(ids), wait))

    async def nothing(conn: Any, ids: Any) -> dict[str, Any]:
        return {}

    monkeypatch.setattr(LedgerStore, "lock_ids", staticmethod(lock_ids))
    monkeypatch.setattr(LedgerStore, "bindings", staticmethod(nothing))
    monkeypatch.setattr(LedgerStore, "objects", staticmethod(nothing))
    return taken


class NoLinks:
    """A connection whose queries (the walk's links) find no row."""

    async def execute(self, statement: Any) -> Any:
        return SimpleNamespace(all=list)


async def test_the_first_read_locks_the_events_ids_with_its_customer_and_the_ids_found_busy_before(
    locks: list[tuple[set[str | None], bool]],
) -> None:
    """The first lock of the transaction (BASE) takes the event's ids, its customer and the ids an
    earlier attempt found busy, in one go, waiting for them; later reads lock only the ids they add
    (never one twice): a BASE read waiting, a walk's waiting only at the last attempt (else
    LocksBusy), whatever the event reports meanwhile."""
    reported = Reported((row("sub_1", links=("in_1",)),), "lic_1")
    for wait in (False, True):
        locks.clear()
        reader = general._Reader(NoLinks(), {"ch_busy"}, wait=wait)  # type: ignore[arg-type]
        snapshot = Snapshot()
        await reader.read(Wants(Need.BASE, ("in_1", "sub_1")), snapshot, reported)
        # A second BASE read (a line items id), reporting another customer now: its new id only.
        other = Reported((row("li_1", customer="cus_2"),), "lic_1")
        await reader.read(Wants(Need.BASE, ("li_1", "sub_1")), snapshot, other)
        await reader.read(Wants(Need.WALK, ("ch_2", "ch_busy", "in_1")), snapshot, reported)
        assert locks == [({"in_1", "sub_1", CUS, "ch_busy"}, True), ({"li_1"}, True), ({"ch_2"}, wait)], wait
        assert snapshot.neighbours == {"ch_2": set(), "ch_busy": set(), "in_1": set()}


async def test_an_event_without_a_customer_locks_only_its_ids_and_those_found_busy_before(
    locks: list[tuple[set[str | None], bool]],
) -> None:
    reader = general._Reader(NoLinks(), set(), wait=True)  # type: ignore[arg-type]
    await reader.read(Wants(Need.BASE, ("ch_1",)), Snapshot(), Reported((row("ch_1", "charge", customer=None),)))
    assert locks == [({"ch_1"}, True)]


async def test_the_database_reader_is_never_asked_for_a_read_from_stripe() -> None:
    """Reads from Stripe's API are GeneralIngest._read_stripe's: asked of the reader, a bug named by
    its need."""
    reader = general._Reader(NoLinks(), set(), wait=True)  # type: ignore[arg-type]
    for need in sorted(STRIPE_READS, key=lambda n: n.name):
        with pytest.raises(AssertionError) as raised:
            await reader.read(Wants(need, ("sub_1",)), Snapshot(), Reported((row("sub_1"),)))
        assert raised.value.args == (need,)


# -- the use case (broker.ingest.service.Ingestor), its paths and transport faked ---------------


def fake_runtime(dialect: str = "sqlite", publish: Any = None) -> Any:
    async def published(license_id: str, data: bytes) -> None:
        sent_out.append((license_id, data))

    sent_out: list[tuple[str, bytes]] = []
    transport = SimpleNamespace(publish=publish or published, sent=sent_out)
    return SimpleNamespace(engine=SimpleNamespace(dialect=SimpleNamespace(name=dialect)), transport=transport)


class FakePath:
    """The general or batched path: what it was given, and what it answers."""

    def __init__(self, answer: Any = None, *, eligible: bool = True) -> None:
        self.answer, self.calls, self._eligible = answer, list[tuple[str, Any]](), eligible
        self.asked: list[Reported] = []  # what `eligible` was asked of

    def eligible(self, reported: Reported) -> bool:
        self.asked.append(reported)
        return self._eligible

    async def _done(self, name: str, *args: Any) -> Any:
        self.calls.append((name, args))
        if isinstance(self.answer, BaseException):
            raise self.answer
        return self.answer

    async def apply(self, *args: Any) -> Any:
        return await self._done("apply", *args)

    async def commit(self, *args: Any) -> Any:
        return await self._done("commit", *args)

    async def record(self, *args: Any) -> Any:
        return await self._done("record", *args)


def subscription_event(event_id: str = "evt_1", **extra: Any) -> dict[str, Any]:
    event = SampleEvents("lic_s").subscription_event("customer.subscription.updated", "active", T)
    return {**event, "id": event_id, **extra}


def test_the_ingestor_takes_the_batched_path_on_postgres_unless_told_and_refreshes_with_a_key() -> None:
    rules = RULES
    on_pg = Ingestor(fake_runtime("postgresql"), rules)
    assert on_pg.batched is not None and on_pg.batched.refreshes is False and on_pg.batched.rules is rules
    assert isinstance(on_pg.refresher, NoRefresh) and on_pg.filter == EventFilter() and on_pg.after_commit is None
    assert on_pg.general.rules is rules and on_pg.general.refresher is on_pg.refresher
    keyed = Ingestor(fake_runtime("postgresql"), rules, refresher=FakeApi())  # type: ignore[arg-type]
    assert keyed.batched is not None and keyed.batched.refreshes is True and keyed.general.stripe_reads is True
    assert Ingestor(fake_runtime("postgresql"), rules, batching=False).batched is None
    assert Ingestor(fake_runtime("postgresql"), rules, batching=True).batched is not None
    assert Ingestor(fake_runtime("sqlite"), rules).batched is None
    assert Ingestor(fake_runtime("sqlite"), rules, batching=False).batched is None
    with pytest.raises(ValueError, match=r"^the batched ingest needs Postgres$"):
        Ingestor(fake_runtime("sqlite"), rules, batching=True)
    listed = EventFilter(accounts=frozenset({"acct_1"}))
    after: list[Outcome] = []
    ingestor = Ingestor(fake_runtime(), rules, listed, after_commit=after.append)
    assert ingestor.filter is listed and ingestor.after_commit == after.append


def test_an_event_that_cannot_change_a_license_is_screened_with_its_outcome() -> None:
    """STRIPE_LIVEMODE / STRIPE_ACCOUNTS: ignored, payload kept (a fixed setting and `rebuild`
    apply it); a license id the broker cannot hold: rejected; content it cannot use: unmatched; a
    type no rule reads: ignored without its payload (docs/stripe.md)."""
    ingestor = Ingestor(fake_runtime(), RULES, EventFilter(livemode=True))
    assert ingestor.screen(subscription_event(livemode=False)) == Outcome(
        OutcomeKind.IGNORED, reason="test-mode event, STRIPE_LIVEMODE=true"
    )
    ingestor = Ingestor(fake_runtime(), RULES)
    bad = subscription_event()
    bad["data"]["object"]["metadata"] = {"license_id": "x" * 500}
    rejected = ingestor.screen(bad)
    assert isinstance(rejected, Outcome) and rejected.kind is OutcomeKind.REJECTED
    assert rejected.reason is not None and rejected.reason.startswith("license_id must be 1-")
    no_id = subscription_event()
    del no_id["data"]["object"]["id"]
    unmatched = ingestor.screen(no_id)
    assert isinstance(unmatched, Outcome) and (unmatched.kind, unmatched.reason) == (
        OutcomeKind.UNMATCHED,
        "object without an id",
    )
    unused = {"id": "evt_c", "type": "customer.created", "created": T, "data": {"object": {"id": "cus_1"}}}
    assert ingestor.screen(unused) == Outcome(OutcomeKind.IGNORED, reason="event type not used", keep_payload=False)
    reported = ingestor.screen(subscription_event())
    assert isinstance(reported, Reported) and reported.license_id == "lic_s"


def test_an_api_version_whose_invoices_name_no_payment_is_warned_of_once_and_only_without_a_key(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """2025-03-31 to 2025-05-28 (broker.stripe_ledger.objects.UNLINKED_VERSIONS): refunds and disputes
    of subscription payments cannot reach their licenses unless the broker reads the payments."""
    ingestor = Ingestor(fake_runtime(), RULES)
    with caplog.at_level(logging.WARNING, "broker.ingest"):
        ingestor.screen(subscription_event(api_version="2025-06-30.basil"))
        assert caplog.messages == [] and ingestor._warned_unlinked is False
        ingestor.screen(subscription_event(api_version="2025-04-30.basil"))
        ingestor.screen(subscription_event(api_version="2025-03-31.basil"))
    assert len(caplog.messages) == 1 and ingestor._warned_unlinked
    assert caplog.messages[0] == (
        "Stripe events of API version 2025-04-30.basil name no payment on their invoices and come without "
        "invoice_payment.paid: refunds and disputes of subscription payments cannot reach their licenses. "
        "Set STRIPE_API_KEY (the broker then reads each paid invoice's payments) or move the webhook endpoint "
        "to API version 2025-05-28 or later (docs/stripe.md)"
    )
    assert "Set STRIPE_API_KEY" in caplog.messages[0]
    caplog.clear()
    keyed = Ingestor(fake_runtime(), RULES, refresher=FakeApi())  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING, "broker.ingest"):
        keyed.screen(subscription_event(api_version="2025-04-30.basil"))
    assert caplog.messages == [] and keyed._warned_unlinked


async def test_an_event_that_cannot_be_stored_under_its_id_is_answered_unmatched_and_not_recorded(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ingestor = Ingestor(fake_runtime(), RULES)
    ingestor.general = FakePath()  # type: ignore[assignment]
    with caplog.at_level(logging.WARNING, "broker.ingest"):
        outcome = await ingestor.ingest(subscription_event(event_id=""))
    assert outcome == Outcome(OutcomeKind.UNMATCHED, reason="event id is not a Stripe id")
    assert caplog.messages == ["webhook event not recorded: event id is not a Stripe id"]
    assert ingestor.general.calls == []  # type: ignore[attr-defined]


async def test_each_event_takes_the_path_that_can_decide_it() -> None:
    """Screened out: recorded with its outcome (general.record). The batched path when eligible,
    the general one when it gives the event up (None) or cannot take it."""
    applied = Outcome(OutcomeKind.APPLIED, "lic_s")
    event, raw = subscription_event(), b"{}"
    ingestor = Ingestor(fake_runtime("postgresql"), RULES)
    ingestor.general, ingestor.batched = FakePath(applied), FakePath(applied)  # type: ignore[assignment]
    assert await ingestor.ingest(event, raw) is applied
    assert [c[0] for c in ingestor.batched.calls] == ["apply"] and ingestor.general.calls == []  # type: ignore[attr-defined]
    assert ingestor.batched.calls[0][1][:2] == (event, raw)  # type: ignore[attr-defined]
    assert isinstance(ingestor.batched.calls[0][1][2], Reported)  # type: ignore[attr-defined]
    reported = ingestor.batched.calls[0][1][2]  # type: ignore[attr-defined]
    assert ingestor.batched.asked == [reported]  # type: ignore[attr-defined]
    ingestor.batched = FakePath(None)  # type: ignore[assignment]
    assert await ingestor.ingest(event, raw) is applied
    assert [c[0] for c in ingestor.general.calls] == ["commit"]  # type: ignore[attr-defined]
    assert ingestor.general.calls[0][1] == (event, raw, reported)  # type: ignore[attr-defined]
    ingestor.general, ingestor.batched = FakePath(applied), FakePath(applied, eligible=False)  # type: ignore[assignment]
    assert await ingestor.ingest(event, raw) is applied
    assert ingestor.batched.calls == [] and [c[0] for c in ingestor.general.calls] == ["commit"]  # type: ignore[attr-defined]
    assert ingestor.batched.asked == [reported] and ingestor.general.calls[0][1] == (event, raw, reported)  # type: ignore[attr-defined]
    ingestor.general = FakePath(DUPLICATE)  # type: ignore[assignment]
    ingestor.batched = None
    unused = {"id": "evt_c", "type": "customer.created", "created": T, "data": {"object": {"id": "cus_1"}}}
    assert await ingestor.ingest(unused, raw) is DUPLICATE
    assert ingestor.general.calls == [  # type: ignore[attr-defined]
        ("record", (unused, raw, Outcome(OutcomeKind.IGNORED, reason="event type not used", keep_payload=False)))
    ]


async def test_content_the_database_refuses_is_recorded_without_it_and_a_stripe_outage_is_a_503(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Never a 5xx for content (Stripe would retry it for three days): the event is recorded by
    its id, type and time, unmatched; a failed read from Stripe's API is IngestUnavailable (503)."""
    event = subscription_event()
    ingestor = Ingestor(fake_runtime(), RULES)
    stub_outcome = Outcome(OutcomeKind.UNMATCHED, reason="content the database refuses")

    class Refusing(FakePath):
        async def commit(self, *args: Any) -> Any:
            raise IngestRefused("NumericValueOutOfRange")

    ingestor.general = Refusing(stub_outcome)  # type: ignore[assignment]
    with caplog.at_level(logging.WARNING, "broker.ingest"):
        assert await ingestor.ingest(event) is stub_outcome
    stub = {"id": "evt_1", "type": "customer.subscription.updated", "created": T, "refused": True}
    assert ingestor.general.calls == [("record", (stub, None, stub_outcome))]  # type: ignore[attr-defined]
    assert caplog.messages == ["webhook evt_1: content refused by the database (NumericValueOutOfRange)"]
    ingestor.general = FakePath(StripeUnavailable("read timed out"))  # type: ignore[assignment]
    with pytest.raises(IngestUnavailable) as unavailable:
        await ingestor.ingest(event)
    assert (unavailable.value.what, str(unavailable.value)) == ("Stripe API", "read timed out")
    assert isinstance(unavailable.value.__cause__, StripeUnavailable)


async def test_what_an_event_appended_is_published_after_the_commit_and_a_failed_publish_is_only_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """After the commit the event is safe: a failed publish is logged and counted, the stream's gap
    fetch or database sweep delivers it (docs/testing.md); `after_commit` runs before any publish."""
    a, b = LicenseEvent("lic_a", 3, b"A"), LicenseEvent("lic_b", 1, b"B")
    applied = Outcome(OutcomeKind.APPLIED, "lic_a", (a, b))
    order: list[Any] = []
    runtime = fake_runtime()
    ingestor = Ingestor(runtime, RULES, after_commit=lambda o: order.append(("after", o)))
    ingestor.general = FakePath(applied)  # type: ignore[assignment]
    assert await ingestor.ingest(subscription_event()) is applied
    assert order == [("after", applied)] and runtime.transport.sent == [("lic_a", b"A"), ("lic_b", b"B")]

    async def failing(license_id: str, data: bytes) -> None:
        order.append(license_id)
        raise ConnectionError("redis down")

    ingestor = Ingestor(fake_runtime(publish=failing), RULES)
    ingestor.general = FakePath(applied)  # type: ignore[assignment]
    before = REGISTRY.get_sample_value("license_broker_publish_failures_total") or 0
    with caplog.at_level(logging.WARNING, "broker.ingest"):
        assert await ingestor.ingest(subscription_event()) is applied
    assert order[-2:] == ["lic_a", "lic_b"]
    assert REGISTRY.get_sample_value("license_broker_publish_failures_total") == before + 2
    assert caplog.messages == ["publish of lic_a seq 3 failed: redis down", "publish of lic_b seq 1 failed: redis down"]
