"""Authoritative refresh (STRIPE_API_KEY): events not newer than the ledger's object re-read it from
a local fake of Stripe's API, through the webhook app on a real socket and Postgres. Nothing
leaves the machine: STRIPE_API_BASE points the `stripe` package at the fake."""

from __future__ import annotations

import copy
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from prometheus_client import REGISTRY

from broker.settings import Settings, SettingsError
from broker.storage.db import create_engine
from broker.storage.schema import licenses
from broker.stripe_ledger.refresh import StripeRefresher, refreshed_event
from tests.support.licenses import make_settings, new_license, post_event
from tests.support.processes import serving
from tests.support.stripe_api import EXAMPLES, FakeStripeApi, envelope
from tests.support.waiting import free_port
from webhook.app import create_app

T = 1_800_000_000
KEY = "sk_test_refresh"


def subscription(sub_id: str, license_id: str, status: str, **fields: Any) -> dict[str, Any]:
    """Stripe's published subscription example, as the license's only subscription."""
    sub = copy.deepcopy(EXAMPLES["subscription"])
    sub.update(
        id=sub_id,
        customer="cus_refresh",
        status=status,
        metadata={"license_id": license_id},
        cancel_at=None,
        cancel_at_period_end=False,
        canceled_at=None,
        ended_at=None,
        trial_end=None,
        latest_invoice=None,
        livemode=False,
    )
    for item in sub["items"]["data"]:
        item["current_period_end"] = T + 30 * 86400
    sub.update(fields)
    return sub


def invoice(invoice_id: str, sub_id: str, status: str) -> dict[str, Any]:
    inv = copy.deepcopy(EXAMPLES["invoice"])
    inv.update(id=invoice_id, customer="cus_refresh", status=status, livemode=False, created=T)
    inv["parent"] = {
        "type": "subscription_details",
        "quote_details": None,
        "subscription_details": {"subscription": sub_id, "metadata": {}},
    }
    return inv


async def state_of(pg_url: str, license_id: str) -> dict[str, Any]:
    engine = create_engine(Settings(database_url=pg_url))
    try:
        async with engine.connect() as conn:
            row = (await conn.execute(sa.select(licenses.c.state).where(licenses.c.id == license_id))).one()
    finally:
        await engine.dispose()
    return dict(row.state)


def refreshes(result: str) -> float:
    return REGISTRY.get_sample_value("license_broker_stripe_refreshes_total", {"result": result}) or 0.0


async def deliver(settings: Settings, *events: dict[str, Any]) -> list[str]:
    """Post the events in this order; their outcomes."""
    async with serving(create_app(settings)) as url, httpx.AsyncClient() as client:
        outcomes = []
        for event in events:
            response = await post_event(client, url, event)
            assert response.status_code == 200, response.text
            outcomes.append(response.json()["outcome"])
        return outcomes


async def test_an_older_event_applies_the_subscription_as_the_api_reads_it_now(
    pg_url: str, fake_api: tuple[FakeStripeApi, str]
) -> None:
    api, base = fake_api
    license_id, sub_id = new_license(), "sub_refresh_older"
    # The API says unpaid: neither the held snapshot (past_due) nor the stale event (active).
    api.objects[f"/v1/subscriptions/{sub_id}"] = subscription(sub_id, license_id, "unpaid")
    settings = make_settings(pg_url, stripe_api_key=KEY, stripe_api_base=base)
    ok = refreshes("ok")
    await deliver(
        settings,
        envelope("customer.subscription.created", subscription(sub_id, license_id, "active"), T),
        envelope("customer.subscription.updated", subscription(sub_id, license_id, "past_due"), T + 20),
    )
    assert api.requests == []  # newer events apply at once
    await deliver(
        settings, envelope("customer.subscription.updated", subscription(sub_id, license_id, "active"), T + 10)
    )
    assert api.requests == [f"/v1/subscriptions/{sub_id}"]
    state = await state_of(pg_url, license_id)
    assert (state["status"], state["entitled"]) == ("unpaid", False)
    assert refreshes("ok") == ok + 1


async def test_a_stale_active_after_the_cancellation_leaves_the_license_canceled(
    pg_url: str, fake_api: tuple[FakeStripeApi, str]
) -> None:
    api, base = fake_api
    license_id, sub_id = new_license(), "sub_refresh_canceled"
    api.objects[f"/v1/subscriptions/{sub_id}"] = subscription(sub_id, license_id, "canceled")
    settings = make_settings(pg_url, stripe_api_key=KEY, stripe_api_base=base)
    active = subscription(sub_id, license_id, "active")
    await deliver(
        settings,
        envelope("customer.subscription.created", active, T),
        envelope("customer.subscription.deleted", subscription(sub_id, license_id, "canceled"), T + 20),
        envelope("customer.subscription.updated", active, T + 10),
    )
    assert api.requests == [f"/v1/subscriptions/{sub_id}"]
    assert api.accounts == [None]
    state = await state_of(pg_url, license_id)
    assert (state["status"], state["entitled"]) == ("canceled", False)


async def test_an_event_of_a_listed_connect_account_is_read_with_that_account(
    pg_url: str, fake_api: tuple[FakeStripeApi, str]
) -> None:
    api, base = fake_api
    license_id, sub_id, account = new_license(), "sub_refresh_connect", "acct_1RefreshConnect"
    api.objects[f"/v1/subscriptions/{sub_id}"] = subscription(sub_id, license_id, "canceled")
    settings = make_settings(pg_url, stripe_api_key=KEY, stripe_api_base=base, stripe_accounts=frozenset({account}))
    await deliver(
        settings,
        envelope("customer.subscription.updated", subscription(sub_id, license_id, "active"), T + 10, account=account),
        envelope("customer.subscription.updated", subscription(sub_id, license_id, "trialing"), T, account=account),
    )
    assert (api.requests, api.accounts) == ([f"/v1/subscriptions/{sub_id}"], [account])
    assert (await state_of(pg_url, license_id))["status"] == "canceled"


async def test_an_event_of_the_same_second_is_refreshed_and_the_api_wins_the_tie(
    pg_url: str, fake_api: tuple[FakeStripeApi, str]
) -> None:
    api, base = fake_api
    license_id, sub_id = new_license(), "sub_refresh_tie"
    api.objects[f"/v1/subscriptions/{sub_id}"] = subscription(sub_id, license_id, "active")
    settings = make_settings(pg_url, stripe_api_key=KEY, stripe_api_base=base)
    # Without the API, past_due would win the tie (the later stage of a subscription's life).
    await deliver(
        settings,
        envelope("customer.subscription.updated", subscription(sub_id, license_id, "active"), T),
        envelope("customer.subscription.updated", subscription(sub_id, license_id, "past_due"), T),
    )
    assert api.requests == [f"/v1/subscriptions/{sub_id}"]
    assert (await state_of(pg_url, license_id))["status"] == "active"


async def test_a_settled_invoice_is_read_by_its_status_not_by_the_stale_event_type(
    pg_url: str, fake_api: tuple[FakeStripeApi, str]
) -> None:
    api, base = fake_api
    license_id, sub_id, invoice_id = new_license(), "sub_refresh_invoice", "in_refresh_paid"
    api.objects[f"/v1/invoices/{invoice_id}"] = invoice(invoice_id, sub_id, "paid")
    settings = make_settings(pg_url, stripe_api_key=KEY, stripe_api_base=base)
    outcomes = await deliver(
        settings,
        envelope(
            "customer.subscription.updated", subscription(sub_id, license_id, "active", latest_invoice=invoice_id), T
        ),
        envelope("invoice.paid", invoice(invoice_id, sub_id, "paid"), T + 10),
        # A failed attempt of the same second, delivered last: the API says the invoice is paid.
        envelope("invoice.payment_failed", invoice(invoice_id, sub_id, "open"), T + 10),
    )
    assert api.requests == [f"/v1/invoices/{invoice_id}"]
    assert outcomes[-1] != "applied"
    state = await state_of(pg_url, license_id)
    assert (state["status"], state["entitled"]) == ("active", True)


async def test_an_event_that_repeats_the_held_snapshot_makes_no_request(
    pg_url: str, fake_api: tuple[FakeStripeApi, str]
) -> None:
    api, base = fake_api
    license_id, sub_id, invoice_id = new_license(), "sub_refresh_repeat", "in_refresh_repeat"
    settings = make_settings(pg_url, stripe_api_key=KEY, stripe_api_base=base)
    paid = invoice(invoice_id, sub_id, "paid")
    active = subscription(sub_id, license_id, "active", latest_invoice=invoice_id)
    outcomes = await deliver(
        settings,
        envelope("customer.subscription.updated", active, T),
        # Stripe sends both for every paid invoice, usually within one second.
        envelope("invoice.paid", paid, T + 10),
        envelope("invoice.payment_succeeded", paid, T + 10),
        envelope("customer.subscription.updated", active, T),
    )
    assert api.requests == []
    assert outcomes[2:] == ["unchanged", "unchanged"]
    assert (await state_of(pg_url, license_id))["status"] == "active"


@pytest.mark.parametrize("failure", ["http-500", "connection-refused"])
async def test_an_api_failure_falls_back_to_the_event_snapshot_and_is_counted(
    pg_url: str, fake_api: tuple[FakeStripeApi, str], failure: str
) -> None:
    api, base = fake_api
    api.failing = True
    if failure == "connection-refused":
        base = f"http://127.0.0.1:{free_port()}"
    license_id, sub_id = new_license(), f"sub_refresh_{failure.replace('-', '_')}"
    settings = make_settings(pg_url, stripe_api_key=KEY, stripe_api_base=base)
    failed, ok = refreshes("failed"), refreshes("ok")
    outcomes = await deliver(
        settings,
        envelope("customer.subscription.updated", subscription(sub_id, license_id, "active"), T),
        envelope("customer.subscription.updated", subscription(sub_id, license_id, "past_due"), T),
    )
    # The event's snapshot applies as without a key: past_due wins the tie of the same second.
    assert outcomes == ["applied", "applied"]
    assert (await state_of(pg_url, license_id))["status"] == "past_due"
    assert (refreshes("failed"), refreshes("ok")) == (failed + 1, ok)
    # One request, no retries.
    assert api.requests == ([f"/v1/subscriptions/{sub_id}"] if failure == "http-500" else [])


@pytest.mark.parametrize("case", ["no-key", "live-event-with-a-test-key"])
async def test_no_request_is_made_without_a_key_or_for_the_other_mode(
    pg_url: str, fake_api: tuple[FakeStripeApi, str], case: str
) -> None:
    api, base = fake_api
    license_id, sub_id = new_license(), f"sub_refresh_{case.replace('-', '_')}"
    api.objects[f"/v1/subscriptions/{sub_id}"] = subscription(sub_id, license_id, "canceled")
    key = None if case == "no-key" else KEY
    livemode = case != "no-key"
    settings = make_settings(pg_url, stripe_api_key=key, stripe_api_base=base)
    before = (refreshes("ok"), refreshes("failed"))
    await deliver(
        settings,
        envelope("customer.subscription.updated", subscription(sub_id, license_id, "active"), T, livemode=livemode),
        envelope("customer.subscription.updated", subscription(sub_id, license_id, "past_due"), T, livemode=livemode),
        envelope(
            "customer.subscription.updated", subscription(sub_id, license_id, "trialing"), T - 5, livemode=livemode
        ),
    )
    assert api.requests == []
    assert (refreshes("ok"), refreshes("failed")) == before
    assert (await state_of(pg_url, license_id))["status"] == "past_due"


def test_the_refreshed_event_keeps_what_its_type_adds_only_to_an_open_object() -> None:
    sub_id, invoice_id = "sub_1", "in_1"
    failed = envelope("invoice.payment_failed", invoice(invoice_id, sub_id, "open"), T)
    still_open = refreshed_event(failed, invoice(invoice_id, sub_id, "open"), T + 5)
    assert (still_open["type"], still_open["created"]) == ("invoice.payment_failed", T + 5)
    assert refreshed_event(failed, invoice(invoice_id, sub_id, "void"), T - 5)["type"] == "invoice.voided"
    assert refreshed_event(failed, invoice(invoice_id, sub_id, "paid"), T - 5)["type"] == "invoice.paid"
    assert refreshed_event(failed, invoice(invoice_id, sub_id, "void"), T - 5)["created"] == T

    session = copy.deepcopy(EXAMPLES["checkout.session"])
    stale = envelope("checkout.session.async_payment_failed", session, T)
    session.update(status="complete", payment_status="paid")
    assert refreshed_event(stale, session, T)["type"] == "checkout.session.completed"
    session.update(status="complete", payment_status="unpaid")
    assert refreshed_event(stale, session, T)["type"] == "checkout.session.async_payment_failed"
    session.update(status="expired", payment_status="unpaid")
    assert refreshed_event(stale, session, T)["type"] == "checkout.session.expired"


def summary(customer: str, keys: list[str], has_more: bool) -> dict[str, Any]:
    obj = copy.deepcopy(EXAMPLES["entitlements.active_entitlement_summary"])
    template = obj["entitlements"]["data"][0]
    data = [{**copy.deepcopy(template), "id": f"ent_{key}", "lookup_key": key} for key in keys]
    obj.update(customer=customer, livemode=False)
    obj["entitlements"] = {"object": "list", "data": data, "has_more": has_more, "url": "/v1/entitlements"}
    return obj


@pytest.mark.parametrize("api", ["answers", "fails"])
async def test_a_summary_with_more_entitlements_is_completed_from_the_api_or_says_it_is_partial(
    pg_url: str, fake_api: tuple[FakeStripeApi, str], api: str
) -> None:
    fake, base = fake_api
    fake.failing = api == "fails"
    license_id, sub_id = new_license(), f"sub_refresh_entitlements_{api}"
    keys = [f"feature_{n:02}" for n in range(12)]
    listed = [{"id": f"ent_{k}", "object": "entitlements.active_entitlement", "lookup_key": k} for k in keys]
    fake.put_list("/v1/entitlements/active_entitlements", listed, customer="cus_refresh")
    settings = make_settings(pg_url, stripe_api_key=KEY, stripe_api_base=base)
    failed = refreshes("failed")
    outcomes = await deliver(
        settings,
        envelope("customer.subscription.updated", subscription(sub_id, license_id, "active"), T),
        envelope("entitlements.active_entitlement_summary.updated", summary("cus_refresh", keys[:10], True), T + 1),
    )
    assert outcomes == ["applied", "applied"]  # a failed read is no reason to have the event sent again
    state = await state_of(pg_url, license_id)
    if api == "answers":
        assert (state["features"], state["features_partial"]) == (keys, False)
    else:
        assert (state["features"], state["features_partial"]) == (keys[:10], True)
        assert refreshes("failed") == failed + 1
    assert any(r.startswith("/v1/entitlements/active_entitlements") for r in fake.requests)


@pytest.mark.parametrize("served", ["the line items list", "only the session, line items expanded"])
async def test_a_one_time_purchase_is_judged_by_the_line_items_the_api_gives(
    pg_url: str, fake_api: tuple[FakeStripeApi, str], served: str
) -> None:
    api, base = fake_api
    license_id, session_id = new_license(), f"cs_test_refresh_{served.split()[-1]}"
    session = copy.deepcopy(EXAMPLES["checkout.session"])
    session.update(
        id=session_id,
        mode="payment",
        status="complete",
        payment_status="paid",
        customer="cus_refresh",
        metadata={"license_id": license_id},
        client_reference_id=None,
        subscription=None,
        invoice=None,
        payment_intent="pi_refresh_lifetime",
        livemode=False,
    )
    items = {"object": "list", "has_more": False, "data": [{"id": "li_1", "price": {"id": "price_lifetime"}}]}
    if served == "the line items list":
        api.put_list(f"/v1/checkout/sessions/{session_id}/line_items", items["data"])
    else:
        api.objects[f"/v1/checkout/sessions/{session_id}"] = {**session, "line_items": items}
    settings = make_settings(
        pg_url, stripe_api_key=KEY, stripe_api_base=base, license_products=frozenset({"perpetual:price_lifetime"})
    )
    assert await deliver(settings, envelope("checkout.session.completed", session, T)) == ["applied"]
    state = await state_of(pg_url, license_id)
    assert (state["status"], state["kind"], state["entitled"]) == ("paid", "perpetual", True)
    assert api.requests[0] == f"/v1/checkout/sessions/{session_id}/line_items"


@pytest.mark.parametrize("served", ["the invoice payments list", "only the invoice, payments expanded"])
async def test_a_paid_invoice_of_api_2025_04_is_linked_to_its_payment_through_the_api(
    pg_url: str, fake_api: tuple[FakeStripeApi, str], served: str
) -> None:
    api, base = fake_api
    tag = served.split()[-1]
    license_id, sub_id, invoice_id = new_license(), f"sub_refresh_unlinked_{tag}", f"in_refresh_unlinked_{tag}"
    payment_intent = f"pi_refresh_unlinked_{tag}"
    payment = copy.deepcopy(EXAMPLES["invoice_payment"])
    payment.update(id=f"inpay_{tag}", invoice=invoice_id, status="paid")
    payment["payment"] = {"type": "payment_intent", "payment_intent": payment_intent}
    listed = {"object": "list", "has_more": False, "data": [payment]}
    paid = invoice(invoice_id, sub_id, "paid")
    paid["billing_reason"] = "subscription_create"
    if served == "the invoice payments list":
        api.put_list("/v1/invoice_payments", [payment], invoice=invoice_id)
    else:
        api.absent.add("/v1/invoice_payments")  # an API without the list: the invoice, expanded
        api.objects[f"/v1/invoices/{invoice_id}"] = {**paid, "payments": listed}
    charge = copy.deepcopy(EXAMPLES["charge"])
    charge.update(id=f"ch_refresh_unlinked_{tag}", payment_intent=payment_intent, customer="cus_refresh", amount=2000)
    charge.update(amount_captured=2000, amount_refunded=2000, refunded=True, status="succeeded", metadata={})
    version = {"api_version": "2025-04-30.basil"}
    settings = make_settings(pg_url, stripe_api_key=KEY, stripe_api_base=base)
    await deliver(
        settings,
        envelope(
            "customer.subscription.updated",
            subscription(sub_id, license_id, "active", latest_invoice=invoice_id),
            T,
            **version,
        ),
        envelope("invoice.paid", paid, T + 1, **version),
        envelope("charge.refunded", charge, T + 2, **version),
    )
    state = await state_of(pg_url, license_id)
    assert (state["status"], state["entitled"]) == ("revoked", False)


@pytest.mark.parametrize("base", ["http://stripe-proxy.internal", "http://192.0.2.7:8080"])
def test_the_refresher_never_sends_the_key_in_clear_text_off_this_machine(base: str) -> None:
    with pytest.raises(SettingsError, match=r"^STRIPE_API_BASE: must be https://"):
        StripeRefresher(KEY, base)
