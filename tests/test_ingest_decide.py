"""broker.ingest.decide without a database: what it asks for, what it writes, how a batch moves
its snapshot on (the two paths that feed it: tests/test_ingest_differential.py)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson

from broker.ingest.decide import Delivery, Need, Snapshot, Wants, decide
from broker.ingest.outcomes import Outcome, OutcomeKind
from broker.stripe_ledger.ledger import LicenseRules
from broker.stripe_ledger.objects import report
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
