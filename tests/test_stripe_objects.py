"""The scenario tests' event factory: valid Stripe envelopes, the two API shapes, no filler left."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import stripe

from tests import stripe_objects as objects
from tests.stripe_objects import SHAPES, Shape
from tests.stripe_scenario import Scenario

SECRET = "whsec_factory_unit_test"


def every_kind_of_event(shape: Shape) -> list[dict[str, Any]]:
    s = Scenario(shape)
    alice = s.customer()
    sub = s.subscribe(alice, "lic_factory")
    sub.renew()
    sub.latest_invoice.payment.refund(500)  # type: ignore[union-attr]
    sub.latest_invoice.payment.dispute("needs_response").close("won")  # type: ignore[union-attr]
    sub.fail_renewal()
    sub.cancel_on(sub.period_end - 86400)
    sub.end()
    s.buy(alice, "lic_factory_2", pending=True).async_failed()
    return s.take()


def by_type(events: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [e["data"]["object"] for e in events if e["type"] == kind]


def leaves(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield from leaves(item, f"{path}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from leaves(item, f"{path}[{i}]")
    else:
        yield path, value


@pytest.mark.parametrize("shape", SHAPES)
def test_every_built_event_is_a_stripe_event_the_stripe_package_accepts(shape: Shape) -> None:
    events = every_kind_of_event(shape)
    for event in events:
        payload = json.dumps(event)
        header = stripe.WebhookSignature.generate_signature_header(payload, SECRET)
        parsed = stripe.Webhook.construct_event(payload, header, SECRET, tolerance=300)
        assert parsed.id == event["id"] and event["id"].startswith("evt_")
        assert event["object"] == "event" and event["api_version"] == objects.API_VERSIONS[shape]
        assert isinstance(event["created"], int) and event["livemode"] is False
        assert event["data"]["object"]["object"] in (
            "subscription", "invoice", "invoice_payment", "charge", "refund", "dispute", "checkout.session",
        )  # fmt: skip
        assert "account" not in event
    assert len({e["id"] for e in events}) == len(events)


@pytest.mark.parametrize("shape", SHAPES)
def test_the_clock_gives_each_event_a_later_created(shape: Shape) -> None:
    created = [e["created"] for e in every_kind_of_event(shape)]
    assert created == sorted(created) and len(set(created)) == len(created)


@pytest.mark.parametrize("shape", SHAPES)
def test_no_placeholder_of_stripes_examples_is_left(shape: Shape) -> None:
    # Stripe's examples hold `1234567890` for times, `obj_123` and the field's own name for ids.
    id_fields = {"id", "customer", "subscription", "invoice", "charge", "payment_intent", "subscription_item"}
    for event in every_kind_of_event(shape):
        for path, value in leaves(event):
            assert value not in (1234567890, "obj_123"), (event["type"], path)
            if path.rsplit(".", 1)[-1] in id_fields and value is not None:
                assert "_" in value and not value.startswith("obj_"), (event["type"], path, value)


def test_the_current_shape_names_the_subscription_in_the_invoice_parent_and_periods_on_items() -> None:
    events = every_kind_of_event("current")
    sub = by_type(events, "customer.subscription.created")[0]
    assert "current_period_end" not in sub
    item = sub["items"]["data"][0]
    assert item["current_period_end"] - item["current_period_start"] == 30 * 86400
    assert item["price"]["product"] == "prod_desktop_pro" and sub["billing_mode"]["type"] == "flexible"
    invoice = by_type(events, "invoice.paid")[0]
    assert invoice["parent"]["type"] == "subscription_details"
    assert invoice["parent"]["subscription_details"] == {
        "metadata": {"license_id": "lic_factory"},
        "subscription": sub["id"],
    }
    assert invoice["subscription"] is None and "charge" not in invoice and "payment_intent" not in invoice
    link = by_type(events, "invoice_payment.paid")[0]
    charge = by_type(events, "charge.succeeded")[0]
    assert (link["invoice"], link["payment"]["payment_intent"]) == (invoice["id"], charge["payment_intent"])
    assert "invoice" not in charge


def test_the_legacy_shape_names_the_subscription_and_the_charge_on_the_invoice() -> None:
    events = every_kind_of_event("legacy")
    sub = by_type(events, "customer.subscription.created")[0]
    assert sub["current_period_end"] - sub["current_period_start"] == 30 * 86400
    assert "current_period_end" not in sub["items"]["data"][0] and "billing_mode" not in sub
    invoice = by_type(events, "invoice.paid")[0]
    charge = by_type(events, "charge.succeeded")[0]
    assert "parent" not in invoice
    assert invoice["subscription"] == sub["id"]
    assert invoice["subscription_details"] == {"metadata": {"license_id": "lic_factory"}}
    assert (invoice["charge"], invoice["payment_intent"]) == (charge["id"], charge["payment_intent"])
    assert charge["invoice"] == invoice["id"]
    assert by_type(events, "invoice_payment.paid") == []


@pytest.mark.parametrize("shape", SHAPES)
def test_the_subscription_examples_cancellation_filler_is_cleared_and_set_only_on_purpose(shape: Shape) -> None:
    events = every_kind_of_event(shape)
    created, *updates = by_type(events, "customer.subscription.created") + by_type(
        events, "customer.subscription.updated"
    )
    for field in ("cancel_at", "canceled_at", "ended_at", "pause_collection", "pending_update", "trial_end"):
        assert created[field] is None, field
    assert created["cancel_at_period_end"] is False and created["status"] == "incomplete"
    flexible = updates[-1]
    assert flexible["cancel_at"] is not None and flexible["cancel_at_period_end"] is False
    assert by_type(events, "customer.subscription.deleted")[0]["status"] == "canceled"


@pytest.mark.parametrize("shape", SHAPES)
def test_payments_refunds_and_disputes_name_their_charge_and_payment_intent(shape: Shape) -> None:
    events = every_kind_of_event(shape)
    refunded = by_type(events, "charge.refunded")[0]
    assert (refunded["amount_refunded"], refunded["refunded"]) == (500, False)
    refund = by_type(events, "refund.created")[0]
    assert (refund["charge"], refund["payment_intent"]) == (refunded["id"], refunded["payment_intent"])
    disputes = by_type(events, "charge.dispute.created") + by_type(events, "charge.dispute.closed")
    assert [d["status"] for d in disputes] == ["needs_response", "won"]
    assert {d["charge"] for d in disputes} == {refunded["id"]}
    session = by_type(events, "checkout.session.async_payment_failed")[0]
    assert (session["mode"], session["payment_status"], session["metadata"]) == (
        "payment", "unpaid", {"license_id": "lic_factory_2"},
    )  # fmt: skip


def test_an_update_carries_the_previous_attributes_stripe_would_send() -> None:
    s = Scenario("current")
    sub = s.subscribe(s.customer(), "lic_factory")
    s.take()
    sub.schedule_cancel()
    (event,) = s.take()
    previous = event["data"]["previous_attributes"]
    assert previous["cancel_at_period_end"] is False and previous["cancel_at"] is None
    assert set(previous) == {"cancel_at", "cancel_at_period_end", "canceled_at"}


def test_connect_and_live_mode_events_say_so_in_the_envelope_and_the_object() -> None:
    s = Scenario("current", livemode=True, account="acct_1Connected")
    s.subscribe(s.customer(), "lic_factory")
    for event in s.take():
        assert event["account"] == "acct_1Connected" and event["livemode"] is True
        assert event["data"]["object"]["livemode"] is True or event["type"] == "refund.created"
    assert s.session_id().startswith("cs_live_")


def test_a_built_object_is_a_copy_changing_it_does_not_change_the_next_one() -> None:
    first = objects.example("subscription")
    first["items"]["data"][0]["price"]["id"] = "price_changed"
    assert objects.example("subscription")["items"]["data"][0]["price"]["id"] != "price_changed"


def test_the_examples_are_read_from_the_repository_itself() -> None:
    repo = Path(__file__).resolve().parents[1]
    assert objects.FIXTURES_DIR.is_relative_to(repo)
    assert (objects.FIXTURES_DIR / "resources.json").is_file()
