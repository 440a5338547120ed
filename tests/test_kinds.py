"""The kind registry (broker.stripe_ledger.kinds) is complete: every kind has every part, every
event type users enable reports a registered kind, the refresh reads every kind it can read from
Stripe's API, and a kind nobody registered is refused."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, get_args

import pytest

from broker.stripe_ledger.kinds import (
    BROKER_KINDS,
    BY_EVENT,
    CUSTOMER_KINDS,
    EVENT_TYPES,
    KINDS,
    RETRIEVE,
    KindSpec,
    build_registry,
    report,
    spec_of,
)
from broker.stripe_ledger.ledger import Kind, StripeObject, UnknownKind
from broker.stripe_ledger.refresh import StripeRefresher
from tests.support.stripe_api import EXAMPLES, FakeStripeApi, envelope

T = 1_800_000_000
DOCS = Path(__file__).parents[1] / "docs" / "stripe.md"
# Where Stripe's API serves one object of each kind the refresh reads (https://docs.stripe.com/api).
API_PATHS: dict[str, str] = {
    "subscription": "/v1/subscriptions/{}",
    "checkout": "/v1/checkout/sessions/{}",
    "invoice": "/v1/invoices/{}",
    "invoice_payment": "/v1/invoice_payments/{}",
    "charge": "/v1/charges/{}",
    "refund": "/v1/refunds/{}",
    "dispute": "/v1/disputes/{}",
    "payment_intent": "/v1/payment_intents/{}",
}


def enabled_event_types() -> set[str]:
    """The event types docs/stripe.md tells users to enable (its section 2): a cell lists full
    types, or a full type followed by `.suffix` shorthands of the same object."""
    section = DOCS.read_text().split("## 2.", 1)[1].split("## 3.", 1)[0]
    found: set[str] = set()
    for row in section.splitlines():
        if not row.startswith("|"):
            continue
        prefix = None
        for name in re.findall(r"`([a-z_.]+)`", row.split("|")[1]):
            if name.startswith("."):
                assert prefix is not None, row
                found.add(prefix + name)
            else:
                found.add(name)
                prefix = name.rpartition(".")[0]
    return found


def example(spec: KindSpec, object_id: str) -> dict[str, Any]:
    """Stripe's published example of the kind's object, as a purchase the ledger reads."""
    assert spec.stripe_object is not None
    obj = copy.deepcopy(EXAMPLES[spec.stripe_object])
    obj.update(id=object_id, livemode=False)
    if spec.kind == "checkout":
        obj.update(mode="payment", payment_status="paid", status="complete")
    if spec.kind in CUSTOMER_KINDS:
        obj["customer"] = "cus_kinds"
    return obj


def test_the_registry_and_the_kind_type_list_the_same_kinds() -> None:
    assert set(KINDS) == set(get_args(Kind))
    assert all(kind == spec.kind for kind, spec in KINDS.items())


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_kind_has_every_part(kind: Kind) -> None:
    spec = KINDS[kind]
    assert spec.problems() == []
    if spec.events:
        assert spec.stripe_object is not None
        # Its Stripe object is one Stripe publishes (the examples of its OpenAPI description).
        assert EXAMPLES[spec.stripe_object]["object"] == spec.stripe_object
    if spec.part_of is not None:
        assert KINDS[spec.part_of].events, "a part is made by the parser of a kind reported by events"
    # What the refresh cannot read is customer-level, a part, or the broker's own; the rest it reads.
    assert (kind in RETRIEVE) == (kind not in CUSTOMER_KINDS | BROKER_KINDS and spec.part_of is None)


def test_every_event_type_users_enable_reports_a_registered_kind() -> None:
    enabled = enabled_event_types()
    assert len(enabled) > 30  # the table was read
    assert enabled == set(EVENT_TYPES)
    for event_type in enabled:
        assert BY_EVENT[event_type].kind in KINDS
        assert event_type in BY_EVENT[event_type].events


@pytest.mark.parametrize("event_type", EVENT_TYPES)
def test_each_event_type_is_read_by_its_kinds_parser(event_type: str) -> None:
    spec = BY_EVENT[event_type]
    reported = report(envelope(event_type, example(spec, f"obj_{spec.kind}"), T))
    assert reported is not None
    assert reported.primary.kind == spec.kind
    assert reported.customer_level == spec.customer_level
    for part in reported.objects[1:]:
        assert KINDS[part.kind].part_of == spec.kind


@pytest.mark.parametrize(
    ("event_type", "part"),
    [
        ("customer.subscription.trial_will_end", "trial_notice"),
        ("invoice.payment_action_required", "action_notice"),
        ("checkout.session.completed", "line_items"),
    ],
)
def test_each_part_is_made_by_the_parser_of_its_kind(event_type: str, part: Kind) -> None:
    spec = BY_EVENT[event_type]
    obj = example(spec, f"obj_{spec.kind}")
    if part == "line_items":
        obj["line_items"] = {"object": "list", "data": [{"price": {"id": "price_kinds"}}]}
    reported = report(envelope(event_type, obj, T))
    assert reported is not None
    assert [o.kind for o in reported.objects] == [spec.kind, part]
    assert KINDS[part].part_of == spec.kind


def test_ranks_order_the_stages_of_each_kind() -> None:
    assert spec_of("subscription").rank("canceled") > spec_of("subscription").rank("past_due")
    assert spec_of("invoice").rank("paid") > spec_of("invoice").rank("failed")
    assert spec_of("refund").rank("failed") > spec_of("refund").rank("succeeded")
    assert spec_of("trial").rank("ended") > spec_of("trial").rank("trialing")
    assert spec_of("charge").rank("no such status") == 0


@pytest.mark.parametrize("kind", sorted(RETRIEVE))
async def test_the_refresh_reads_every_kind_it_can_read(kind: Kind, fake_api: tuple[FakeStripeApi, str]) -> None:
    api, base = fake_api
    spec = KINDS[kind]
    object_id = f"obj_refresh_{kind}"
    path = API_PATHS[kind].format(object_id)
    api.objects[path] = example(spec, object_id)
    event_type = next(iter(spec.events))
    event = envelope(event_type, example(spec, object_id), T)
    held = report(event)
    assert held is not None
    refresher = StripeRefresher("sk_test_kinds", base)
    try:
        fresh = await refresher.refresh(event, held.primary, T)
    finally:
        await refresher.aclose()
    assert api.requests == [path]
    assert fresh is not None
    assert (fresh.primary.id, fresh.primary.kind) == (object_id, kind)
    assert fresh.primary.rank > held.primary.rank  # the read outranks the event's snapshot


async def test_a_kind_the_refresh_cannot_read_makes_no_request(fake_api: tuple[FakeStripeApi, str]) -> None:
    api, base = fake_api
    event = envelope("customer.deleted", example(KINDS["customer"], "cus_kinds"), T)
    held = report(event)
    assert held is not None
    refresher = StripeRefresher("sk_test_kinds", base)
    try:
        assert await refresher.refresh(event, held.primary, T) is None
    finally:
        await refresher.aclose()
    assert api.requests == []


@pytest.mark.parametrize("name", ["chekout", "Checkout", "checkout ", "", "perpetual"])
def test_an_unknown_kind_is_refused(name: str) -> None:
    with pytest.raises(UnknownKind):
        spec_of(name)
    with pytest.raises(UnknownKind):
        StripeObject("obj_unknown", name, T, 0, {})  # type: ignore[arg-type]  # what a database row may hold


def test_a_registry_that_misses_a_part_or_a_kind_does_not_load() -> None:
    entries = list(KINDS.values())
    build_registry(entries)  # the real one loads
    with pytest.raises(UnknownKind, match="charge has no entry"):
        build_registry([s for s in entries if s.kind != "charge"])
    with pytest.raises(UnknownKind, match="dispute is registered twice"):
        build_registry([*entries, KINDS["dispute"]])
    unreadable = KindSpec(**{**_fields(KINDS["refund"]), "retrieve": None})
    with pytest.raises(UnknownKind, match="refund has no way to be read"):
        build_registry([unreadable if s.kind == "refund" else s for s in entries])
    unparsed = KindSpec(**{**_fields(KINDS["invoice"]), "parse": None})
    with pytest.raises(UnknownKind, match="invoice has events without a parser"):
        build_registry([unparsed if s.kind == "invoice" else s for s in entries])
    claims = KindSpec(**{**_fields(KINDS["refund"]), "events": {**KINDS["refund"].events, "charge.refunded": None}})
    with pytest.raises(UnknownKind, match=r"charge\.refunded is claimed by charge and refund"):
        build_registry([claims if s.kind == "refund" else s for s in entries])
    orphan = KindSpec(**{**_fields(KINDS["line_items"]), "part_of": "trial"})
    with pytest.raises(UnknownKind, match="line_items is a part of trial, which no event reports"):
        build_registry([orphan if s.kind == "line_items" else s for s in entries])
    stray = KindSpec("chekout", "https://docs.stripe.com/api", broker=True)  # type: ignore[arg-type]
    with pytest.raises(UnknownKind, match="chekout"):
        build_registry([*entries, stray])


def _fields(spec: KindSpec) -> dict[str, Any]:
    return {name: getattr(spec, name) for name in KindSpec.__dataclass_fields__}
