"""Every Stripe fixture (tests/fixtures/stripe, copied from Stripe's published fixtures) through POST
/api/stripe/webhooks with a real signature over its exact bytes, against Postgres and SQLite."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import sqlalchemy as sa

from broker.settings import Settings
from broker.storage.db import create_engine
from broker.storage.schema import licenses, stripe_events, subscription_event_logs
from license_broker import cli
from tests.support.licenses import WEBHOOK_SECRET, make_settings
from tests.support.processes import serving
from webhook.app import create_app
from webhook.samples import SampleEvents
from webhook.signature import sign

FIXTURES = Path(__file__).parent / "fixtures" / "stripe"
OPENAPI = Path(__file__).parent / "fixtures" / "stripe-openapi"
LICENSE_A = "lic_01JBX5Q7T9M2K4N6P8R0S2U4W6"  # a new purchase, then refunded
LICENSE_B = "lic_01JC2TRIAL7Q9M2K4N6P8R0S2"  # a trial, paused, resumed
LICENSE_C = "lic_01J5C9V2X4Z6B8D0F2H4K6M8P0"  # a renewal that fails and recovers, then disputed
LICENSE_D = "lic_01J2D7Q1W3E5R7T9Y1U3I5O7P9"  # a cancellation

STORY_A = [
    "checkout.session.completed",
    "customer.subscription.created",
    "customer.subscription.updated.incomplete_to_active",
    "invoice.paid",
    "invoice_payment.paid",
    "entitlements.active_entitlement_summary.updated",
    "charge.refunded",
]
STORY_B = ["customer.subscription.trial_will_end", "customer.subscription.paused", "customer.subscription.resumed"]
STORY_C = [
    "customer.subscription.updated.renewal",
    "invoice.payment_failed",
    "customer.subscription.updated",
    "invoice.paid.renewal_after_retry",
    "customer.subscription.updated.past_due_to_active",
    "charge.dispute.created",
]
STORY_D = ["customer.subscription.updated.cancel_at_period_end", "customer.subscription.deleted"]


def fixture(name: str) -> bytes:
    if name in EXTRA:
        return EXTRA[name]()
    return (FIXTURES / f"{name}.json").read_bytes()


def invoice_payment_of_story_a() -> bytes:
    """The `invoice_payment.paid` Stripe sends (API 2025-05-28 and later) when story A's first
    invoice is paid: it says which payment intent paid it, so that the refund of that payment
    revokes the period it paid for. Built from Stripe's published invoice_payment example."""
    example = orjson.loads((OPENAPI / "resources.json").read_bytes())["invoice_payment"]
    example.update(
        id="inpay_1SQx8nLkdIwHu7ixIp01",
        invoice="in_1SQx8nLkdIwHu7ixIn01",
        livemode=False,
        payment={"type": "payment_intent", "payment_intent": "pi_3SQx8nLkdIwHu7ix0Pi01"},
        status="paid",
        created=1793628301,
    )
    event = {
        "id": "evt_1SQx8nIpLkdIwHu7ix01",
        "object": "event",
        "api_version": "2026-10-28.endive",
        "created": 1793628301,
        "data": {"object": example},
        "livemode": False,
        "pending_webhooks": 1,
        "request": {"id": None, "idempotency_key": None},
        "type": "invoice_payment.paid",
    }
    return orjson.dumps(event)


EXTRA = {"invoice_payment.paid": invoice_payment_of_story_a}


async def post(client: httpx.AsyncClient, url: str, payload: bytes, secret: str = WEBHOOK_SECRET) -> dict[str, Any]:
    """Sign the exact bytes with a fresh timestamp, as Stripe does on each delivery."""
    headers = {"stripe-signature": sign(payload, secret), "content-type": "application/json"}
    response = await client.post(f"{url}/api/stripe/webhooks", content=payload, headers=headers)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def query(db_url: str, statement: Any) -> list[Any]:
    engine = create_engine(Settings(database_url=db_url))
    try:
        async with engine.connect() as conn:
            return list(await conn.execute(statement))
    finally:
        await engine.dispose()


async def state_of(db_url: str, license_id: str) -> dict[str, Any]:
    rows = await query(db_url, sa.select(licenses.c.state).where(licenses.c.id == license_id))
    assert rows, f"no license {license_id}"
    state: dict[str, Any] = dict(rows[0].state)
    return state


async def log_of(db_url: str, license_id: str) -> list[tuple[int, str, str]]:
    t = subscription_event_logs
    statement = sa.select(t.c.seq, t.c.stripe_event_type, t.c.status).where(t.c.license_id == license_id)
    return [(r.seq, r.stripe_event_type, r.status) for r in await query(db_url, statement.order_by(t.c.seq))]


def invoice_payment_for_the_disputed_charge() -> bytes:
    """The `invoice_payment.paid` Stripe sends for story C's retried renewal (not among the synthesized fixtures):
    the event that tells the broker which invoice, so which license, the disputed payment paid for."""
    event = {
        "id": "evt_3RyT4pInPaLkdIwHu7ix03",
        "object": "event",
        "api_version": "2026-10-28.endive",
        "created": 1794927724,
        "data": {
            "object": {
                "id": "inpay_1RyT4pLkdIwHu7ixIn04",
                "object": "invoice_payment",
                "amount_paid": 1200,
                "invoice": "in_1RyT4pLkdIwHu7ixIn04",
                "is_default": True,
                "livemode": False,
                "payment": {"type": "payment_intent", "payment_intent": "pi_3RyT4pLkdIwHu7ix0Pi03"},
                "status": "paid",
            }
        },
        "livemode": False,
        "pending_webhooks": 1,
        "request": {"id": None, "idempotency_key": None},
        "type": "invoice_payment.paid",
    }
    return orjson.dumps(event)


def charge_succeeded_for_the_disputed_charge() -> bytes:
    """The `charge.succeeded` Stripe sends for story C's retried renewal: it names its customer and
    payment intent, neither of which is bound to a license until the invoice payment arrives."""
    event = {
        "id": "evt_3RyT4pChSuLkdIwHu7ix03",
        "object": "event",
        "api_version": "2026-10-28.endive",
        "created": 1794927723,
        "data": {
            "object": {
                "id": "ch_3RyT4pLkdIwHu7ix0Ch03",
                "object": "charge",
                "amount": 1200,
                "amount_captured": 1200,
                "amount_refunded": 0,
                "captured": True,
                "currency": "usd",
                "customer": "cus_SyT4pVb7QeWn2M",
                "paid": True,
                "payment_intent": "pi_3RyT4pLkdIwHu7ix0Pi03",
                "refunded": False,
                "status": "succeeded",
            }
        },
        "livemode": False,
        "pending_webhooks": 1,
        "request": {"id": None, "idempotency_key": None},
        "type": "charge.succeeded",
    }
    return orjson.dumps(event)


def test_the_stories_cover_every_fixture() -> None:
    covered = set(STORY_A + STORY_B + STORY_C + STORY_D) - set(EXTRA)
    assert covered == {p.stem for p in FIXTURES.glob("*.json")}


async def test_a_purchase_unlocks_with_its_features_and_a_full_refund_revokes(db_url: str) -> None:
    expected = {
        "checkout.session.completed": ("applied", "active", True),
        "customer.subscription.created": ("applied", "active", True),  # incomplete, but the session is paid
        "customer.subscription.updated.incomplete_to_active": ("unchanged", "active", True),
        "invoice.paid": ("unchanged", "active", True),
        "invoice_payment.paid": ("unchanged", "active", True),
        "entitlements.active_entitlement_summary.updated": ("applied", "active", True),
        "charge.refunded": ("applied", "revoked", False),
    }
    async with serving(create_app(make_settings(db_url))) as url, httpx.AsyncClient() as client:
        for name in STORY_A:
            body = await post(client, url, fixture(name))
            state = await state_of(db_url, LICENSE_A)
            assert (body["outcome"], state["status"], state["entitled"]) == expected[name], name
            assert body["license_id"] == LICENSE_A
            if name == "entitlements.active_entitlement_summary.updated":
                assert state["features"] == ["desktop_pro"]
    # Features are listed only while the license is entitled.
    assert state["kind"] == "subscription" and state["features"] == []
    assert (state["customer"], state["subscription"]) == ("cus_TQx8mKp2LrVn4Z", "sub_1SQx8nLkdIwHu7ixSuB0")
    assert state["current_period_end"] == "2026-12-02T14:04:58+00:00"
    assert [seq for seq, _, _ in await log_of(db_url, LICENSE_A)] == [1, 2, 3, 4]


async def test_a_trial_reaches_the_app_as_a_notice_then_pauses_and_resumes(db_url: str) -> None:
    async with serving(create_app(make_settings(db_url))) as url, httpx.AsyncClient() as client:
        await post(client, url, fixture("customer.subscription.trial_will_end"))
        trial = await state_of(db_url, LICENSE_B)
        await post(client, url, fixture("customer.subscription.paused"))
        paused = await state_of(db_url, LICENSE_B)
        await post(client, url, fixture("customer.subscription.resumed"))
        resumed = await state_of(db_url, LICENSE_B)
    assert (trial["status"], trial["entitled"], trial["trial_end"]) == ("trialing", True, "2026-11-15T08:00:00+00:00")
    assert trial["notice"] == {
        "type": "trial_will_end",
        "subscription": trial["subscription"],
        "trial_end": "2026-11-15T08:00:00+00:00",
    }
    assert (paused["status"], paused["entitled"], paused["notice"]) == ("paused", False, None)
    assert (resumed["status"], resumed["entitled"]) == ("active", True)
    assert resumed["current_period_end"] == "2026-12-18T18:22:05+00:00"


async def test_a_failed_renewal_recovers_and_a_dispute_revokes_once_its_charge_is_known(db_url: str) -> None:
    expected = {
        "customer.subscription.updated.renewal": ("active", True),
        "invoice.payment_failed": ("past_due", True),
        "customer.subscription.updated": ("past_due", True),
        "invoice.paid.renewal_after_retry": ("active", True),
        "customer.subscription.updated.past_due_to_active": ("active", True),
    }
    async with serving(create_app(make_settings(db_url))) as url, httpx.AsyncClient() as client:
        for name, (status, entitled) in expected.items():
            body = await post(client, url, fixture(name))
            state = await state_of(db_url, LICENSE_C)
            assert body["outcome"] in ("applied", "unchanged"), name
            assert (state["status"], state["entitled"]) == (status, entitled), name
        # The dispute names only the charge and payment intent; nothing has linked them to a license
        # yet, and the charge's customer alone never picks one.
        dispute = await post(client, url, fixture("charge.dispute.created"))
        assert dispute == {"received": True, "outcome": "pending"}
        charge = await post(client, url, charge_succeeded_for_the_disputed_charge())
        assert charge == {"received": True, "outcome": "pending"}
        assert (await state_of(db_url, LICENSE_C))["status"] == "active"
        linking = await post(client, url, invoice_payment_for_the_disputed_charge())
    assert (linking["outcome"], linking["license_id"]) == ("applied", LICENSE_C)
    state = await state_of(db_url, LICENSE_C)
    assert (state["status"], state["entitled"]) == ("revoked", False)
    t = stripe_events
    outcome = await query(db_url, sa.select(t.c.outcome, t.c.license_id).where(t.c.type == "charge.dispute.created"))
    assert [tuple(r) for r in outcome] == [("linked", LICENSE_C)]
    assert (await log_of(db_url, LICENSE_C))[-1][1:] == ("invoice_payment.paid", "revoked")


async def test_a_cancellation_at_period_end_is_announced_then_locks(db_url: str) -> None:
    async with serving(create_app(make_settings(db_url))) as url, httpx.AsyncClient() as client:
        await post(client, url, fixture("customer.subscription.updated.cancel_at_period_end"))
        ending = await state_of(db_url, LICENSE_D)
        await post(client, url, fixture("customer.subscription.deleted"))
        ended = await state_of(db_url, LICENSE_D)
    assert (ending["status"], ending["entitled"], ending["cancel_at_period_end"]) == ("active", True, True)
    assert ending["current_period_end"] == "2026-11-10T09:15:00+00:00"
    assert (ended["status"], ended["entitled"]) == ("canceled", False)


def legacy_shape(payload: bytes) -> bytes:
    """An invoice as an account on an API version before 2025-03-31 receives it."""
    event = orjson.loads(payload)
    invoice = event["data"]["object"]
    details = invoice.pop("parent")["subscription_details"]
    invoice.update(
        subscription=details["subscription"],
        subscription_details={"metadata": details["metadata"]},
        charge="ch_3SQx8nLkdIwHu7ix0Ch01",
        payment_intent="pi_3SQx8nLkdIwHu7ix0Pi01",
    )
    event.update(id=event["id"] + "legacy", api_version="2024-06-20")
    return orjson.dumps(event)


async def test_an_invoice_in_the_legacy_shape_applies_and_links_its_charge_for_disputes(db_url: str) -> None:
    dispute = orjson.loads(fixture("charge.dispute.created"))
    dispute["data"]["object"].update(charge="ch_3SQx8nLkdIwHu7ix0Ch01", payment_intent="pi_3SQx8nLkdIwHu7ix0Pi01")
    dispute["id"] += "A"
    async with serving(create_app(make_settings(db_url))) as url, httpx.AsyncClient() as client:
        await post(client, url, fixture("customer.subscription.created"))
        body = await post(client, url, legacy_shape(fixture("invoice.paid")))
        paid = await state_of(db_url, LICENSE_A)
        disputed = await post(client, url, orjson.dumps(dispute))
    assert (body["outcome"], body["license_id"], paid["status"]) == ("applied", LICENSE_A, "active")
    assert (disputed["outcome"], disputed["license_id"]) == ("applied", LICENSE_A)
    assert (await state_of(db_url, LICENSE_A))["status"] == "revoked"


async def test_duplicate_and_concurrent_deliveries_of_a_fixture_apply_once_and_never_5xx(db_url: str) -> None:
    payload = fixture("customer.subscription.updated.cancel_at_period_end")
    async with serving(create_app(make_settings(db_url))) as url, httpx.AsyncClient() as client:
        bodies = await asyncio.gather(*(post(client, url, payload) for _ in range(8)))
        again = await post(client, url, payload)
        # Two distinct events for one change: the same object under a new event id.
        twin = orjson.loads(payload)
        twin["id"] += "twin"
        second = await post(client, url, orjson.dumps(twin))
    assert sorted(b["outcome"] for b in bodies) == ["applied"] + ["duplicate"] * 7
    assert again["outcome"] == "duplicate" and second["outcome"] == "unchanged"
    assert len(await log_of(db_url, LICENSE_D)) == 1


def renamed(payload: bytes, tag: str) -> bytes:
    """Story A under fresh ids, so that one database can hold several deliveries of it."""
    ids = (
        "cus_TQx8mKp2LrVn4Z",
        "sub_1SQx8nLkdIwHu7ixSuB0",
        "ch_3SQx8n",
        "pi_3SQx8n",
        "in_1SQx8n",
        "inpay_1SQx8n",
        "cs_test_b1Qx8m",
    )
    for old in (LICENSE_A, *ids, "evt_"):
        payload = payload.replace(old.encode(), f"{old}{tag}".encode())
    return payload


async def final_state(db_url: str, tag: str) -> dict[str, Any]:
    state = await state_of(db_url, LICENSE_A + tag)
    return state


async def test_story_a_in_any_delivery_order_ends_as_in_stripes_order(pg_url: str) -> None:
    stripe_order = sorted(STORY_A, key=lambda name: orjson.loads(fixture(name))["created"])
    rng = random.Random(20261101)
    orders = [stripe_order, stripe_order[::-1], *(rng.sample(STORY_A, len(STORY_A)) for _ in range(4))]
    async with serving(create_app(make_settings(pg_url))) as url, httpx.AsyncClient() as client:
        for i, order in enumerate(orders):
            for name in order:
                await post(client, url, renamed(fixture(name), f"_o{i}"))
        # And all at once: pending events and the event that links them race.
        for round_ in range(3):
            tag = f"_c{round_}"
            await asyncio.gather(*(post(client, url, renamed(fixture(name), tag)) for name in STORY_A))
    expected = await final_state(pg_url, "_o0")
    assert expected["status"] == "revoked" and expected["features"] == []

    def comparable(state: dict[str, Any], tag: str) -> dict[str, Any]:
        return orjson.loads(orjson.dumps(state).replace(tag.encode(), b""))

    for tag in [f"_o{i}" for i in range(1, len(orders))] + ["_c0", "_c1", "_c2"]:
        assert comparable(await final_state(pg_url, tag), tag) == comparable(expected, "_o0"), tag
    pending = await query(pg_url, sa.select(sa.func.count()).where(stripe_events.c.outcome == "pending"))
    assert pending[0][0] == 0


def test_events_no_license_takes_are_kept_and_listed(
    db_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    anonymous = orjson.loads(fixture("checkout.session.completed"))
    session = anonymous["data"]["object"]
    session.update(metadata={}, client_reference_id=None, customer=None, subscription=None, mode="payment")
    anonymous["id"] += "anon"

    async def deliver() -> tuple[dict[str, Any], dict[str, Any]]:
        async with serving(create_app(make_settings(db_url))) as url, httpx.AsyncClient() as client:
            return await post(client, url, fixture("charge.dispute.created")), await post(
                client, url, orjson.dumps(anonymous)
            )

    # The command runs its own event loop, so this test runs outside one.
    dispute, nothing = asyncio.run(deliver())
    # Both wait in the ledger for an event that binds them (the session could be claimed by none).
    assert (dispute["outcome"], nothing["outcome"]) == ("pending", "pending")
    monkeypatch.setenv("DATABASE_URL", db_url)
    assert cli.main(["unmatched"]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0].startswith("evt_1SQx8pCsCmPlLkdIwHu7ix01anon checkout.session.completed")
    assert " pending " in lines[0]
    assert lines[1].startswith("evt_1SSm4kDuCrEaLkdIwHu7ix01 charge.dispute.created")
    assert "pending du_1SSm4kLkdIwHu7ixDiSpUtE1" in lines[1]
    assert "2 event(s)" in err
    assert cli.main(["unmatched", "--json"]) == 0
    payloads = [orjson.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert payloads[1] == orjson.loads(fixture("charge.dispute.created"))


async def test_a_fixture_signed_with_the_previous_secret_verifies_during_a_rotation(db_url: str) -> None:
    settings = make_settings(db_url, webhook_secrets=("whsec_new_secret", WEBHOOK_SECRET))
    payload = fixture("customer.subscription.deleted")
    async with serving(create_app(settings)) as url, httpx.AsyncClient() as client:
        old = await post(client, url, payload, secret=WEBHOOK_SECRET)
        retired = await client.post(
            f"{url}/api/stripe/webhooks", content=payload, headers={"stripe-signature": sign(payload, "whsec_retired")}
        )
    assert old["outcome"] == "applied" and retired.status_code == 400


async def test_every_sample_action_does_what_it_is_named_for(db_url: str) -> None:
    sample = SampleEvents("lic_samples")
    expected = {
        "pay": "active",
        "fail": "past_due",
        "recover": "active",
        "refund_old": "active",  # the first period's refund: a renewal superseded it
        "dispute": "revoked",
        "dispute_won": "active",
        "resubscribe": "active",
        "cancel": "active",  # the first subscription ends, the second keeps the license
        "refund": "revoked",
    }
    async with serving(create_app(make_settings(db_url))) as url, httpx.AsyncClient() as client:
        for i, (action, status) in enumerate(expected.items()):
            for event in sample.for_action(action, created=1_800_000_000 + 100 * i):
                await post(client, url, orjson.dumps(event))
            state = await state_of(db_url, "lic_samples")
            assert (state["status"], state["entitled"]) == (status, status in ("active", "past_due")), action
