"""A license is the sum of its Stripe objects, end to end: real Stripe account traffic (built from
Stripe's own example objects, in the current and the pre-2025-03-31 API shape) signed and posted to
a webhook process, the license read back from a separate stream process.

Written against the HTTP contract only (DESIGN.md, the ledger's observable behaviour): no imports
from the broker's packages, so these tests judge any implementation of the rules.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import stripe
from httpx_sse import connect_sse

from tests.stripe_objects import SHAPES, UNLINKED_API_VERSION, Shape
from tests.stripe_scenario import ADDON_PRICE, ADDON_PRODUCT, LIFETIME_PRICE, OTHER_PRICE, OTHER_PRODUCT, Scenario
from tests.support.licenses import TOKEN_SECRET, WEBHOOK_SECRET, new_license
from tests.support.processes import Process, process_env, run_module, serving_in_thread
from tests.support.stripe_api import FakeStripeApi
from tests.support.waiting import free_port

# Settings of the ledger's mode and account filters; cleared unless a broker sets them, so the
# environment the suite runs in cannot leak into these processes.
STRIPE_SETTINGS = (
    "STRIPE_LIVEMODE",
    "STRIPE_ACCOUNTS",
    "LICENSE_PRODUCTS",
    "STRIPE_API_KEY",
    "STRIPE_API_BASE",
    "ENTITLED_STATUSES",
    "DISPUTE_REVOKES",
)
LISTED_ACCOUNT = "acct_1ListedPlatformUser"
BASIC_PRICE = "price_desktop_basic_monthly"


class Broker:
    """A webhook process and a stream process (uvicorn each) over this run's Postgres and Redis."""

    def __init__(self, webhook: Process, stream: Process) -> None:
        self.webhook = webhook
        self.stream = stream
        self.http = httpx.Client(timeout=httpx.Timeout(10.0))

    def post(self, event: dict[str, Any]) -> dict[str, Any]:
        """Sign and post one event as Stripe does; every well-signed event is answered 2xx."""
        payload = json.dumps(event)
        headers = {
            "stripe-signature": stripe.WebhookSignature.generate_signature_header(payload, WEBHOOK_SECRET),
            "content-type": "application/json",
        }
        response = self.http.post(f"{self.webhook.url}/api/stripe/webhooks", content=payload, headers=headers)
        assert response.is_success, (
            f"{event['type']} {event['id']} answered {response.status_code}: {response.text}\n"
            f"webhook log: {self.webhook.log.read_text()[-1500:]}"
        )
        answer: dict[str, Any] = response.json()
        assert answer["received"] is True
        return answer

    def deliver(self, events: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        return [self.post(event) for event in events]

    def _auth(self, license_id: str) -> dict[str, str]:
        now = int(time.time())
        claims = {"sub": license_id, "aud": "license-broker", "typ": "stream", "iat": now, "exp": now + 600}
        token = jwt.encode(claims, TOKEN_SECRET, algorithm="HS256")
        return {"authorization": f"Bearer {token}"}

    def state(self, license_id: str) -> dict[str, Any]:
        """GET /api/licenses/{id} from the stream process."""
        response = self.http.get(f"{self.stream.url}/api/licenses/{license_id}", headers=self._auth(license_id))
        assert response.status_code == 200, response.text
        state: dict[str, Any] = response.json()
        return state

    def streamed_state(self, license_id: str) -> dict[str, Any]:
        """The stream's last event for the license: resumed just before the current seq."""
        seq = self.state(license_id)["seq"]
        params = {"lastEventId": str(seq - 1)} if seq > 0 else {}
        url = f"{self.stream.url}/api/licenses/{license_id}/events"
        with connect_sse(self.http, "GET", url, headers=self._auth(license_id), params=params) as source:
            assert source.response.status_code == 200
            for sse in source.iter_sse():
                if sse.data:
                    event: dict[str, Any] = json.loads(sse.data)
                    if event["seq"] >= seq:
                        assert sse.id == str(event["seq"])
                        return event
        raise AssertionError(f"the stream of {license_id} ended before seq {seq}")

    def close(self) -> None:
        self.http.close()


def running_broker(postgres_url: str, redis_url: str, logs: Path, **settings: str) -> Iterator[Broker]:
    env = process_env(postgres_url, REDIS_URL=redis_url, **{**dict.fromkeys(STRIPE_SETTINGS, ""), **settings})
    webhook = Process(["webhook"], env, free_port(), logs / "webhook.log")
    stream = Process(["stream"], env, free_port(), logs / "stream.log")
    broker = Broker(webhook, stream)
    try:
        webhook.wait_ready()
        stream.wait_ready()
        yield broker
    finally:
        broker.close()
        for process in (webhook, stream):  # both shut down at once, each within its own grace period
            if process.proc.poll() is None:
                process.proc.terminate()
        webhook.stop()
        stream.stop()


@pytest.fixture(scope="module")
def broker(postgres_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """Both modes accepted, no Connect account listed (the defaults)."""
    yield from running_broker(postgres_url, redis_url, tmp_path_factory.mktemp("broker"))


@pytest.fixture(scope="module")
def live_broker(postgres_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """Only live-mode events count, and of Connect accounts only the listed one's."""
    logs = tmp_path_factory.mktemp("live-broker")
    yield from running_broker(postgres_url, redis_url, logs, STRIPE_LIVEMODE="true", STRIPE_ACCOUNTS=LISTED_ACCOUNT)


@pytest.fixture(scope="module")
def period_broker(postgres_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """DISPUTE_REVOKES=period: a chargeback revokes only the period its payment paid for."""
    logs = tmp_path_factory.mktemp("period-broker")
    yield from running_broker(postgres_url, redis_url, logs, DISPUTE_REVOKES="period")


@pytest.fixture(scope="module")
def stripe_api() -> Iterator[tuple[FakeStripeApi, str]]:
    api = FakeStripeApi()
    with serving_in_thread(api.app()) as base:
        api.base_url = base
        yield api, base


@pytest.fixture(scope="module")
def keyed_broker(
    postgres_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory, stripe_api: tuple[FakeStripeApi, str]
) -> Iterator[Broker]:
    """STRIPE_API_KEY, reading from the fake Stripe API; every other setting as by default."""
    logs = tmp_path_factory.mktemp("keyed-broker")
    yield from running_broker(
        postgres_url, redis_url, logs, STRIPE_API_KEY="sk_test_scenarios", STRIPE_API_BASE=stripe_api[1]
    )


# Which purchases grant: subscriptions of the desktop product, one-time purchases of its lifetime price.
GRANTS = f"subscription:prod_desktop_pro,perpetual:{LIFETIME_PRICE}"


@pytest.fixture(scope="module")
def api_broker(
    postgres_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory, stripe_api: tuple[FakeStripeApi, str]
) -> Iterator[Broker]:
    """STRIPE_API_KEY, reading from the fake Stripe API; LICENSE_PRODUCTS per kind."""
    logs = tmp_path_factory.mktemp("api-broker")
    yield from running_broker(
        postgres_url,
        redis_url,
        logs,
        LICENSE_PRODUCTS=GRANTS,
        STRIPE_API_KEY="sk_test_scenarios",
        STRIPE_API_BASE=stripe_api[1],
    )


@pytest.fixture(params=SHAPES)
def shape(request: pytest.FixtureRequest) -> Shape:
    value: Shape = request.param
    return value


@pytest.fixture
def s(shape: Shape) -> Scenario:
    return Scenario(shape)


MISSING = "<missing>"
NONE = {"entitled": False, "status": "none"}  # a license no object is bound to


def seen(event: dict[str, Any], expected: dict[str, Any]) -> dict[str, Any]:
    """The fields of the license state that `event` (GET /api/licenses/{id}, or one SSE event)
    carries that `expected` names: subscriptions as their ids, times as unix seconds."""
    state: dict[str, Any] = event["state"]
    # The event repeats status and entitled at its top level for clients that read only those.
    assert (event["status"], event["entitled"]) == (state.get("status"), state.get("entitled"))
    out: dict[str, Any] = {}
    for key in expected:
        value = state.get(key, MISSING)
        if key == "subscriptions" and isinstance(value, list):
            value = [entry.get("id") for entry in value]
        elif key == "cancels_at" and isinstance(value, str) and value != MISSING:
            value = int(datetime.fromisoformat(value).timestamp())
        out[key] = value
    return out


def licenses_named(answers: list[dict[str, Any]]) -> set[str | None]:
    return {answer.get("license_id") for answer in answers}


# --- two subscriptions over a license's life -----------------------------------------------------


@pytest.mark.parametrize("how", ["resubscribed before the old one ended", "upgraded through a new checkout"])
def test_the_end_of_an_old_subscription_leaves_a_license_with_a_newer_one_entitled(
    broker: Broker, s: Scenario, how: str
) -> None:
    license_id, alice = new_license(), s.customer()
    if how.startswith("resubscribed"):
        old = s.subscribe(alice, license_id)
        old.schedule_cancel()
        new = s.subscribe(alice, license_id)
    else:
        old = s.subscribe(alice, license_id, price=BASIC_PRICE)
        new = s.subscribe(alice, license_id)
    broker.deliver(s.take())
    active = {"entitled": True, "status": "active"}
    assert seen(broker.state(license_id), active) == active
    old.end()
    broker.deliver(s.take())
    expected = {**active, "kind": "subscription", "subscriptions": [new.id], "cancels_at": None}
    assert seen(broker.state(license_id), expected) == expected
    assert seen(broker.streamed_state(license_id), expected) == expected


# --- one customer, several licenses or products --------------------------------------------------


@pytest.mark.parametrize("other", ["an unrelated product", "a second license"])
def test_another_subscriptions_paid_invoice_does_not_unlock_an_unpaid_license(
    broker: Broker, s: Scenario, other: str
) -> None:
    license_id, alice = new_license(), s.customer()
    second = new_license() if other == "a second license" else None
    # The session alone names the license, so its subscription is bound only through the session.
    sub = s.subscribe(alice, license_id, bind="session")
    sub.fail_renewal()
    sub.update(status="unpaid")
    broker.deliver(s.take())
    unpaid = {"entitled": False, "status": "unpaid"}
    assert seen(broker.state(license_id), unpaid) == unpaid
    if second:
        other_sub = s.subscribe(alice, second, bind="session")
    else:
        other_sub = s.subscribe(alice, None, bind="none", price=OTHER_PRICE, product=OTHER_PRODUCT)
    other_sub.renew()
    answers = broker.deliver(s.take())
    assert seen(broker.state(license_id), unpaid) == unpaid
    assert licenses_named(answers) <= {None, second}
    if second:
        active = {"entitled": True, "status": "active", "subscriptions": [other_sub.id]}
        assert seen(broker.state(second), active) == active


@pytest.mark.parametrize("other", ["an unrelated product", "a second license"])
def test_the_end_of_another_subscription_does_not_lock_a_perpetual_license(
    broker: Broker, s: Scenario, other: str
) -> None:
    license_id, alice = new_license(), s.customer()
    second = new_license() if other == "a second license" else None
    s.buy(alice, license_id)
    broker.deliver(s.take())
    perpetual = {"entitled": True, "status": "paid", "kind": "perpetual"}
    assert seen(broker.state(license_id), perpetual) == perpetual
    if second:
        other_sub = s.subscribe(alice, second, bind="session")
    else:
        other_sub = s.subscribe(alice, None, bind="none", price=OTHER_PRICE, product=OTHER_PRODUCT)
    other_sub.end()
    answers = broker.deliver(s.take())
    assert seen(broker.state(license_id), perpetual) == perpetual
    assert licenses_named(answers) <= {None, second}
    if second:
        canceled = {"entitled": False, "status": "canceled"}
        assert seen(broker.state(second), canceled) == canceled


# --- refunds and disputes ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("refunded", "expected"),
    [
        ("all of a past period's charge", {"entitled": True, "status": "active"}),
        ("all of the current period's charge", {"entitled": False, "status": "revoked"}),
        ("half of the current period's charge", {"entitled": True, "status": "active"}),
    ],
)
def test_a_refund_revokes_only_the_period_it_paid_for_and_only_when_full(
    broker: Broker, s: Scenario, refunded: str, expected: dict[str, Any]
) -> None:
    license_id, alice = new_license(), s.customer()
    sub = s.subscribe(alice, license_id)
    past = sub.latest_invoice.payment
    sub.renew()
    current = sub.latest_invoice.payment
    assert past is not None and current is not None
    if refunded.startswith("all of a past"):
        past.refund()
    elif refunded.startswith("all"):
        current.refund()
    else:
        current.refund(current.amount // 2)
    broker.deliver(s.take())
    assert seen(broker.state(license_id), expected) == expected


@pytest.mark.parametrize(
    ("refunded", "expected"),
    [
        ("the proration charge", {"entitled": True, "status": "active"}),
        ("the period's own charge", {"entitled": False, "status": "revoked"}),
    ],
)
def test_a_proration_invoice_is_not_the_period_a_refund_revokes(
    broker: Broker, s: Scenario, refunded: str, expected: dict[str, Any]
) -> None:
    license_id = new_license()
    sub = s.subscribe(s.customer(), license_id)
    period = sub.latest_invoice.payment
    proration = sub.change_quantity(2, proration_amount=1500).payment  # now the latest invoice
    assert period is not None and proration is not None
    (proration if refunded == "the proration charge" else period).refund()
    broker.deliver(s.take())
    assert seen(broker.state(license_id), expected) == expected


@pytest.mark.parametrize("order", ["as sent", "reversed"])
def test_two_partial_refunds_of_one_second_that_add_up_to_the_whole_charge_revoke(
    broker: Broker, s: Scenario, order: str
) -> None:
    license_id = new_license()
    payment = s.subscribe(s.customer(), license_id, amount=12000).latest_invoice.payment  # $120 a year
    assert payment is not None
    payment.refund(9000)
    payment.refund(3000, same_second=True)  # charge.refunded: amount_refunded 9000, then 12000
    events = s.take()
    broker.deliver(events if order == "as sent" else reversed(events))
    expected = {"entitled": False, "status": "revoked"}
    assert seen(broker.state(license_id), expected) == expected


def test_a_full_refund_of_a_one_time_purchase_revokes_it(broker: Broker, s: Scenario) -> None:
    license_id = new_license()
    purchase = s.buy(s.customer(), license_id)
    purchase.payment.refund()
    broker.deliver(s.take())
    expected = {"entitled": False, "status": "revoked"}
    assert seen(broker.state(license_id), expected) == expected


@pytest.mark.parametrize(
    ("then", "expected"),
    [
        ("nothing", {"entitled": True, "status": "paid", "kind": "perpetual"}),
        ("a full refund", {"entitled": False, "status": "revoked", "kind": "perpetual"}),
        ("a partial refund", {"entitled": True, "status": "paid", "kind": "perpetual"}),
        ("a chargeback", {"entitled": False, "status": "revoked", "kind": "perpetual"}),
        ("a chargeback that is won", {"entitled": True, "status": "paid", "kind": "perpetual"}),
    ],
)
def test_a_purchase_by_payment_intent_alone_is_a_paid_one_time_purchase(
    broker: Broker, s: Scenario, then: str, expected: dict[str, Any]
) -> None:
    license_id = new_license()
    payment = s.buy_with_payment_intent(s.customer(), license_id).payment
    if then == "a full refund":
        payment.refund()
    elif then == "a partial refund":
        payment.refund(payment.amount // 2)
    elif then == "a chargeback":
        payment.dispute("needs_response")
    elif then == "a chargeback that is won":
        payment.dispute("needs_response").close("won")
    broker.deliver(s.take())
    assert seen(broker.state(license_id), expected) == expected
    assert seen(broker.streamed_state(license_id), expected) == expected


@pytest.mark.parametrize(
    ("story", "expected"),
    [
        ("an inquiry", {"entitled": True, "status": "active"}),
        ("a chargeback", {"entitled": False, "status": "revoked"}),
        ("a chargeback that is won", {"entitled": True, "status": "active"}),
    ],
)
def test_a_dispute_revokes_only_once_funds_are_withdrawn_and_a_won_one_restores(
    broker: Broker, s: Scenario, story: str, expected: dict[str, Any]
) -> None:
    license_id = new_license()
    sub = s.subscribe(s.customer(), license_id)
    payment = sub.latest_invoice.payment
    assert payment is not None
    if story == "an inquiry":
        payment.dispute("warning_needs_response")
    elif story == "a chargeback":
        payment.dispute("needs_response")
    else:
        dispute = payment.dispute("needs_response")
        broker.deliver(s.take())
        revoked = {"entitled": False, "status": "revoked"}
        assert seen(broker.state(license_id), revoked) == revoked
        dispute.update("under_review")
        dispute.close("won")
    broker.deliver(s.take())
    assert seen(broker.state(license_id), expected) == expected
    assert seen(broker.streamed_state(license_id), expected) == expected


# --- features (Stripe Entitlements) ---------------------------------------------------------------


def test_features_are_listed_only_while_the_license_is_entitled(broker: Broker, s: Scenario) -> None:
    license_id, alice = new_license(), s.customer()
    payment = s.subscribe(alice, license_id).latest_invoice.payment
    s.entitlements(alice, ["pro", "sync"])
    broker.deliver(s.take())
    unlocked = {"entitled": True, "features": ["pro", "sync"]}
    assert seen(broker.state(license_id), unlocked) == unlocked
    assert payment is not None
    payment.refund()  # the current period: revoked, while Stripe still lists the features
    broker.deliver(s.take())
    revoked = {"entitled": False, "status": "revoked", "features": []}
    assert seen(broker.state(license_id), revoked) == revoked
    assert seen(broker.streamed_state(license_id), revoked) == revoked


def test_features_come_only_from_the_customer_whose_purchase_entitles_the_license(broker: Broker, s: Scenario) -> None:
    license_id, alice, bob = new_license(), s.customer(), s.customer()
    s.subscribe(alice, license_id).end()  # alice's subscription ended; her other products go on
    s.entitlements(alice, ["backup"])
    s.subscribe(bob, license_id)  # the license passed to bob, named by the seller's server
    s.entitlements(bob, ["pro"])
    broker.deliver(s.take())
    expected = {"entitled": True, "status": "active", "features": ["pro"]}
    assert seen(broker.state(license_id), expected) == expected


LATE_DISPUTES = {
    "a fraud chargeback": {"status": "needs_response"},
    "a fraud chargeback that is won": {"status": "needs_response", "then": "won"},
    "a fraud inquiry": {"status": "warning_needs_response"},
    "an open chargeback for another reason": {"status": "needs_response", "reason": "product_unacceptable"},
    "a lost chargeback for another reason": {
        "status": "needs_response",
        "reason": "product_unacceptable",
        "then": "lost",
    },
}


def late_dispute(s: Scenario, license_id: str, story: str) -> None:
    """Month 1 paid, month 2 paid, then a dispute of month 1's payment (disputes usually come weeks later)."""
    sub = s.subscribe(s.customer(), license_id)
    first = sub.latest_invoice.payment
    sub.renew()
    assert first is not None
    how = LATE_DISPUTES[story]
    dispute = first.dispute(how["status"], reason=how.get("reason", "fraudulent"))
    if "then" in how:
        dispute.update("under_review")
        dispute.close(how["then"])


@pytest.mark.parametrize(
    ("story", "expected"),
    [
        ("a fraud chargeback", {"entitled": False, "status": "revoked"}),
        ("a fraud chargeback that is won", {"entitled": True, "status": "active"}),
        ("a fraud inquiry", {"entitled": True, "status": "active"}),
        ("an open chargeback for another reason", {"entitled": True, "status": "active"}),
        ("a lost chargeback for another reason", {"entitled": False, "status": "revoked"}),
    ],
)
def test_a_late_dispute_of_a_past_month_revokes_the_license_when_it_is_lost_or_a_fraud_claim(
    broker: Broker, s: Scenario, story: str, expected: dict[str, Any]
) -> None:
    license_id = new_license()
    late_dispute(s, license_id, story)
    broker.deliver(s.take())
    assert seen(broker.state(license_id), expected) == expected


@pytest.mark.parametrize("story", ["a fraud chargeback", "a lost chargeback for another reason"])
def test_with_dispute_revokes_period_a_late_dispute_of_a_past_month_changes_nothing(
    period_broker: Broker, s: Scenario, story: str
) -> None:
    license_id = new_license()
    late_dispute(s, license_id, story)
    period_broker.deliver(s.take())
    expected = {"entitled": True, "status": "active"}
    assert seen(period_broker.state(license_id), expected) == expected


@pytest.mark.parametrize(
    ("case_type", "expected"),
    [
        ("block", {"entitled": True, "status": "active"}),  # stopped with Compelling Evidence: no money moves
        ("resolution", {"entitled": False, "status": "revoked"}),  # resolved by refunding the cardholder
    ],
)
def test_a_prevented_dispute_revokes_only_when_the_cardholder_was_refunded(
    broker: Broker, s: Scenario, case_type: str, expected: dict[str, Any]
) -> None:
    license_id = new_license()
    payment = s.subscribe(s.customer(), license_id).latest_invoice.payment
    assert payment is not None
    payment.dispute("prevented", case_type=case_type)
    broker.deliver(s.take())
    assert seen(broker.state(license_id), expected) == expected


# --- which purchases grant (LICENSE_PRODUCTS) -------------------------------------------------------


@pytest.mark.parametrize(
    ("bought", "expected"),
    [
        ("the lifetime license", {"entitled": True, "status": "paid", "kind": "perpetual"}),
        ("a $5 add-on", NONE),
    ],
)
def test_with_license_products_a_one_time_purchase_grants_by_its_line_items_read_from_stripe(
    api_broker: Broker, stripe_api: tuple[FakeStripeApi, str], shape: Shape, bought: str, expected: dict[str, Any]
) -> None:
    api, _ = stripe_api
    s = Scenario(shape, api=api)
    license_id = new_license()
    if bought == "a $5 add-on":
        purchase = s.buy(s.customer(), license_id, price=ADDON_PRICE, product=ADDON_PRODUCT, amount=500)
    else:
        purchase = s.buy(s.customer(), license_id)
    line_items = f"/v1/checkout/sessions/{purchase.id}/line_items"
    api_broker.deliver(s.take())
    assert seen(api_broker.state(license_id), expected) == expected
    purchase.payment.refund(100)  # a later event of the purchase: its line items are not read again
    api_broker.deliver(s.take())
    assert api.requested(line_items) == 1


def test_with_license_products_subscriptions_grant_by_their_items(api_broker: Broker, shape: Shape) -> None:
    s = Scenario(shape)
    listed, other, alice = new_license(), new_license(), s.customer()
    s.subscribe(alice, listed)
    s.subscribe(alice, other, price=OTHER_PRICE, product=OTHER_PRODUCT)
    api_broker.deliver(s.take())
    active = {"entitled": True, "status": "active"}
    assert seen(api_broker.state(listed), active) == active
    assert seen(api_broker.state(other), NONE) == NONE


def test_a_failed_line_items_read_is_answered_503_and_the_redelivery_grants(
    api_broker: Broker, stripe_api: tuple[FakeStripeApi, str], shape: Shape
) -> None:
    api, _ = stripe_api
    s = Scenario(shape, api=api)
    license_id = new_license()
    s.buy(s.customer(), license_id)
    events = s.take()
    completed = events[-1]
    assert completed["type"] == "checkout.session.completed"
    api_broker.deliver(events[:-1])
    api.failing = True
    try:
        payload = json.dumps(completed)
        signature = stripe.WebhookSignature.generate_signature_header(payload, WEBHOOK_SECRET)
        response = api_broker.http.post(
            f"{api_broker.webhook.url}/api/stripe/webhooks",
            content=payload,
            headers={"stripe-signature": signature, "content-type": "application/json"},
        )
        assert response.status_code == 503, response.text  # nothing recorded: Stripe delivers it again
    finally:
        api.failing = False
    assert api_broker.post(completed)["outcome"] == "applied"  # not a duplicate
    paid = {"entitled": True, "status": "paid"}
    assert seen(api_broker.state(license_id), paid) == paid


def test_license_products_that_grant_one_time_purchases_need_a_stripe_api_key(postgres_url: str) -> None:
    env = process_env(postgres_url, **{**dict.fromkeys(STRIPE_SETTINGS, ""), "LICENSE_PRODUCTS": "prod_desktop_pro"})
    refused = run_module("license_broker", "webhook", "--port", str(free_port()), env=env)
    assert refused.returncode != 0
    assert refused.stderr.count("\n") == 1 and "LICENSE_PRODUCTS" in refused.stderr
    assert "STRIPE_API_KEY" in refused.stderr and "line items" in refused.stderr
    # Subscriptions alone need no key: their items are in every subscription event.
    env["LICENSE_PRODUCTS"] = "subscription:prod_desktop_pro"
    accepted = run_module("license_broker", "unmatched", "--limit", "1", env=env)
    assert accepted.returncode == 0, accepted.stderr


FEATURES = [f"feature_{n:02}" for n in range(1, 13)]  # more than the 10 a summary event lists


def test_a_summary_of_more_than_ten_entitlements_says_the_features_are_partial_without_a_key(
    broker: Broker, s: Scenario
) -> None:
    license_id, alice = new_license(), s.customer()
    s.subscribe(alice, license_id)
    s.entitlements(alice, FEATURES)
    broker.deliver(s.take())
    expected = {"entitled": True, "features": FEATURES[:10], "features_partial": True}
    assert seen(broker.state(license_id), expected) == expected


def test_with_a_key_every_active_entitlement_is_read_when_the_summary_has_more(
    keyed_broker: Broker, stripe_api: tuple[FakeStripeApi, str], shape: Shape
) -> None:
    s = Scenario(shape, api=stripe_api[0])
    license_id, alice = new_license(), s.customer()
    s.subscribe(alice, license_id)
    s.entitlements(alice, FEATURES)
    keyed_broker.deliver(s.take())
    expected = {"entitled": True, "features": FEATURES, "features_partial": False}
    assert seen(keyed_broker.state(license_id), expected) == expected
    assert seen(keyed_broker.streamed_state(license_id), expected) == expected


# --- API versions whose events do not link invoices to payments ---------------------------------


def test_without_a_key_events_of_api_2025_03_31_to_05_27_are_said_to_leave_refunds_unlinked(
    broker: Broker,
) -> None:
    s = Scenario("current", api_version=UNLINKED_API_VERSION)
    license_id = new_license()
    s.subscribe(s.customer(), license_id)
    broker.deliver(s.take())
    log = broker.webhook.log.read_text()
    assert log.count(f"API version {UNLINKED_API_VERSION}") == 1, log[-2000:]
    assert "STRIPE_API_KEY" in log and "refunds and disputes" in log


def test_with_a_key_a_refund_of_api_2025_03_31_to_05_27_reaches_its_period_through_the_invoice_payments(
    keyed_broker: Broker, stripe_api: tuple[FakeStripeApi, str]
) -> None:
    api, _ = stripe_api
    s = Scenario("current", api=api, api_version=UNLINKED_API_VERSION)
    license_id = new_license()
    sub = s.subscribe(s.customer(), license_id)
    payment = sub.latest_invoice.payment
    assert payment is not None
    payment.refund()  # the current period's charge: no event says it paid the invoice
    events = s.take()
    assert "invoice_payment.paid" not in {e["type"] for e in events}
    keyed_broker.deliver(events)
    expected = {"entitled": False, "status": "revoked"}
    assert seen(keyed_broker.state(license_id), expected) == expected
    assert api.requested("/v1/invoice_payments", invoice=sub.latest_invoice.id) == 1


# --- purchases and invoices still open -----------------------------------------------------------


def test_a_second_purchase_still_pending_does_not_lock_a_paid_license(broker: Broker, s: Scenario) -> None:
    license_id, alice = new_license(), s.customer()
    s.buy(alice, license_id)
    second = s.buy(alice, license_id, pending=True)
    broker.deliver(s.take())
    paid = {"entitled": True, "status": "paid", "kind": "perpetual"}
    assert seen(broker.state(license_id), paid) == paid
    second.async_failed()
    broker.deliver(s.take())
    assert seen(broker.state(license_id), paid) == paid


def test_paying_an_older_open_invoice_does_not_reactivate_an_unpaid_subscription_paying_the_latest_does(
    broker: Broker, s: Scenario
) -> None:
    license_id = new_license()
    sub = s.subscribe(s.customer(), license_id)
    older = sub.fail_renewal()
    latest = sub.fail_renewal(status="unpaid")
    broker.deliver(s.take())
    unpaid = {"entitled": False, "status": "unpaid"}
    assert seen(broker.state(license_id), unpaid) == unpaid
    older.pay()
    broker.deliver(s.take())
    assert seen(broker.state(license_id), unpaid) == unpaid
    latest.pay()  # no subscription event yet: the paid latest invoice is enough
    broker.deliver(s.take())
    active = {"entitled": True, "status": "active"}
    assert seen(broker.state(license_id), active) == active


def test_an_invoice_event_the_rules_do_not_list_is_ignored_and_erases_no_failed_attempt(
    broker: Broker, s: Scenario
) -> None:
    license_id = new_license()
    sub = s.subscribe(s.customer(), license_id)
    broker.deliver(s.take())
    invoice = sub.fail_renewal()  # invoice.payment_failed, customer.subscription.updated (past_due)
    invoice.touch()  # invoice.updated, the invoice still open
    failed, _, updated = s.take()
    # The subscription's own update has not arrived yet: the failed attempt alone says past_due.
    answers = broker.deliver([failed, updated])
    expected = {"entitled": True, "status": "past_due"}
    assert seen(broker.state(license_id), expected) == expected
    assert answers[-1]["outcome"] == "ignored"


def test_a_declined_attempt_on_an_emailed_invoice_leaves_the_subscription_active_until_stripe_says_past_due(
    broker: Broker, s: Scenario
) -> None:
    license_id = new_license()
    sub = s.subscribe_by_invoice(s.customer(), license_id)
    invoice = sub.send_renewal_invoice()
    broker.deliver(s.take())
    invoice.fail()  # the customer's card is declined on the hosted invoice page, weeks before the due date
    broker.deliver(s.take())
    active = {"entitled": True, "status": "active"}
    assert seen(broker.state(license_id), active) == active
    sub.update(status="past_due")  # the due date passed unpaid
    broker.deliver(s.take())
    past_due = {"entitled": True, "status": "past_due"}
    assert seen(broker.state(license_id), past_due) == past_due


# --- notices: 3-D Secure ---------------------------------------------------------------------------


def confirm_payment(invoice: Any) -> dict[str, Any]:
    return {
        "type": "payment_action_required",
        "invoice": invoice.id,
        "hosted_invoice_url": f"https://invoice.stripe.com/i/{invoice.id}",
    }


@pytest.mark.parametrize("order", ["as sent", "reversed"])
def test_a_renewal_that_needs_3d_secure_asks_the_app_to_confirm_the_payment_in_any_delivery_order(
    broker: Broker, s: Scenario, order: str
) -> None:
    license_id = new_license()
    sub = s.subscribe(s.customer(), license_id)
    broker.deliver(s.take())
    invoice = sub.renewal_needs_action()  # invoice.payment_failed and .payment_action_required, one second
    events = s.take()
    broker.deliver(events if order == "as sent" else reversed(events))
    expected = {"entitled": True, "status": "past_due", "notice": confirm_payment(invoice)}
    assert seen(broker.state(license_id), expected) == expected
    assert seen(broker.streamed_state(license_id), expected) == expected
    invoice.pay()
    sub.update(status="active")
    broker.deliver(s.take())
    paid = {"entitled": True, "status": "active", "notice": None}
    assert seen(broker.state(license_id), paid) == paid


def test_a_payment_notice_ends_with_its_subscription_and_is_gone_after_a_new_purchase(
    broker: Broker, s: Scenario
) -> None:
    license_id, alice = new_license(), s.customer()
    sub = s.subscribe(alice, license_id)
    invoice = sub.renewal_needs_action()
    broker.deliver(s.take())
    waiting = {"status": "past_due", "notice": confirm_payment(invoice)}
    assert seen(broker.state(license_id), waiting) == waiting
    sub.end()
    broker.deliver(s.take())
    ended = {"entitled": False, "status": "canceled", "notice": None}
    assert seen(broker.state(license_id), ended) == ended
    s.subscribe(alice, license_id)
    broker.deliver(s.take())
    again = {"entitled": True, "status": "active", "notice": None}
    assert seen(broker.state(license_id), again) == again


@pytest.mark.parametrize("told_by", ["both", "the subscription", "the voided invoice"])
def test_a_first_payment_never_authenticated_ends_its_notice_when_the_subscription_expires(
    broker: Broker, s: Scenario, told_by: str
) -> None:
    license_id = new_license()
    sub = s.subscribe_by_api(s.customer(), license_id)
    broker.deliver(s.take())
    waiting = {"entitled": False, "status": "incomplete", "notice": confirm_payment(sub.latest_invoice)}
    assert seen(broker.state(license_id), waiting) == waiting
    sub.expire_incomplete()  # customer.subscription.updated (incomplete_expired), invoice.voided
    updated, voided = s.take()
    broker.deliver({"both": [updated, voided], "the subscription": [updated], "the voided invoice": [voided]}[told_by])
    expected = {"entitled": False, "notice": None}
    assert seen(broker.state(license_id), expected) == expected


# --- scheduled cancellations ---------------------------------------------------------------------


@pytest.mark.parametrize("how", ["flexible billing cancel_at", "cancel_at_period_end"])
def test_a_scheduled_cancellation_tells_the_app_when_the_entitlement_ends(
    broker: Broker, s: Scenario, how: str
) -> None:
    license_id = new_license()
    sub = s.subscribe(s.customer(), license_id)
    if how.startswith("flexible"):
        ends = sub.period_end - 10 * 86400  # mid-period, as the Customer Portal does on flexible billing
        sub.cancel_on(ends)
    else:
        ends = sub.period_end
        sub.schedule_cancel()
    broker.deliver(s.take())
    state = broker.state(license_id)
    expected = {"entitled": True, "status": "active", "cancels_at": ends, "subscriptions": [sub.id]}
    assert seen(state, expected) == expected
    (entry,) = state["state"]["subscriptions"]
    assert entry["cancels_at"] is not None and int(datetime.fromisoformat(entry["cancels_at"]).timestamp()) == ends


# --- mode and Connect account --------------------------------------------------------------------


def test_test_mode_events_change_nothing_when_only_live_mode_counts(live_broker: Broker, shape: Shape) -> None:
    s = Scenario(shape, livemode=True)
    license_id, newcomer = new_license(), new_license()
    sub = s.subscribe(s.customer(), license_id)
    live_broker.deliver(s.take())
    before = live_broker.state(license_id)
    active = {"entitled": True, "status": "active"}
    assert seen(before, active) == active
    s.livemode = False  # the same objects, as a test-mode event would name them
    sub.end()
    s.subscribe(s.customer(), newcomer)
    answers = live_broker.deliver(s.take())
    after = live_broker.state(license_id)
    assert seen(after, active) == active
    assert after == before
    assert seen(live_broker.state(newcomer), NONE) == NONE
    assert {a["outcome"] for a in answers} == {"ignored"}


def test_events_of_an_unlisted_connected_account_change_nothing(live_broker: Broker, shape: Shape) -> None:
    s = Scenario(shape, livemode=True, account=LISTED_ACCOUNT)
    license_id, newcomer = new_license(), new_license()
    sub = s.subscribe(s.customer(), license_id)
    live_broker.deliver(s.take())
    before = live_broker.state(license_id)
    active = {"entitled": True, "status": "active"}
    assert seen(before, active) == active
    s.account = "acct_1SomeoneElsesAccount"
    sub.end()
    s.subscribe(s.customer(), newcomer)
    answers = live_broker.deliver(s.take())
    after = live_broker.state(license_id)
    assert seen(after, active) == active
    assert after == before
    assert seen(live_broker.state(newcomer), NONE) == NONE
    assert {a["outcome"] for a in answers} == {"ignored"}


# --- odd content and takeover --------------------------------------------------------------------


def test_a_license_id_too_long_is_rejected_with_a_2xx_and_the_webhook_keeps_answering(
    broker: Broker, s: Scenario
) -> None:
    license_id, alice = new_license(), s.customer()
    sub = s.subscribe(alice, license_id)
    broker.deliver(s.take())
    before = broker.state(license_id)
    active = {"entitled": True, "status": "active"}
    assert seen(before, active) == active
    too_long = "lic_" + "x" * 296
    s.subscribe(alice, too_long)  # the same customer: nothing may fall back to her other license
    events = s.take()
    answers = broker.deliver(events)  # 2xx each, so Stripe stops retrying
    after = broker.state(license_id)
    assert seen(after, active) == active
    assert after == before
    naming = [a for e, a in zip(events, answers, strict=True) if too_long in json.dumps(e)]
    assert naming and {a["outcome"] for a in naming} == {"rejected"}
    assert license_id not in licenses_named(answers)
    sub.schedule_cancel()
    (answer,) = broker.deliver(s.take())
    assert (answer["outcome"], answer["license_id"]) == ("applied", license_id)


def test_a_checkout_of_another_customer_naming_a_bound_license_by_client_reference_id_is_rejected(
    broker: Broker, s: Scenario
) -> None:
    license_id, alice, mallory = new_license(), s.customer(), s.customer()
    s.subscribe(alice, license_id).end()
    broker.deliver(s.take())
    before = broker.state(license_id)
    canceled = {"entitled": False, "status": "canceled"}
    assert seen(before, canceled) == canceled
    s.buy(mallory, license_id, bind="client_reference_id")  # a Payment Link: anyone can set it
    answers = broker.deliver(s.take())
    after = broker.state(license_id)
    assert seen(after, canceled) == canceled
    assert after == before
    assert answers[-1]["outcome"] == "rejected"
    # A license no customer holds yet may be bought through client_reference_id alone.
    fresh = new_license()
    s.buy(s.customer(), fresh, bind="client_reference_id")
    broker.deliver(s.take())
    paid = {"entitled": True, "status": "paid"}
    assert seen(broker.state(fresh), paid) == paid


# --- delivery order ------------------------------------------------------------------------------


def two_subscriptions(s: Scenario, license_id: str) -> dict[str, Any]:
    alice = s.customer()
    old = s.subscribe(alice, license_id)
    old.schedule_cancel()
    s.subscribe(alice, license_id)
    old.end()
    return {"entitled": True, "status": "active", "cancels_at": None}


def refund_of_a_past_period(s: Scenario, license_id: str) -> dict[str, Any]:
    sub = s.subscribe(s.customer(), license_id)
    past = sub.latest_invoice.payment
    sub.renew()
    assert past is not None
    past.refund()
    return {"entitled": True, "status": "active"}


def dispute_won(s: Scenario, license_id: str) -> dict[str, Any]:
    payment = s.subscribe(s.customer(), license_id).latest_invoice.payment
    assert payment is not None
    dispute = payment.dispute("needs_response")
    dispute.update("under_review")
    dispute.close("won")
    return {"entitled": True, "status": "active"}


def pending_second_purchase(s: Scenario, license_id: str) -> dict[str, Any]:
    alice = s.customer()
    s.buy(alice, license_id)
    s.buy(alice, license_id, pending=True).async_failed()
    return {"entitled": True, "status": "paid", "kind": "perpetual"}


def older_invoice_paid(s: Scenario, license_id: str) -> dict[str, Any]:
    sub = s.subscribe(s.customer(), license_id)
    older = sub.fail_renewal()
    sub.fail_renewal(status="unpaid")
    older.pay()
    return {"entitled": False, "status": "unpaid"}


def unrelated_subscription_ended(s: Scenario, license_id: str) -> dict[str, Any]:
    alice = s.customer()
    s.buy(alice, license_id)
    s.subscribe(alice, None, bind="none", price=OTHER_PRICE, product=OTHER_PRODUCT).end()
    return {"entitled": True, "status": "paid", "kind": "perpetual"}


def chargeback(s: Scenario, license_id: str) -> dict[str, Any]:
    payment = s.subscribe(s.customer(), license_id).latest_invoice.payment
    assert payment is not None
    payment.dispute("needs_response")
    return {"entitled": False, "status": "revoked"}


def renewal_recovered(s: Scenario, license_id: str) -> dict[str, Any]:
    sub = s.subscribe(s.customer(), license_id)
    sub.fail_renewal().pay()
    sub.update(status="active")
    return {"entitled": True, "status": "active"}


def proration_refunded(s: Scenario, license_id: str) -> dict[str, Any]:
    proration = s.subscribe(s.customer(), license_id).change_quantity(2, proration_amount=1500).payment
    assert proration is not None
    proration.refund()
    return {"entitled": True, "status": "active"}


def intent_purchase_refunded_in_two_parts(s: Scenario, license_id: str) -> dict[str, Any]:
    payment = s.buy_with_payment_intent(s.customer(), license_id, amount=12000).payment
    payment.refund(9000)
    payment.refund(3000, same_second=True)
    return {"entitled": False, "status": "revoked", "kind": "perpetual"}


class NoticeOfType:
    """Equal to any notice of this type (the two scenarios of a story have their own invoice ids)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def __eq__(self, other: object) -> bool:
        return isinstance(other, dict) and other.get("type") == self.kind

    def __repr__(self) -> str:
        return f"<a {self.kind} notice>"


def renewal_needs_3d_secure(s: Scenario, license_id: str) -> dict[str, Any]:
    s.subscribe(s.customer(), license_id).renewal_needs_action()
    return {"entitled": True, "status": "past_due", "notice": NoticeOfType("payment_action_required")}


def late_fraud_chargeback(s: Scenario, license_id: str) -> dict[str, Any]:
    late_dispute(s, license_id, "a fraud chargeback")
    return {"entitled": False, "status": "revoked"}


def emailed_invoice_declined(s: Scenario, license_id: str) -> dict[str, Any]:
    sub = s.subscribe_by_invoice(s.customer(), license_id)
    sub.send_renewal_invoice().fail()
    return {"entitled": True, "status": "active"}


STORIES: dict[str, Callable[[Scenario, str], dict[str, Any]]] = {
    f.__name__: f
    for f in (
        two_subscriptions,
        refund_of_a_past_period,
        dispute_won,
        pending_second_purchase,
        older_invoice_paid,
        unrelated_subscription_ended,
        chargeback,
        renewal_recovered,
        proration_refunded,
        intent_purchase_refunded_in_two_parts,
        renewal_needs_3d_secure,
        late_fraud_chargeback,
        emailed_invoice_declined,
    )
}


@pytest.mark.parametrize("story", STORIES)
def test_events_delivered_in_reverse_order_end_in_the_same_state(broker: Broker, shape: Shape, story: str) -> None:
    in_order, reversed_order = new_license(), new_license()
    forward = Scenario(shape)
    expected = STORIES[story](forward, in_order)
    broker.deliver(forward.take())
    backward = Scenario(shape)
    STORIES[story](backward, reversed_order)
    broker.deliver(reversed(backward.take()))
    outcomes = {"in order": seen(broker.state(in_order), expected)}
    outcomes["reversed"] = seen(broker.state(reversed_order), expected)
    assert outcomes == {"in order": expected, "reversed": expected}
