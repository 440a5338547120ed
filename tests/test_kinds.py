"""The kind registry (broker.stripe_ledger.kinds) is complete: every kind has every part, every
event type users enable reports a registered kind, the refresh reads every kind it can read from
Stripe's API, and a kind nobody registered is refused."""

from __future__ import annotations

import copy
import re
from dataclasses import replace
from pathlib import Path
from typing import Any, get_args

import pytest

from broker.stripe_ledger import fields
from broker.stripe_ledger.fields import BadLicenseId, Reported, Unprocessable
from broker.stripe_ledger.kinds import (
    BROKER_KINDS,
    BY_EVENT,
    CUSTOMER_KINDS,
    EVENT_TYPES,
    KINDS,
    RETRIEVE,
    KindSpec,
    build_registry,
    charge_rank,
    complete_entitlements,
    line_items,
    rank_of,
    report,
    spec_of,
)
from broker.stripe_ledger.ledger import FETCHED_RANK, MAX_AMOUNT, Kind, StripeObject, UnknownKind
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
    # rank_of: the broker's own trial (broker.licensing.trials) ends after it runs.
    assert (rank_of("trial", "trialing"), rank_of("trial", "ended"), rank_of("trial", None)) == (0, 1, 0)
    assert (rank_of("invoice", "paid"), rank_of("subscription", "canceled")) == (4, 99)


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


# -- each parser's rules on their own, from `data.object` ------------------------------------------
# Pure tests, written before kinds.py's mutation run (docs/testing.md): each reads one object the
# way its parser does and compares the whole report (every row's id, kind, version, rank, state,
# customer and links; the license and how it is named) with the one the rule gives, so a field read
# under another key, an argument dropped or a link lost fails here, in milliseconds. Each rule cites
# the Stripe docs page it comes from.

CUS = "cus_rules"


def read(event_type: str, obj: dict[str, Any], created: int = T, *, fetched: bool = False) -> Reported | None:
    """What `report` makes of an event: only `type`, `created` and `data.object` are read."""
    return report({"type": event_type, "created": created, "data": {"object": obj}}, fetched=fetched)


def row(
    kind: Kind, object_id: str, rank: int, state: dict[str, Any], *links: str, customer: str | None = CUS
) -> StripeObject:
    return StripeObject(object_id, kind, T, rank, state, customer, frozenset(links))


def subscription(**fields: Any) -> dict[str, Any]:
    return {"id": "sub_1", "object": "subscription", "customer": CUS, "status": "active"} | fields


def price(price_id: str, product: str, max_machines: str | None = None) -> dict[str, Any]:
    metadata = {} if max_machines is None else {"max_machines": max_machines}
    return {"id": price_id, "object": "price", "product": product, "metadata": metadata}


SUBSCRIPTION_STATE = {
    "status": "active",
    "latest_invoice": None,
    "current_period_end": None,
    "cancel_at": None,
    "cancel_at_period_end": False,
    "trial_end": None,
    "collection_method": None,
    "products": [],
}


def test_a_subscription_is_read_with_its_period_on_its_items_since_2025_03_31() -> None:
    """https://docs.stripe.com/api/subscriptions/object: since 2025-03-31 the period is on each
    item (https://docs.stripe.com/api/subscription_items/object, `current_period_end`); the
    subscription's own (an older shape) is read only when no item has one. The latest period ends
    last. Its latest invoice (an id, or the object when expanded) is a link; `max_machines` of its
    metadata and of its items' prices are kept; fields no rule reads are not."""
    obj = subscription(
        latest_invoice={"id": "in_1", "object": "invoice"},
        current_period_end=T + 999,
        items={
            "object": "list",
            "data": [
                {"id": "si_1", "current_period_end": T + 100, "price": price("price_a", "prod_a", "3")},
                {"id": "si_2", "current_period_end": T + 200, "price": price("price_b", "prod_b", "5")},
                {"id": "si_3", "current_period_end": None, "price": price("price_b", "prod_b")},
            ],
        },
        cancel_at=T + 300,
        cancel_at_period_end=True,
        trial_end=T + 50,
        collection_method="send_invoice",
        metadata={"license_id": "lic_1", "max_machines": "2"},
        description="ignored",
        default_payment_method="pm_ignored",
    )
    state = SUBSCRIPTION_STATE | {
        "latest_invoice": "in_1",
        "current_period_end": T + 200,
        "cancel_at": T + 300,
        "cancel_at_period_end": True,
        "trial_end": T + 50,
        "collection_method": "send_invoice",
        "products": ["price_a", "price_b", "prod_a", "prod_b"],
        "max_machines": 2,
        "price_max_machines": 5,
    }
    assert read("customer.subscription.updated", obj) == Reported(
        (row("subscription", "sub_1", 3, state, "in_1"),), "lic_1"
    )


@pytest.mark.parametrize(
    "items",
    [
        None,
        {"object": "list", "data": []},
        {"object": "list", "data": [{"id": "si_1", "price": price("price_a", "prod_a")}]},
        {"object": "list", "data": [{"id": "si_1", "current_period_end": True}, "not an item"]},
    ],
)
def test_before_2025_03_31_the_period_is_the_subscriptions_own(items: Any) -> None:
    """https://docs.stripe.com/api/subscriptions/object (API versions before 2025-03-31):
    `current_period_end` is on the subscription when no item carries a timestamp of its own."""
    reported = read("customer.subscription.created", subscription(items=items, current_period_end=T + 400))
    assert reported is not None
    assert reported.primary.state["current_period_end"] == T + 400
    assert reported.license_id is None


@pytest.mark.parametrize(
    ("status", "read_as", "rank"),
    [
        (None, "incomplete", 1),
        ("", "incomplete", 1),
        ("incomplete", "incomplete", 1),
        ("trialing", "trialing", 2),
        ("active", "active", 3),
        ("past_due", "past_due", 4),
        ("unpaid", "unpaid", 5),
        ("paused", "paused", 6),
        ("incomplete_expired", "incomplete_expired", 7),
        ("canceled", "canceled", 99),
        ("a_status_stripe_adds_later", "a_status_stripe_adds_later", 0),
    ],
)
def test_a_subscriptions_status_and_its_stage(status: str | None, read_as: str, rank: int) -> None:
    """https://docs.stripe.com/billing/subscriptions/overview#subscription-statuses: the statuses
    in the order a subscription's life goes through them, canceled final; a subscription without
    a status is read as the first (incomplete)."""
    reported = read("customer.subscription.updated", subscription(status=status))
    assert reported is not None
    assert (reported.primary.state["status"], reported.primary.rank) == (read_as, rank)


@pytest.mark.parametrize("flag", [False, None, "true", 1])
def test_only_a_true_cancel_at_period_end_schedules_the_end(flag: Any) -> None:
    """https://docs.stripe.com/api/subscriptions/object#subscription_object-cancel_at_period_end
    is a boolean: anything but `true` schedules nothing."""
    reported = read("customer.subscription.updated", subscription(cancel_at_period_end=flag))
    assert reported is not None
    assert reported.primary.state["cancel_at_period_end"] is False


@pytest.mark.parametrize("event_type", sorted(KINDS["subscription"].events))
def test_only_trial_will_end_adds_a_trial_notice(event_type: str) -> None:
    """https://docs.stripe.com/billing/subscriptions/trials: `customer.subscription.trial_will_end`
    is also a notice of its own (`<subscription>#trial_will_end`, linked to the subscription);
    every other subscription event reports the subscription alone."""
    obj = subscription(status="trialing", trial_end=T + 3 * 86400, metadata={"license_id": "lic_1"})
    own = row("subscription", "sub_1", 2, SUBSCRIPTION_STATE | {"status": "trialing", "trial_end": T + 3 * 86400})
    notice = row(
        "trial_notice", "sub_1#trial_will_end", 0, {"subscription": "sub_1", "trial_end": T + 3 * 86400}, "sub_1"
    )
    expected = (own, notice) if event_type == "customer.subscription.trial_will_end" else (own,)
    assert read(event_type, obj) == Reported(expected, "lic_1")


def session(**fields: Any) -> dict[str, Any]:
    return {"id": "cs_1", "object": "checkout.session", "customer": CUS, "mode": "payment"} | fields


CHECKOUT_STATE = {"mode": "payment", "status": "paid", "subscription": None, "invoice": None, "payment_intent": None}


@pytest.mark.parametrize("mode", ["payment", "subscription"])
@pytest.mark.parametrize(
    ("event_type", "payment_status", "outcome", "rank"),
    [
        ("checkout.session.completed", "paid", "paid", 2),
        ("checkout.session.completed", "no_payment_required", "paid", 2),
        ("checkout.session.completed", "unpaid", "unpaid", 0),
        ("checkout.session.completed", None, "unpaid", 0),
        ("checkout.session.async_payment_succeeded", "unpaid", "paid", 2),
        ("checkout.session.async_payment_failed", "unpaid", "failed", 1),
        ("checkout.session.expired", "paid", "expired", 1),
    ],
)
def test_a_checkout_session_is_what_its_event_says(
    mode: str, event_type: str, payment_status: str | None, outcome: str, rank: int
) -> None:
    """https://docs.stripe.com/payments/checkout/fulfill-orders: `completed` is paid when its
    `payment_status` is `paid` or `no_payment_required`, else unpaid until an async payment
    settles; the async events and `expired` say their outcome whatever the snapshot holds. A paid
    session outranks a failed or expired one of the same second, which outrank an unpaid one. Its
    subscription, invoice and payment intent (ids, or the objects expanded) are kept and linked
    (https://docs.stripe.com/api/checkout/sessions/object)."""
    obj = session(
        mode=mode,
        payment_status=payment_status,
        subscription={"id": "sub_1", "object": "subscription"},
        invoice="in_1",
        payment_intent="pi_1",
        metadata={"license_id": "lic_1", "max_machines": "4"},
        amount_total=2000,
        url="https://checkout.stripe.com/ignored",
    )
    state = {"mode": mode, "status": outcome, "subscription": "sub_1", "invoice": "in_1", "payment_intent": "pi_1"}
    expected = row("checkout", "cs_1", rank, state | {"max_machines": 4}, "sub_1", "in_1", "pi_1")
    assert read(event_type, obj) == Reported((expected,), "lic_1")


@pytest.mark.parametrize("mode", ["setup", None, "PAYMENT"])
def test_a_checkout_session_that_buys_nothing_reports_nothing(mode: str | None) -> None:
    """https://docs.stripe.com/api/checkout/sessions/object#checkout_session_object-mode: a
    `setup` session only saves a payment method; only `payment` and `subscription` buy."""
    assert read("checkout.session.completed", session(mode=mode, payment_status="paid")) is None


def test_a_sessions_line_items_are_a_part_of_their_own_only_when_expanded() -> None:
    """https://docs.stripe.com/api/checkout/sessions/line_items: a webhook never carries them; a
    session read with `expand[]=line_items` does, and they are kept as `<session>#line_items`
    (prices and products, each once, sorted; `max_machines` of the prices), linked to the session."""
    items = {
        "object": "list",
        "data": [{"price": price("price_b", "prod_a", "2")}, {"price": price("price_a", "prod_a", "7")}],
    }
    reported = read("checkout.session.completed", session(payment_status="paid", line_items=items))
    own = row("checkout", "cs_1", 2, CHECKOUT_STATE | {"price_max_machines": 7})
    parts = row("line_items", "cs_1#line_items", 0, {"products": ["price_a", "price_b", "prod_a"]}, "cs_1")
    assert reported == Reported((own, parts))
    unexpanded = read("checkout.session.completed", session(payment_status="paid", line_items=items["data"]))
    assert unexpanded == Reported((row("checkout", "cs_1", 2, CHECKOUT_STATE),))


def test_line_items_read_from_the_api_outrank_every_snapshot() -> None:
    """https://docs.stripe.com/api/checkout/sessions/line_items: read by the ingest from Stripe's
    API (`fetched`), they outrank any snapshot of the same second; each product once, sorted."""
    own = StripeObject("cs_1", "checkout", T, 2, {}, CUS, frozenset({"pi_1"}))
    expected = StripeObject(
        "cs_1#line_items", "line_items", T + 1, 0, {"products": ["a", "b"]}, CUS, frozenset({"cs_1"})
    )
    assert line_items(own, ["b", "a", "b"], T + 1) == expected
    assert line_items(own, ["b", "a", "b"], T + 1, fetched=True) == replace(expected, rank=FETCHED_RANK)


@pytest.mark.parametrize(
    ("metadata", "reference", "license_id", "by_reference"),
    [
        ({"license_id": "lic_meta"}, None, "lic_meta", False),
        ({"license_id": "lic_meta"}, "lic_ref", "lic_meta", False),
        ({}, "lic_ref", "lic_ref", True),
        (None, "lic_ref", "lic_ref", True),
        ({"license_id": ""}, "lic_ref", "lic_ref", True),
        ({}, "", None, False),
        ({}, None, None, False),
    ],
)
def test_a_session_names_its_license_in_metadata_or_else_by_client_reference_id(
    metadata: Any, reference: str | None, license_id: str | None, by_reference: bool
) -> None:
    """https://docs.stripe.com/api/checkout/sessions/object#checkout_session_object-client_reference_id:
    anyone can set it on a Payment Link's URL, so it names the license only when the metadata
    (set by the seller) names none, and the report says so (`by_reference`)."""
    reported = read("checkout.session.completed", session(metadata=metadata, client_reference_id=reference))
    assert reported is not None
    assert (reported.license_id, reported.by_reference) == (license_id, by_reference)


@pytest.mark.parametrize("reference", [" ", "x" * 201, "lic\n1", 42])
def test_a_client_reference_id_the_broker_cannot_hold_is_refused(reference: Any) -> None:
    """https://docs.stripe.com/api/checkout/sessions/object#checkout_session_object-client_reference_id
    (up to 200 characters): a license id must be 1 to 200 printable characters, not blank."""
    with pytest.raises(BadLicenseId):
        read("checkout.session.completed", session(client_reference_id=reference))


def invoice(**fields: Any) -> dict[str, Any]:
    return {"id": "in_1", "object": "invoice", "customer": CUS} | fields


INVOICE_STATE = {
    "status": "paid",
    "subscription": None,
    "created": None,
    "billing_reason": None,
    "charge": None,
    "payment_intent": None,
    "payments": [],
    "hosted_invoice_url": None,
    "collection_method": None,
    "products": [],
    "period_line": False,
}
PERIOD_LINE = {"price": price("price_a", "prod_a"), "type": "subscription", "proration": False}


@pytest.mark.parametrize(
    ("event_type", "outcome", "rank"),
    [
        ("invoice.paid", "paid", 4),
        ("invoice.payment_succeeded", "paid", 4),
        ("invoice.payment_failed", "failed", 3),
        ("invoice.voided", "void", 5),
        ("invoice.marked_uncollectible", "uncollectible", 5),
    ],
)
def test_an_invoice_is_what_its_event_says_in_the_shape_before_2025_03_31(
    event_type: str, outcome: str, rank: int
) -> None:
    """https://docs.stripe.com/api/invoices/object (before 2025-03-31): the invoice names its
    subscription in `subscription`, the license in `subscription_details.metadata`, its payment in
    `charge` and `payment_intent`; each is kept and linked. The event says the outcome, whatever
    `status` holds; its stage (https://docs.stripe.com/invoicing/overview#invoice-statuses): a
    failed attempt before the payment, paid, void and uncollectible final."""
    obj = invoice(
        status="open",
        subscription="sub_1",
        subscription_details={"metadata": {"license_id": "lic_1"}},
        charge={"id": "ch_1", "object": "charge"},
        payment_intent="pi_1",
        created=T - 60,
        billing_reason="subscription_cycle",
        hosted_invoice_url="https://invoice.stripe.com/i/1",
        collection_method="charge_automatically",
        lines={"object": "list", "data": [PERIOD_LINE]},
        amount_due=2000,
    )
    state = INVOICE_STATE | {
        "status": outcome,
        "subscription": "sub_1",
        "created": T - 60,
        "billing_reason": "subscription_cycle",
        "charge": "ch_1",
        "payment_intent": "pi_1",
        "hosted_invoice_url": "https://invoice.stripe.com/i/1",
        "collection_method": "charge_automatically",
        "products": ["price_a", "prod_a"],
        "period_line": True,
    }
    expected = row("invoice", "in_1", rank, state, "sub_1", "ch_1", "pi_1")
    assert read(event_type, obj) == Reported((expected,), "lic_1")


def test_since_2025_03_31_an_invoice_names_its_subscription_under_parent_and_its_payments_in_payments() -> None:
    """https://docs.stripe.com/changelog/basil/2025-03-31/add-support-for-multiple-partial-payments-on-invoices:
    the subscription and its metadata are under `parent.subscription_details`, the payments (when
    expanded) in `payments.data[].payment`, each charge and payment intent kept once, sorted, and
    linked; the line is a period when its `parent.subscription_item_details.proration` is false."""
    line = {
        "price": None,
        "pricing": {"price_details": {"price": "price_a", "product": "prod_a"}},
        "parent": {"type": "subscription_item_details", "subscription_item_details": {"proration": False}},
    }
    payments = [
        {"payment": {"type": "payment_intent", "payment_intent": "pi_2"}},
        {"payment": {"type": "charge", "charge": {"id": "ch_1"}, "payment_intent": "pi_1"}},
        {"payment": {"type": "payment_intent", "payment_intent": None}},
    ]
    obj = invoice(
        parent={
            "type": "subscription_details",
            "subscription_details": {"subscription": "sub_1", "metadata": {"license_id": "lic_1"}},
        },
        subscription=None,
        payments={"object": "list", "data": payments},
        lines={"object": "list", "data": [line]},
    )
    state = INVOICE_STATE | {
        "subscription": "sub_1",
        "payments": ["ch_1", "pi_1", "pi_2"],
        "products": ["price_a", "prod_a"],
        "period_line": True,
    }
    expected = row("invoice", "in_1", 4, state, "sub_1", "ch_1", "pi_1", "pi_2")
    assert read("invoice.paid", obj) == Reported((expected,), "lic_1")


def test_an_invoice_without_a_subscription_under_parent_is_read_in_the_older_shape() -> None:
    """https://docs.stripe.com/api/invoices/object#invoice_object-parent: a parent of another
    type (a quote) names no subscription: the older fields are read."""
    obj = invoice(
        parent={"type": "quote_details", "quote_details": {"quote": "qt_1"}, "subscription_details": None},
        subscription="sub_1",
        subscription_details={"metadata": {"license_id": "lic_1"}},
    )
    expected = row("invoice", "in_1", 4, INVOICE_STATE | {"subscription": "sub_1"}, "sub_1")
    assert read("invoice.paid", obj) == Reported((expected,), "lic_1")


@pytest.mark.parametrize(
    ("details", "metadata", "license_id"),
    [
        ({"license_id": "lic_sub"}, {"license_id": "lic_inv"}, "lic_sub"),
        ({"license_id": "lic_sub"}, {}, "lic_sub"),
        ({}, {"license_id": "lic_inv"}, "lic_inv"),
        (None, {"license_id": "lic_inv"}, "lic_inv"),
        ({}, None, None),
    ],
)
@pytest.mark.parametrize("shape", ["current", "legacy"])
def test_an_invoice_names_the_license_of_its_subscription_else_its_own(
    shape: str, details: Any, metadata: Any, license_id: str | None
) -> None:
    """https://docs.stripe.com/api/invoices/object#invoice_object-subscription_details (before
    2025-03-31), `parent.subscription_details.metadata` since: the subscription's metadata at the
    time the invoice was made names the license; else the invoice's own `metadata`."""
    if shape == "current":
        obj = invoice(parent={"subscription_details": {"subscription": "sub_1", "metadata": details}})
    else:
        obj = invoice(subscription="sub_1", subscription_details={"metadata": details})
    reported = read("invoice.payment_failed", invoice(**obj, metadata=metadata))
    assert reported is not None
    assert (reported.license_id, reported.primary.state["subscription"]) == (license_id, "sub_1")


def test_an_invoice_that_asks_for_action_is_also_a_notice_of_its_own() -> None:
    """https://docs.stripe.com/billing/subscriptions/overview: `invoice.payment_action_required` asks
    the customer to confirm the payment on the hosted page; the notice
    (`<invoice>#payment_action_required`, linked to the invoice) is kept apart, so that a failed
    attempt of the same second (which outranks it in the invoice's own snapshot) cannot erase it."""
    obj = invoice(
        subscription="sub_1",
        subscription_details={"metadata": {"license_id": "lic_1"}},
        hosted_invoice_url="https://invoice.stripe.com/i/1",
    )
    state = INVOICE_STATE | {
        "status": "action_required",
        "subscription": "sub_1",
        "hosted_invoice_url": "https://invoice.stripe.com/i/1",
    }
    notice = {"invoice": "in_1", "subscription": "sub_1", "hosted_invoice_url": "https://invoice.stripe.com/i/1"}
    expected = (
        row("invoice", "in_1", 2, state, "sub_1"),
        row("action_notice", "in_1#payment_action_required", 0, notice, "in_1"),
    )
    assert read("invoice.payment_action_required", obj) == Reported(expected, "lic_1")


@pytest.mark.parametrize(("object_name", "read_it"), [("invoice", True), (None, True), ("invoiceitem", False)])
def test_an_invoice_event_reports_only_an_invoice(object_name: str | None, read_it: bool) -> None:
    """https://docs.stripe.com/api/invoices/object#invoice_object-object: an `invoice.*` event
    whose object is something else changes no license; an object without the field is read."""
    obj = invoice(object=object_name)
    if object_name is None:
        del obj["object"]
    assert (read("invoice.paid", obj) is not None) == read_it


@pytest.mark.parametrize(
    "payment",
    [
        {"payment": {"type": "payment_intent", "payment_intent": "pi_1", "charge": "ch_1"}},
        {"payment": {"type": "charge", "payment_intent": {"id": "pi_1"}, "charge": {"id": "ch_1"}}},
        {"payment_intent": "pi_1", "charge": "ch_1"},
    ],
)
def test_an_invoice_payment_links_its_invoice_to_the_payment_that_paid_it(payment: dict[str, Any]) -> None:
    """https://docs.stripe.com/api/invoice-payment/object: the payment is under `payment` (some newer
    versions put it at the top); `invoice_payment.paid` says it is paid, whatever its `status`
    field holds (paid: after open, before canceled)."""
    obj = {"id": "inpay_1", "object": "invoice_payment", "invoice": "in_1", "status": "open"} | payment
    state = {"invoice": "in_1", "charge": "ch_1", "payment_intent": "pi_1", "status": "paid"}
    expected = row("invoice_payment", "inpay_1", 1, state, "in_1", "ch_1", "pi_1", customer=None)
    assert read("invoice_payment.paid", obj) == Reported((expected,))


def charge(**fields: Any) -> dict[str, Any]:
    return {"id": "ch_1", "object": "charge", "customer": CUS, "status": "succeeded"} | fields


@pytest.mark.parametrize(
    ("fields", "refunded", "amount_refunded"),
    [
        ({"amount_captured": 1000, "amount_refunded": 0, "refunded": False}, False, 0),
        ({"amount_captured": 1000, "amount_refunded": 999, "refunded": False}, False, 999),
        ({"amount_captured": 1000, "amount_refunded": 1000, "refunded": False}, True, 1000),
        ({"amount_captured": 1000, "amount_refunded": 1001, "refunded": None}, True, 1001),
        ({"amount_captured": 1, "amount_refunded": 1}, True, 1),
        ({"amount_captured": 1000, "amount_refunded": 0, "refunded": True}, True, 0),
        ({"amount_captured": 1000, "amount_refunded": 500, "refunded": "true"}, False, 500),
        ({"amount_captured": 0, "amount_refunded": 0, "refunded": False}, False, 0),
        ({"amount_refunded": 5}, False, 5),
        ({"amount_captured": 1000}, False, 0),
        ({"amount_captured": 1000, "amount_refunded": True}, False, 0),
    ],
)
def test_a_charge_is_refunded_in_full_or_not_at_all(
    fields: dict[str, Any], refunded: bool, amount_refunded: int
) -> None:
    """https://docs.stripe.com/api/charges/object#charge_object-refunded is true only for a full
    refund; `amount_refunded` reaching `amount_captured` (when something was captured) is one too.
    A partial refund leaves the payment standing; what the charge does not say counts as 0."""
    reported = read("charge.refunded", charge(**fields))
    assert reported is not None
    assert reported.primary.state["refunded"] is refunded
    assert reported.primary.state["amount_refunded"] == amount_refunded


def test_a_charge_keeps_its_payment_intent_invoice_and_license() -> None:
    """https://docs.stripe.com/api/charges/object: its payment intent and (before 2025-03-31) its
    invoice are kept and linked; its metadata may name the license (a one-time purchase by API)."""
    obj = charge(
        payment_intent={"id": "pi_1", "object": "payment_intent"},
        invoice="in_1",
        amount=2000,
        amount_captured=2000,
        amount_refunded=500,
        refunded=False,
        metadata={"license_id": "lic_1"},
        receipt_url="https://pay.stripe.com/ignored",
    )
    state = {
        "payment_intent": "pi_1",
        "invoice": "in_1",
        "refunded": False,
        "amount_refunded": 500,
        "status": "succeeded",
    }
    expected = row("charge", "ch_1", 500 * 4 + 1, state, "pi_1", "in_1")
    assert read("charge.updated", obj) == Reported((expected,), "lic_1")


@pytest.mark.parametrize(
    ("amount_refunded", "status", "rank"),
    [
        (0, "pending", 0),
        (0, "succeeded", 1),
        (0, "failed", 1),
        (0, None, 0),
        (1, "pending", 4),
        (1, "succeeded", 5),
        (500, "succeeded", 2001),
        (MAX_AMOUNT, "succeeded", MAX_AMOUNT * 4 + 1),
        (MAX_AMOUNT + 1, "succeeded", MAX_AMOUNT * 4 + 1),
    ],
)
def test_a_charges_snapshots_are_ordered_by_amount_refunded_then_by_status(
    amount_refunded: int, status: str | None, rank: int
) -> None:
    """https://docs.stripe.com/api/charges/object#charge_object-amount_refunded only grows (refunds
    add to it): any snapshot that refunded more outranks one that refunded less, whatever their
    statuses (a pending charge settles as succeeded or failed); capped at MAX_AMOUNT so that no
    rank reaches FETCHED_RANK."""
    assert charge_rank(KINDS["charge"], amount_refunded, status) == rank
    assert rank < FETCHED_RANK
    if amount_refunded < MAX_AMOUNT:
        assert read("charge.updated", charge(amount_refunded=amount_refunded, status=status)).primary.rank == rank  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("status", "rank"),
    [("pending", 0), ("requires_action", 1), ("succeeded", 2), ("failed", 3), ("canceled", 3), (None, 0)],
)
@pytest.mark.parametrize("event_type", sorted(KINDS["refund"].events))
def test_a_refund_keeps_its_charge_and_payment_intent_and_a_failure_comes_after_success(
    event_type: str, status: str | None, rank: int
) -> None:
    """https://docs.stripe.com/api/refunds/object: a refund names its charge and payment intent
    (kept and linked) and may name the license in its metadata; a refund that did not go through
    comes after its success (https://docs.stripe.com/refunds#failed-refunds)."""
    obj = {
        "id": "re_1",
        "object": "refund",
        "charge": "ch_1",
        "payment_intent": {"id": "pi_1"},
        "status": status,
        "amount": 500,
        "metadata": {"license_id": "lic_1"},
    }
    state = {"status": status, "charge": "ch_1", "payment_intent": "pi_1"}
    expected = row("refund", "re_1", rank, state, "ch_1", "pi_1", customer=None)
    assert read(event_type, obj) == Reported((expected,), "lic_1")


@pytest.mark.parametrize(
    ("status", "rank"),
    [
        ("warning_needs_response", 0),
        ("warning_under_review", 1),
        ("warning_closed", 2),
        ("needs_response", 3),
        ("under_review", 4),
        ("won", 5),
        ("lost", 5),
        ("prevented", 5),
    ],
)
@pytest.mark.parametrize("event_type", sorted(KINDS["dispute"].events))
def test_a_dispute_keeps_its_charge_reason_and_case_type_inquiries_before_chargebacks(
    event_type: str, status: str, rank: int
) -> None:
    """https://docs.stripe.com/api/disputes/object: a dispute names its charge and payment intent
    (kept and linked), its `reason` and `payment_method_details.card.case_type` (chargeback,
    inquiry, ...); inquiries (`warning_*`) come before chargebacks, each closed last
    (https://docs.stripe.com/disputes/how-disputes-work)."""
    obj = {
        "id": "dp_1",
        "object": "dispute",
        "charge": {"id": "ch_1"},
        "payment_intent": "pi_1",
        "status": status,
        "reason": "fraudulent",
        "payment_method_details": {"type": "card", "card": {"brand": "visa", "case_type": "chargeback"}},
        "metadata": {"license_id": "lic_1"},
        "amount": 2000,
    }
    state = {
        "status": status,
        "charge": "ch_1",
        "payment_intent": "pi_1",
        "reason": "fraudulent",
        "case_type": "chargeback",
    }
    expected = row("dispute", "dp_1", rank, state, "ch_1", "pi_1", customer=None)
    assert read(event_type, obj) == Reported((expected,), "lic_1")


def test_a_dispute_without_card_details_has_no_case_type() -> None:
    """https://docs.stripe.com/api/disputes/object#dispute_object-payment_method_details: null for
    payment methods other than cards."""
    reported = read("charge.dispute.created", {"id": "dp_1", "charge": "ch_1", "payment_method_details": None})
    assert reported == Reported(
        (
            row(
                "dispute",
                "dp_1",
                0,
                {"status": None, "charge": "ch_1", "payment_intent": None, "reason": None, "case_type": None},
                "ch_1",
                customer=None,
            ),
        )
    )


@pytest.mark.parametrize(
    ("metadata", "license_id", "products"),
    [
        ({"license_id": "lic_1", "license_product": "prod_life"}, "lic_1", ["prod_life"]),
        ({"license_id": "lic_1"}, "lic_1", []),
        ({"license_id": "lic_1", "license_product": ""}, "lic_1", []),
        ({"license_id": "lic_1", "license_product": 7}, "lic_1", []),
        ({"license_product": "prod_life"}, None, ["prod_life"]),
        (None, None, []),
    ],
)
def test_a_payment_intent_is_a_purchase_of_its_own_when_its_metadata_names_the_license(
    metadata: Any, license_id: str | None, products: list[str]
) -> None:
    """https://docs.stripe.com/api/payment_intents/object: an intent whose metadata names the
    license is a one-time purchase (the Payment Element or the API, no Checkout), of the product
    its `license_product` names (an intent sells no Stripe product); else only the link to its
    charges and (before 2025-03-31) its invoice."""
    obj = {"id": "pi_1", "object": "payment_intent", "customer": CUS, "status": "succeeded", "invoice": "in_1"}
    state = {"status": "succeeded", "invoice": "in_1", "purchase": license_id is not None, "products": products}
    expected = row("payment_intent", "pi_1", 5, state, "in_1")
    assert read("payment_intent.succeeded", obj | {"metadata": metadata, "amount": 2000}) == Reported(
        (expected,), license_id
    )


@pytest.mark.parametrize(
    ("status", "rank"),
    [
        ("requires_payment_method", 0),
        ("requires_confirmation", 1),
        ("requires_action", 2),
        ("processing", 3),
        ("requires_capture", 4),
        ("succeeded", 5),
        ("canceled", 5),
        (None, 0),
    ],
)
def test_a_payment_intents_stages_follow_its_lifecycle(status: str | None, rank: int) -> None:
    """https://docs.stripe.com/payments/paymentintents/lifecycle"""
    reported = read("payment_intent.succeeded", {"id": "pi_1", "status": status})
    assert reported is not None
    assert (reported.primary.state["status"], reported.primary.rank) == (status, rank)


def test_an_entitlement_summary_is_the_customers_features_and_says_when_it_is_partial() -> None:
    """https://docs.stripe.com/api/entitlements/active-entitlement-summary/object: the summary has
    no id of its own (it is kept as `entitlements:<customer>`) and applies to every license of its
    customer; its features are the `lookup_key`s of `entitlements.data`, each once, sorted; it lists
    the first entitlements only, and `has_more` says there are others."""
    listed = [{"lookup_key": "pro"}, {"lookup_key": "export"}, {"lookup_key": "pro"}, {"lookup_key": None}, {}, "x"]
    obj = {
        "object": "entitlements.active_entitlement_summary",
        "customer": {"id": CUS, "object": "customer"},
        "entitlements": {"object": "list", "data": listed, "has_more": True},
        "livemode": False,
    }
    expected = row("entitlements", f"entitlements:{CUS}", 0, {"features": ["export", "pro"], "partial": True})
    assert read("entitlements.active_entitlement_summary.updated", obj) == Reported((expected,), customer_level=True)


@pytest.mark.parametrize("listed", [{"data": [], "has_more": False}, {"data": None, "has_more": "true"}, None])
def test_an_entitlement_summary_without_more_is_complete(listed: Any) -> None:
    """https://docs.stripe.com/api/entitlements/active-entitlement-summary/object: only
    `has_more: true` says the list is cut."""
    obj = {"customer": CUS, "entitlements": listed}
    expected = row("entitlements", f"entitlements:{CUS}", 0, {"features": [], "partial": False})
    assert read("entitlements.active_entitlement_summary.updated", obj) == Reported((expected,), customer_level=True)


def test_a_partial_summary_is_completed_from_the_api_and_outranks_it() -> None:
    """https://docs.stripe.com/api/entitlements/active-entitlement/list: every active entitlement,
    read from Stripe's API, completes the summary (each feature once, sorted; not partial)."""
    summary = StripeObject(f"entitlements:{CUS}", "entitlements", T, 3, {"features": ["pro"], "partial": True}, CUS)
    completed = complete_entitlements(summary, ["pro", "export", "pro"])
    assert completed == replace(summary, rank=3 + FETCHED_RANK, state={"features": ["export", "pro"], "partial": False})


SUMMARY = "entitlements.active_entitlement_summary.updated"
NO_CUSTOMER = "entitlement summary without a customer"


@pytest.mark.parametrize(
    ("event_type", "obj", "reason"),
    [
        (SUMMARY, {"customer": None, "entitlements": {"data": []}}, NO_CUSTOMER),
        (SUMMARY, {"entitlements": {"data": []}}, NO_CUSTOMER),
        ("customer.deleted", {"object": "customer", "deleted": True}, "customer.deleted without an id"),
        ("customer.deleted", {"id": "", "object": "customer"}, "customer.deleted without an id"),
        ("charge.succeeded", charge(id=None), "object without an id"),
        ("customer.subscription.updated", subscription(id=""), "object without an id"),
    ],
)
def test_an_object_without_the_id_it_is_kept_under_is_refused(
    event_type: str, obj: dict[str, Any], reason: str
) -> None:
    """Every ledger row has an id: the object's own (https://docs.stripe.com/api, `id`), or for an
    entitlement summary its customer's. The event is recorded with the reason, which says so."""
    with pytest.raises(Unprocessable) as refused:
        read(event_type, obj)
    assert str(refused.value) == reason


def test_a_deleted_customer_is_a_customer_level_row_of_its_own() -> None:
    """https://docs.stripe.com/api/customers/delete: deleting a customer cancels its subscriptions;
    `customer.deleted` applies to every license that holds an object of the customer."""
    obj = {"id": "cus_gone", "object": "customer", "deleted": True, "email": "ignored@example.com"}
    expected = StripeObject("cus_gone", "customer", T, 0, {"deleted": True}, "cus_gone")
    assert read("customer.deleted", obj) == Reported((expected,), customer_level=True)


# -- the entries, the registry and `report` on their own ---------------------------------------------


def test_a_kind_no_event_reports_cannot_read_an_event() -> None:
    """A part (made by another kind's parser) or the broker's own kind has no parser."""
    for kind in ("line_items", "trial_notice", "action_notice", "trial"):
        with pytest.raises(UnknownKind, match=rf"^no event reports a {kind} of its own$"):
            KINDS[kind].read("charge.succeeded", charge(), T)


def test_an_entry_hands_its_parser_itself_the_event_type_the_object_and_the_time() -> None:
    calls = []

    def parse(spec: KindSpec, event_type: str, obj: dict[str, Any], created: int) -> None:
        calls.append((spec, event_type, obj, created))

    spec = KindSpec("refund", "https://docs.stripe.com/api/refunds/object", "refund", {"refund.created": None}, parse)
    obj = {"id": "re_1"}
    assert spec.read("refund.created", obj, T) is None
    assert calls == [(spec, "refund.created", obj, T)]


def _parse(spec: KindSpec, event_type: str, obj: dict[str, Any], created: int) -> None:
    return None


async def _retrieve(client: Any, object_id: str, options: Any) -> Any:
    return None


REFUND = KindSpec("refund", "https://docs.stripe.com/api/refunds/object", "refund", {"refund.created": None}, _parse)
_READ = "has no way to be read from Stripe's API, or one it cannot use"
_ORIGIN = "is not exactly one of: reported by events, part of another kind, kept by the broker"


@pytest.mark.parametrize(
    ("spec", "problems"),
    [
        (replace(REFUND, retrieve=_retrieve), []),
        (replace(REFUND, customer_level=True), []),
        (KindSpec("trial_notice", "https://docs.stripe.com/billing/subscriptions/trials", part_of="subscription"), []),
        (KindSpec("trial", "https://docs.stripe.com/billing/subscriptions/trials", broker=True), []),
        (replace(REFUND), [_READ]),
        (replace(REFUND, retrieve=_retrieve, customer_level=True), [_READ]),
        (KindSpec("trial", "https://docs.stripe.com/", broker=True, retrieve=_retrieve), [_READ]),
        (KindSpec("line_items", "https://docs.stripe.com/", part_of="checkout", retrieve=_retrieve), [_READ]),
        (KindSpec("trial", "https://docs.stripe.com/", retrieve=_retrieve), [_ORIGIN]),
        (replace(REFUND, broker=True), [_ORIGIN]),
        (replace(REFUND, part_of="charge"), [_ORIGIN]),
        (replace(REFUND, retrieve=_retrieve, parse=None), ["has events without a parser, or a parser without events"]),
        (
            KindSpec("trial", "https://docs.stripe.com/", broker=True, parse=_parse),
            ["has events without a parser, or a parser without events"],
        ),
        (
            replace(REFUND, retrieve=_retrieve, docs="https://stripe.com/docs/api/refunds"),
            ["links no Stripe docs page"],
        ),
        (replace(REFUND, retrieve=_retrieve, docs="docs.stripe.com/api"), ["links no Stripe docs page"]),
        (
            replace(REFUND, retrieve=_retrieve, stripe_object=None),
            ["is reported by events but names no Stripe object"],
        ),
        (
            KindSpec("trial", "", part_of="trial", broker=True, retrieve=_retrieve),
            [_ORIGIN, "links no Stripe docs page", _READ],
        ),
    ],
)
def test_an_entry_says_what_it_misses(spec: KindSpec, problems: list[str]) -> None:
    """A kind is exactly one of: reported by events (with a parser and its Stripe object), a part
    of another kind, or the broker's own; it links a Stripe docs page; the refresh reads it from
    Stripe's API (https://docs.stripe.com/api) unless it is customer-level, a part, or the broker's."""
    assert spec.problems() == [f"{spec.kind} {problem}" for problem in problems]


def test_a_registry_says_every_problem_and_is_read_only() -> None:
    entries = list(KINDS.values())
    with pytest.raises(UnknownKind) as refused:
        build_registry([s for s in entries if s.kind not in ("charge", "refund")])
    assert str(refused.value) == "the kind registry is incomplete: charge has no entry; refund has no entry"
    itself = replace(KINDS["trial_notice"], part_of="trial_notice")
    with pytest.raises(
        UnknownKind, match=r"trial_notice is a part of itself; trial_notice is a part of trial_notice, which"
    ):
        build_registry([itself if s.kind == "trial_notice" else s for s in entries])
    registry = build_registry(entries)
    assert dict(registry) == dict(KINDS) and list(registry) == [s.kind for s in entries]
    with pytest.raises(TypeError):
        registry["charge"] = KINDS["refund"]  # type: ignore[index]


@pytest.mark.parametrize(
    ("kind", "path"),
    [
        ("subscription", "subscriptions"),
        ("checkout", "checkout.sessions"),
        ("invoice", "invoices"),
        ("invoice_payment", "invoice_payments"),
        ("charge", "charges"),
        ("refund", "refunds"),
        ("dispute", "disputes"),
        ("payment_intent", "payment_intents"),
    ],
)
async def test_retrieve_reads_one_object_of_its_kind_with_the_requests_options(kind: Kind, path: str) -> None:
    """https://docs.stripe.com/api: each object the refresh reads is one `retrieve` of its resource
    (stripe-python's StripeClient, `client.v1.<resource>.retrieve_async(id, options=...)`)."""
    calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    class Resource:
        def __init__(self, name: str) -> None:
            self.name = name

        def __getattr__(self, attr: str) -> Any:
            if attr == "retrieve_async":

                async def retrieve_async(*args: Any, **kwargs: Any) -> str:
                    calls.append((self.name, args, kwargs))
                    return "the object"

                return retrieve_async
            return Resource(f"{self.name}.{attr}".lstrip("."))

    options = {"stripe_account": "acct_1"}
    client = Resource("")
    assert await RETRIEVE[kind](client, "obj_1", options) == "the object"  # type: ignore[arg-type]
    assert calls == [(f"v1.{path}", ("obj_1",), {"options": options})]


@pytest.mark.parametrize("created", [None, "1800000000", True, -1, 2**53, 1.5])
def test_an_event_whose_created_is_not_a_timestamp_is_refused(created: Any) -> None:
    """https://docs.stripe.com/api/events/object#event_object-created: seconds since the epoch;
    it versions every row the event writes, so an event without one is refused."""
    with pytest.raises(Unprocessable, match=r"^created is not a timestamp$"):
        read("charge.succeeded", charge(), created)


@pytest.mark.parametrize("event_type", ["customer.created", "invoice.created", "invoice.updated", "charge.expired", ""])
@pytest.mark.parametrize("fetched", [False, True])
def test_an_event_type_no_kind_claims_reports_nothing(event_type: str, fetched: bool) -> None:
    """https://docs.stripe.com/api/events/types: only the types docs/stripe.md lists change a
    license; any other (an `invoice.updated` of an open invoice among them) is read as nothing."""
    assert read(event_type, invoice(status="open"), fetched=fetched) is None


def test_an_event_read_from_the_api_outranks_its_snapshots_but_its_parts_do_not() -> None:
    """A `data.object` read from Stripe's API just now (`fetched`,
    https://docs.stripe.com/api/events/retrieve) is the truth at that time: its own row outranks
    every webhook snapshot of the same second; the parts it makes keep their rank. Each row is
    versioned by the event's `created`."""
    obj = subscription(status="trialing", trial_end=T + 86400)
    webhook = read("customer.subscription.trial_will_end", obj, T + 7)
    fetched = read("customer.subscription.trial_will_end", obj, T + 7, fetched=True)
    assert webhook is not None and fetched is not None
    assert [(o.kind, o.version, o.rank) for o in webhook.objects] == [
        ("subscription", T + 7, 2),
        ("trial_notice", T + 7, 0),
    ]
    assert fetched == replace(webhook, objects=(replace(webhook.primary, rank=2 + FETCHED_RANK), webhook.objects[1]))
    # `report` reads a webhook's event unless told otherwise.
    assert (
        report({"type": "customer.subscription.trial_will_end", "created": T + 7, "data": {"object": obj}}) == webhook
    )
    assert report({"type": "customer.subscription.updated", "created": 0, "data": {"object": obj}}).primary.version == 0  # type: ignore[union-attr]


# -- the field readers every parser uses (broker.stripe_ledger.fields) -------------------------------


@pytest.mark.parametrize(
    ("value", "read_as"),
    [
        ("ch_1", "ch_1"),
        ({"id": "ch_1", "object": "charge"}, "ch_1"),
        (None, None),
        ("", None),
        ({"id": None}, None),
        ({}, None),
        ("x" * 255, "x" * 255),
    ],
)
def test_a_stripe_id_field_holds_an_id_the_expanded_object_or_null(value: Any, read_as: str | None) -> None:
    """https://docs.stripe.com/api/expanding_objects: a field that names an object holds its id, or
    the object itself when expanded."""
    assert fields.stripe_id(value) == read_as


@pytest.mark.parametrize("value", ["x" * 256, "ch_1\n", 42, ["ch_1"], {"id": 7}])
def test_a_malformed_stripe_id_is_refused(value: Any) -> None:
    """Stripe ids are printable strings (https://docs.stripe.com/api); the broker's columns hold
    255 characters."""
    with pytest.raises(Unprocessable, match=r"^malformed Stripe id"):
        fields.stripe_id(value)


@pytest.mark.parametrize(
    ("value", "read_as"),
    [(0, 0), (T, T), (2**53 - 1, 2**53 - 1), (2**53, None), (-1, None), (True, None), (1.0, None), ("1", None)],
)
def test_a_timestamp_or_amount_is_a_whole_number_the_columns_hold(value: Any, read_as: int | None) -> None:
    """https://docs.stripe.com/api: timestamps are seconds since the epoch and amounts are
    integers in the smallest currency unit; anything else is read as absent."""
    assert fields.int_field(value) == read_as
    assert fields.int_field(value) is None or type(fields.int_field(value)) is int


@pytest.mark.parametrize(
    ("value", "valid"),
    [("l", True), ("x" * 200, True), ("x" * 201, False), (" ", False), ("lic\t1", False), (None, False), (7, False)],
)
def test_a_license_id_is_1_to_200_printable_characters(value: Any, valid: bool) -> None:
    """https://docs.stripe.com/api/metadata: metadata values are strings (up to 500 characters);
    the broker's license ids are 1 to 200 printable characters, not blank."""
    if valid:
        assert fields.valid_license_id(value) == value
        assert fields.license_of({"license_id": value}) == value
    else:
        with pytest.raises(BadLicenseId):
            fields.valid_license_id(value)
    assert fields.license_of({"license_id": ""}) is None and fields.license_of(None) is None


@pytest.mark.parametrize(
    ("value", "count"),
    [("3", 3), (" 12 ", 12), ("999999", 999999), ("1000000", None), ("-1", None), ("", None), ("2.5", None), (3, None)],
)
def test_a_machine_count_is_a_metadata_string_of_up_to_6_digits(value: Any, count: int | None) -> None:
    """https://docs.stripe.com/api/metadata: Stripe keeps metadata values as strings."""
    assert fields.machine_count(value) == count


@pytest.mark.parametrize(
    ("line", "period"),
    [
        ({"parent": {"type": "subscription_item_details", "subscription_item_details": {"proration": False}}}, True),
        ({"parent": {"type": "subscription_item_details", "subscription_item_details": {"proration": True}}}, False),
        ({"parent": {"type": "invoice_item_details", "subscription_item_details": {"proration": False}}}, False),
        ({"parent": {"type": "subscription_item_details"}}, False),
        ({"type": "subscription", "proration": False}, True),
        ({"type": "subscription", "proration": True}, False),
        ({"type": "invoiceitem", "proration": False}, False),
        ({"type": "subscription"}, False),
    ],
)
def test_an_invoice_pays_a_period_when_its_subscription_line_is_no_proration(
    line: dict[str, Any], period: bool
) -> None:
    """https://docs.stripe.com/api/invoice-line-item/object: since 2025-03-31 a line's
    `parent.subscription_item_details.proration`; before, `type: subscription` and `proration`."""
    assert fields.pays_a_period({"data": [line]}) is period
    assert fields.pays_a_period({"data": [{"type": "invoiceitem"}, line]}) is period
