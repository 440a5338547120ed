"""The ledger's rules, pure (broker.stripe_ledger: ledger, objects, binding): each Stripe
behaviour of docs/stripe.md, and the order-independence properties."""

from __future__ import annotations

import copy
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
import sqlalchemy as sa
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.settings import Settings
from broker.storage.licenses import initial_state
from broker.storage.schema import metadata, stripe_events, stripe_links, stripe_objects
from broker.stripe_ledger.binding import TAKEOVER, MemoryLedger, resolve
from broker.stripe_ledger.fill import fill_ledger
from broker.stripe_ledger.ledger import (
    FETCHED_RANK,
    NEWER,
    OLDER,
    SAME,
    Grants,
    Kind,
    LicenseRules,
    StripeObject,
    iso,
    line_items_id,
    merge,
)
from broker.stripe_ledger.objects import EventFilter, Unprocessable, report
from tests.stripe_objects import SHAPES, Shape
from tests.stripe_scenario import Scenario, disputes_won_lost_and_prevented
from webhook.samples import SampleEvents

T = 1_800_000_000
RULES = LicenseRules(["trialing", "active", "past_due"])


def license_of(events: list[dict[str, Any]], license_id: str, rules: LicenseRules = RULES) -> dict[str, Any]:
    ledger = MemoryLedger()
    for event in events:
        ledger.apply(event)
    return dict(rules.derive(ledger.objects_of(license_id)))


def story(sample: SampleEvents, *actions: str) -> list[dict[str, Any]]:
    return [e for i, action in enumerate(actions) for e in sample.for_action(action, created=T + 100 * i)]


def test_a_license_without_objects_is_the_initial_state() -> None:
    assert RULES.derive([]) == initial_state()


def test_a_paid_checkout_unlocks_and_the_sample_life_moves_as_named() -> None:
    s = SampleEvents("lic_life")
    assert license_of(story(s, "pay"), "lic_life")["status"] == "active"
    assert license_of(story(s, "pay", "fail"), "lic_life")["status"] == "past_due"
    assert license_of(story(s, "pay", "fail", "recover"), "lic_life")["status"] == "active"
    canceled = license_of(story(s, "pay", "cancel"), "lic_life")
    assert (canceled["status"], canceled["entitled"]) == ("canceled", False)


def test_the_old_subscription_ending_leaves_a_second_one_entitled() -> None:
    s = SampleEvents("lic_two")
    state = license_of(story(s, "pay", "resubscribe", "cancel"), "lic_two")
    assert (state["status"], state["entitled"]) == ("active", True)
    assert [sub["id"] for sub in state["subscriptions"]] == [s.second_subscription]


def test_another_license_of_the_same_customer_never_moves_this_one() -> None:
    mine, other = SampleEvents("lic_mine"), SampleEvents("lic_other")
    other.customer = mine.customer  # one customer, two licenses
    events = story(mine, "pay", "fail") + [
        e for e in other.for_action("cancel", created=T + 500) + other.for_action("recover", created=T + 600)
    ]
    state = license_of(events, "lic_mine")
    assert state["status"] == "past_due"
    assert license_of(events, "lic_other")["status"] != "past_due"


def test_a_refund_revokes_only_the_period_it_paid_for() -> None:
    s = SampleEvents("lic_refund")
    assert license_of(story(s, "pay", "refund_old"), "lic_refund")["status"] == "revoked"  # the current period
    superseded = license_of(story(s, "pay", "fail", "recover", "refund_old"), "lic_refund")
    assert (superseded["status"], superseded["entitled"]) == ("active", True)
    assert license_of(story(s, "pay", "fail", "recover", "refund"), "lic_refund")["status"] == "revoked"


def test_a_partial_refund_changes_nothing_and_a_failed_refund_restores() -> None:
    s = SampleEvents("lic_partial")
    partial = s.envelope("charge.refunded", s._charge(1, refunded=500), T + 100)
    assert license_of([*story(s, "pay"), partial], "lic_partial")["status"] == "active"
    refund = {"id": "re_1", "object": "refund", "charge": s.period(1)[2], "status": "failed"}
    failed = s.envelope("refund.updated", refund, T + 200)
    assert license_of([*story(s, "pay", "refund_old"), failed], "lic_partial")["status"] == "active"


@pytest.mark.parametrize(
    ("status", "revoked"),
    [
        ("warning_needs_response", False),
        ("warning_under_review", False),
        ("warning_closed", False),
        ("needs_response", True),
        ("under_review", True),
        ("lost", True),
        ("won", False),
    ],
)
def test_disputes_revoke_only_when_funds_are_withdrawn(status: str, revoked: bool) -> None:
    s = SampleEvents("lic_dispute")
    dispute = s.envelope("charge.dispute.updated", s._dispute(1, status), T + 100)
    assert license_of([*story(s, "pay"), dispute], "lic_dispute")["entitled"] is not revoked


@pytest.mark.parametrize(
    ("scope", "reason", "status", "entitled"),
    [
        ("license", "fraudulent", "needs_response", False),
        ("license", "fraudulent", "warning_needs_response", True),
        ("license", "product_not_received", "needs_response", True),
        ("license", "product_not_received", "lost", False),
        ("license", "fraudulent", "won", True),
        ("period", "fraudulent", "needs_response", True),
        ("period", "product_not_received", "lost", True),
    ],
)
def test_a_dispute_of_a_superseded_period_revokes_the_license_only_when_lost_or_fraudulent(
    scope: Any, reason: str, status: str, entitled: bool
) -> None:
    s = SampleEvents("lic_late")
    dispute = s._dispute(1, status) | {"reason": reason}
    events = [*story(s, "pay", "fail", "recover"), s.envelope("charge.dispute.updated", dispute, T + 400)]
    rules = LicenseRules(["trialing", "active", "past_due"], dispute_revokes=scope)
    assert license_of(events, "lic_late", rules)["entitled"] is entitled


@pytest.mark.parametrize(("case_type", "entitled"), [("block", True), ("resolution", False), (None, False)])
def test_a_prevented_dispute_revokes_unless_it_was_blocked(case_type: str | None, entitled: bool) -> None:
    s = SampleEvents("lic_prevented")
    dispute = s._dispute(1, "prevented") | {"payment_method_details": {"card": {"case_type": case_type}}}
    events = [*story(s, "pay"), s.envelope("charge.dispute.closed", dispute, T + 100)]
    assert license_of(events, "lic_prevented")["entitled"] is entitled


def test_a_won_dispute_restores() -> None:
    s = SampleEvents("lic_won")
    assert license_of(story(s, "pay", "dispute"), "lic_won")["status"] == "revoked"
    assert license_of(story(s, "pay", "dispute", "dispute_won"), "lic_won")["status"] == "active"


def purchase(license_id: str, session: str, payment_status: str, created: int, kind: str = "") -> dict[str, Any]:
    s = SampleEvents(license_id)
    obj = {
        "id": session,
        "object": "checkout.session",
        "client_reference_id": None,
        "customer": s.customer,
        "metadata": {"license_id": license_id},
        "mode": "payment",
        "payment_intent": "pi_" + session,
        "payment_status": payment_status,
    }
    return s.envelope(kind or "checkout.session.completed", obj, created)


def intent(license_id: str, intent_id: str, created: int, **fields: Any) -> dict[str, Any]:
    s = SampleEvents(license_id)
    obj = {"id": intent_id, "object": "payment_intent", "customer": s.customer, "status": "succeeded"}
    obj["metadata"] = {"license_id": license_id}
    return s.envelope("payment_intent.succeeded", {**obj, **fields}, created)


def test_a_payment_intent_that_names_the_license_is_a_purchase_unless_checkout_or_an_invoice_accounts_for_it() -> None:
    alone = license_of([intent("lic_pi", "pi_alone", T)], "lic_pi")
    assert (alone["status"], alone["kind"], alone["entitled"]) == ("paid", "perpetual", True)
    of_an_invoice = license_of([intent("lic_pi2", "pi_inv", T, invoice="in_1")], "lic_pi2")
    assert (of_an_invoice["status"], of_an_invoice["entitled"]) == ("none", False)
    unpaid = purchase("lic_pi3", "cs_1", "unpaid", T)  # its session (pi_cs_1) still waits
    state = license_of([unpaid, intent("lic_pi3", "pi_cs_1", T + 1)], "lic_pi3")
    assert (state["status"], state["entitled"]) == ("incomplete", False)
    refunded = {"id": "ch_1", "object": "charge", "payment_intent": "pi_alone", "refunded": True, "amount": 4900}
    events = [intent("lic_pi", "pi_alone", T), SampleEvents("lic_pi").envelope("charge.refunded", refunded, T + 5)]
    assert license_of(events, "lic_pi")["status"] == "revoked"


def test_a_pending_second_purchase_does_not_lock_a_paid_license() -> None:
    events = [
        purchase("lic_p", "cs_1", "paid", T),
        purchase("lic_p", "cs_2", "unpaid", T + 10),
        purchase("lic_p", "cs_2", "unpaid", T + 20, "checkout.session.async_payment_failed"),
    ]
    state = license_of(events, "lic_p")
    assert (state["status"], state["kind"], state["entitled"]) == ("paid", "perpetual", True)


def test_an_async_purchase_unlocks_only_when_it_succeeds() -> None:
    pending = [purchase("lic_a", "cs_1", "unpaid", T)]
    assert license_of(pending, "lic_a")["status"] == "incomplete"
    paid = [*pending, purchase("lic_a", "cs_1", "unpaid", T + 5, "checkout.session.async_payment_succeeded")]
    assert license_of(paid, "lic_a")["status"] == "paid"
    expired = [purchase("lic_a", "cs_2", "unpaid", T, "checkout.session.expired")]
    assert license_of(expired, "lic_a")["status"] == "expired"


def test_paying_an_older_invoice_does_not_reactivate_an_unpaid_subscription() -> None:
    s = SampleEvents("lic_unpaid")
    events = story(s, "pay", "fail")
    events.append(s.subscription_event("customer.subscription.updated", "unpaid", T + 300, latest=2))
    assert license_of(events, "lic_unpaid")["status"] == "unpaid"
    old = s.invoice_event("invoice.paid", T + 400, 1)  # the first period's invoice, paid again
    old["data"]["object"]["created"] = T - 60  # an invoice keeps the `created` it was made with
    assert license_of([*events, old], "lic_unpaid")["status"] == "unpaid"
    latest = s.invoice_event("invoice.paid", T + 500, 2)
    assert license_of([*events, latest], "lic_unpaid")["status"] == "active"


def test_a_flexible_billing_cancellation_shows_when_the_license_ends() -> None:
    s = SampleEvents("lic_flex")
    event = s.subscription_event("customer.subscription.updated", "active", T + 100)
    event["data"]["object"].update(cancel_at=T + 86400, cancel_at_period_end=False)
    state = license_of([*story(s, "pay"), event], "lic_flex")
    assert state["entitled"] and state["cancels_at"] == "2027-01-16T08:00:00+00:00"
    at_period_end = s.subscription_event("customer.subscription.updated", "active", T + 200)
    at_period_end["data"]["object"].update(cancel_at_period_end=True)
    state = license_of([*story(s, "pay"), at_period_end], "lic_flex")
    assert state["cancels_at"] == state["current_period_end"] is not None


def test_a_trial_notice_goes_when_the_trial_is_extended_or_ends() -> None:
    s = SampleEvents("lic_trial")
    notice = s.subscription_event("customer.subscription.trial_will_end", "trialing", T)
    notice["data"]["object"]["trial_end"] = T + 3 * 86400
    state = license_of([notice], "lic_trial")
    assert state["notice"]["type"] == "trial_will_end"
    extended = copy.deepcopy(notice)
    extended.update(id="evt_extended", type="customer.subscription.updated", created=T + 10)
    extended["data"]["object"]["trial_end"] = T + 10 * 86400
    assert license_of([notice, extended], "lic_trial")["notice"] is None
    ended = s.subscription_event("customer.subscription.updated", "active", T + 20)
    assert license_of([notice, ended], "lic_trial")["notice"] is None


def test_a_payment_that_needs_action_is_a_notice_until_paid() -> None:
    s = SampleEvents("lic_sca")
    action = s.invoice_event("invoice.payment_action_required", T + 100, 2)
    action["data"]["object"]["hosted_invoice_url"] = "https://invoice.stripe.com/i/x"
    state = license_of([*story(s, "pay"), action], "lic_sca")
    assert state["notice"] == {
        "type": "payment_action_required",
        "invoice": s.period(2)[0],
        "hosted_invoice_url": "https://invoice.stripe.com/i/x",
    }
    paid = s.invoice_event("invoice.paid", T + 200, 2)
    assert license_of([*story(s, "pay"), action, paid], "lic_sca")["notice"] is None


@pytest.mark.parametrize("action_first", [True, False])
def test_a_failed_attempt_of_the_same_second_does_not_hide_the_action_required_notice(action_first: bool) -> None:
    s = SampleEvents("lic_sca_tie")
    action = s.invoice_event("invoice.payment_action_required", T + 100, 2)
    failed = s.invoice_event("invoice.payment_failed", T + 100, 2)
    pair = [action, failed] if action_first else [failed, action]
    state = license_of([*story(s, "pay"), *pair], "lic_sca_tie")
    assert state["notice"] is not None and state["notice"]["invoice"] == s.period(2)[0]
    voided = s.invoice_event("invoice.voided", T + 200, 2)
    voided["data"]["object"]["status"] = "void"
    assert license_of([*story(s, "pay"), *pair, voided], "lic_sca_tie")["notice"] is None


def test_invoice_events_the_rules_do_not_list_report_nothing() -> None:
    s = SampleEvents("lic_unlisted")
    for kind in ("invoice.updated", "invoice.created", "invoice.finalized", "invoice.upcoming"):
        assert report(s.invoice_event(kind, T)) is None, kind


def test_a_deleted_customer_loses_its_subscriptions_and_features() -> None:
    s = SampleEvents("lic_gone")
    summary = s.envelope(
        "entitlements.active_entitlement_summary.updated",
        {"customer": s.customer, "entitlements": {"data": [{"lookup_key": "pro"}]}},
        T + 10,
    )
    assert license_of([*story(s, "pay"), summary], "lic_gone")["features"] == ["pro"]
    deleted = s.envelope("customer.deleted", {"id": s.customer, "object": "customer", "deleted": True}, T + 20)
    state = license_of([*story(s, "pay"), summary, deleted], "lic_gone")
    assert (state["status"], state["features"]) == ("canceled", [])


def test_license_products_limit_what_grants() -> None:
    s = SampleEvents("lic_prod")
    assert license_of(story(s, "pay"), "lic_prod", LicenseRules(["active"], ["prod_Pro"]))["entitled"]
    assert not license_of(story(s, "pay"), "lic_prod", LicenseRules(["active"], ["prod_Other"]))["entitled"]


def test_a_payment_link_of_another_customer_cannot_take_a_license() -> None:
    s = SampleEvents("lic_taken")
    theirs = s.checkout_completed(T + 100, "sub_theirs", "in_theirs")
    theirs["data"]["object"].update(id="cs_theirs", metadata={}, customer="cus_intruder")
    reported = report(theirs)
    assert reported is not None and reported.by_reference
    assert resolve(reported, {}, {s.customer}).rejected == TAKEOVER
    state = license_of([*story(s, "pay"), theirs], "lic_taken")
    assert state == license_of(story(s, "pay"), "lic_taken")


@pytest.mark.parametrize("license_id", ["x" * 201, "lic\x00nul", "   "])
def test_an_unusable_license_id_is_unprocessable(license_id: str) -> None:
    s = SampleEvents("lic_x")
    event = s.checkout_completed(T)
    event["data"]["object"]["metadata"] = {"license_id": license_id}
    with pytest.raises(Unprocessable):
        report(event)


def test_the_mode_and_account_filter() -> None:
    live_only = EventFilter(livemode=True, accounts=frozenset({"acct_1"}))
    assert live_only.reason({"livemode": False}) is not None
    assert live_only.reason({"livemode": True}) is None
    assert live_only.reason({"livemode": True, "account": "acct_2"}) is not None
    assert live_only.reason({"livemode": True, "account": "acct_1"}) is None
    assert EventFilter().reason({"livemode": False}) is None


# -- order independence -----------------------------------------------------------------------

STATUSES = ["incomplete", "trialing", "active", "past_due", "unpaid", "paused", "canceled"]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 5), st.sampled_from(STATUSES)), min_size=1, max_size=8),
    st.randoms(use_true_random=False),
)
def test_any_delivery_order_of_one_objects_events_gives_the_same_object(
    snapshots: list[tuple[int, str]], rng: Any
) -> None:
    s = SampleEvents("lic_order")
    events = [s.subscription_event("customer.subscription.updated", status, T + dt) for dt, status in snapshots]
    objects = [o for e in events if (r := report(e)) for o in r.objects]

    def fold(order: list[StripeObject]) -> StripeObject | None:
        held: StripeObject | None = None
        for obj in order:
            merged, _ = merge(held, obj)
            held = merged or held
        return held

    shuffled = list(objects)
    rng.shuffle(shuffled)
    assert fold(shuffled) == fold(objects)


FULL_LIFE = ("pay", "fail", "recover", "resubscribe", "refund_old", "dispute", "dispute_won", "cancel", "refund")


@settings(max_examples=100, deadline=None)
@given(st.integers(1, len(FULL_LIFE)), st.randoms(use_true_random=False))
def test_any_interleaving_of_several_objects_events_gives_the_same_license(length: int, rng: Any) -> None:
    events = story(SampleEvents("lic_any"), *FULL_LIFE[:length])
    shuffled = list(events)
    rng.shuffle(shuffled)
    assert license_of(shuffled, "lic_any") == license_of(events, "lic_any")


# Stories of the objects the rules judge, built from Stripe's published objects (tests.stripe_scenario):
# each returns its license id. One-time purchases by payment intent and by Checkout (line items as
# the API gives them), proration invoices, 3-D Secure notices, emailed invoices, late and prevented
# disputes, two partial refunds of one second, expired first invoices, more than 10 entitlements.


def intent_purchase_refunded_twice_in_one_second(s: Scenario) -> str:
    license_id, alice = "lic_prop_intent", s.customer()
    payment = s.buy_with_payment_intent(alice, license_id, amount=12000).payment
    payment.refund(9000)
    payment.refund(3000, same_second=True)
    payment.dispute("warning_needs_response")
    return license_id


def proration_refunded_then_renewed(s: Scenario) -> str:
    license_id = "lic_prop_proration"
    sub = s.subscribe(s.customer(), license_id)
    proration = sub.change_quantity(3, proration_amount=1500).payment
    assert proration is not None
    proration.refund()
    sub.renew()
    return license_id


def renewal_needs_3d_secure_then_ends(s: Scenario) -> str:
    license_id, alice = "lic_prop_sca", s.customer()
    sub = s.subscribe(alice, license_id)
    sub.renewal_needs_action().pay()
    sub.update(status="active")
    sub.renewal_needs_action()
    sub.end()
    s.subscribe(alice, license_id).renewal_needs_action()
    return license_id


def emailed_invoice_declined_then_past_due(s: Scenario) -> str:
    license_id = "lic_prop_emailed"
    sub = s.subscribe_by_invoice(s.customer(), license_id)
    sub.send_renewal_invoice().fail()
    sub.update(status="past_due")
    return license_id


def late_and_prevented_disputes(s: Scenario) -> str:
    license_id = "lic_prop_disputes"
    disputes_won_lost_and_prevented(s, license_id)
    return license_id


def first_invoice_expired_then_bought_again(s: Scenario) -> str:
    license_id, alice = "lic_prop_expired", s.customer()
    s.subscribe_by_api(alice, license_id).expire_incomplete()
    s.subscribe(alice, license_id)
    s.entitlements(alice, [f"feature_{n}" for n in range(12)])
    return license_id


def lifetime_and_addon_by_checkout(s: Scenario) -> str:
    license_id, alice = "lic_prop_checkout", s.customer()
    s.buy(alice, license_id, pending=True).async_succeeded()
    s.buy(alice, license_id, price="price_addon", product="prod_addon", amount=500)
    return license_id


PROPERTY_STORIES = [
    intent_purchase_refunded_twice_in_one_second,
    proration_refunded_then_renewed,
    renewal_needs_3d_secure_then_ends,
    emailed_invoice_declined_then_past_due,
    late_and_prevented_disputes,
    first_invoice_expired_then_bought_again,
    lifetime_and_addon_by_checkout,
]
PROPERTY_RULES = [
    RULES,
    LicenseRules(["trialing", "active", "past_due"], dispute_revokes="period"),
    LicenseRules(["trialing", "active", "past_due"], ["subscription:prod_desktop_pro", "perpetual:price_lifetime"]),
]


def with_line_items(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Checkout events with the session's line items expanded, as the API gives them (the ledger keeps
    them as an object of their own, what broker.ingest.general reads once with STRIPE_API_KEY)."""
    for event in events:
        session = event["data"]["object"]
        if event["type"].startswith("checkout.session.") and session.get("mode") == "payment":
            price = "price_addon" if session["amount_total"] == 500 else "price_lifetime"
            item = {"id": f"li_{session['id']}", "object": "item", "price": {"id": price, "product": "prod_x"}}
            session["line_items"] = {"object": "list", "data": [item], "has_more": False}
    return events


@settings(max_examples=150, deadline=None)
@given(
    st.sampled_from(PROPERTY_STORIES),
    st.sampled_from(SHAPES),
    st.sampled_from(PROPERTY_RULES),
    st.randoms(use_true_random=False),
)
def test_any_delivery_order_of_the_new_objects_events_gives_the_same_objects_and_license(
    build: Any, shape: Shape, rules: LicenseRules, rng: Any
) -> None:
    s = Scenario(shape)
    license_id = build(s)
    events = with_line_items(s.take())
    shuffled = list(events)
    rng.shuffle(shuffled)

    def fold(order: list[dict[str, Any]]) -> tuple[dict[str, StripeObject], dict[str, Any]]:
        ledger = MemoryLedger()
        for event in order:
            ledger.apply(event)
        return ledger.objects, dict(rules.derive(ledger.objects_of(license_id)))

    assert fold(shuffled) == fold(events)


def test_the_property_stories_end_where_the_rules_say() -> None:
    ends = {}
    for build in PROPERTY_STORIES:
        s = Scenario("current")
        license_id = build(s)
        ledger = MemoryLedger()
        for event in with_line_items(s.take()):
            ledger.apply(event)
        state = RULES.derive(ledger.objects_of(license_id))
        ends[build.__name__] = (state["status"], state["entitled"], bool(state["notice"]), state["features_partial"])
    assert ends == {
        "intent_purchase_refunded_twice_in_one_second": ("revoked", False, False, False),
        "proration_refunded_then_renewed": ("active", True, False, False),
        "renewal_needs_3d_secure_then_ends": ("past_due", True, True, False),
        "emailed_invoice_declined_then_past_due": ("past_due", True, False, False),
        "late_and_prevented_disputes": ("revoked", False, False, False),
        "first_invoice_expired_then_bought_again": ("active", True, False, True),
        "lifetime_and_addon_by_checkout": ("paid", True, False, False),
    }


def test_every_event_type_the_rules_use_is_in_the_list_users_enable() -> None:
    from pathlib import Path

    from broker.stripe_ledger.objects import EVENT_TYPES

    enable = (Path(__file__).parents[1] / "docs" / "stripe.md").read_text().split("## 2.", 1)[1].split("## 3.", 1)[0]
    for kind in EVENT_TYPES:
        prefix, _, last = kind.rpartition(".")
        assert f"`{kind}`" in enable or (f"`{prefix}." in enable and f"`.{last}`" in enable), kind


def test_a_rebuild_keeps_what_was_read_from_stripes_api() -> None:
    bought = purchase("lic_rebuilt", "cs_rebuilt", "paid", T)
    engine = sa.create_engine("sqlite://")
    metadata.create_all(engine)
    now = datetime.now(UTC)
    with engine.begin() as conn:
        conn.execute(
            stripe_events.insert(),
            {"id": bought["id"], "type": bought["type"], "created": T, "payload": orjson.dumps(bought).decode()}
            | {"outcome": "applied", "received_at": now},
        )
        read = {"id": line_items_id("cs_rebuilt"), "kind": "line_items", "version": T, "rank": FETCHED_RANK}
        conn.execute(stripe_objects.insert(), read | {"state": {"products": ["price_lifetime"]}, "updated_at": now})
        conn.execute(stripe_links.insert(), {"object_id": read["id"], "linked_id": "cs_rebuilt"})
        ledger = fill_ledger(conn, now)
    rules = LicenseRules(["active"], ["perpetual:price_lifetime"])
    state = rules.derive(ledger.objects_of("lic_rebuilt"))
    assert (state["status"], state["entitled"]) == ("paid", True)
    assert ledger.bindings[line_items_id("cs_rebuilt")] == "lic_rebuilt"


# -- each rule on its own, from ledger rows ---------------------------------------------------
# The rules read ledger rows (StripeObject), whatever event or API read wrote them. These tests
# build the rows directly, one rule and its boundary at a time: each was written for mutants of
# broker/stripe_ledger/ledger.py that the story tests above let survive (docs/testing.md).

CUS = "cus_rules"


def obj(kind: Kind, object_id: str, version: int = T, customer: str | None = CUS, **state: Any) -> StripeObject:
    return StripeObject(object_id, kind, version, 0, state, customer)


def derived(*objects: StripeObject, rules: LicenseRules = RULES) -> dict[str, Any]:
    return dict(rules.derive(objects))


def sub(status: str = "active", version: int = T, sub_id: str = "sub_1", **state: Any) -> StripeObject:
    return obj("subscription", sub_id, version, status=status, **state)


def invoice(
    invoice_id: str,
    outcome: str = "paid",
    created: int = T,
    *,
    version: int | None = None,
    subscription: str | None = "sub_1",
    billing_reason: str | None = "subscription_cycle",
    **state: Any,
) -> StripeObject:
    """An invoice row; its event's `created` (the row's version) is the invoice's own unless given."""
    state |= {"subscription": subscription, "created": created, "billing_reason": billing_reason}
    return obj("invoice", invoice_id, created if version is None else version, status=outcome, **state)


def bought(intent_id: str = "pi_1", outcome: str = "succeeded", version: int = T, **state: Any) -> StripeObject:
    """A payment intent whose metadata names the license: a purchase by the Payment Element or the API."""
    return obj("payment_intent", intent_id, version, **{"status": outcome, "purchase": True, "products": []} | state)


def test_license_products_are_read_per_kind_of_purchase() -> None:
    """LICENSE_PRODUCTS: a bare id grants both kinds of purchase, a `subscription:` or `perpetual:`
    prefix only its own; a purchase whose products are not known (line items not read) is not
    known to be listed; nothing listed, every purchase grants."""
    grants = Grants.of(["prod_both", "subscription:prod_pro", "perpetual:price_life"])
    assert grants == Grants(frozenset({"prod_both", "prod_pro"}), frozenset({"prod_both", "price_life"}))
    assert grants.allow("subscription", ["prod_other", "prod_pro"])
    assert not grants.allow("subscription", ["price_life"]) and not grants.allow("subscription", [])
    assert grants.allow("perpetual", ["price_life"]) and not grants.allow("perpetual", ["prod_pro"])
    assert not grants.allow("perpetual", None)
    assert Grants.of([]).allow("perpetual", None) and Grants.of([]).allow("subscription", [])


@pytest.mark.parametrize("scope", ["period", "license"])
def test_the_rules_are_the_sellers_settings(scope: Any) -> None:
    """ENTITLED_STATUSES, LICENSE_PRODUCTS and DISPUTE_REVOKES, as set."""
    settings = Settings(
        entitled_statuses=frozenset({"active"}),
        license_products=frozenset({"perpetual:price_life"}),
        dispute_revokes=scope,
    )
    rules = LicenseRules.from_settings(settings)
    assert (rules.entitled_statuses, rules.grants, rules.dispute_revokes) == (
        frozenset({"active"}),
        Grants(perpetual=frozenset({"price_life"})),
        scope,
    )


def test_revoked_never_entitles_even_when_listed_and_disputes_revoke_the_license_by_default() -> None:
    """A purchase whose money went back is `revoked`: listing that status in ENTITLED_STATUSES cannot
    entitle it. DISPUTE_REVOKES is `license` unless set (docs/stripe.md)."""
    rules = LicenseRules(["active", "paid", "revoked"])
    assert rules.dispute_revokes == "license"
    refunded = obj("charge", "ch_1", T + 5, refunded=True, payment_intent="pi_1")
    state = derived(bought(), refunded, rules=rules)
    assert (state["status"], state["entitled"]) == ("revoked", False)
    period = invoice("in_1", "paid", T - 10, billing_reason="subscription_create", charge="ch_1")
    state = derived(sub(latest_invoice="in_1"), period, refunded, rules=rules)
    assert (state["status"], state["entitled"]) == ("revoked", False)


def test_line_items_are_read_only_for_a_one_time_checkout_while_one_time_products_are_listed() -> None:
    """Webhooks never carry a Checkout Session's line items
    (https://docs.stripe.com/api/checkout/sessions/line_items): the broker reads them from the API
    only where the rules judge a purchase by them."""
    session = obj("checkout", "cs_1", mode="payment")
    assert LicenseRules(["active"], ["perpetual:price_life"]).needs_line_items(session)
    assert not LicenseRules(["active"], ["subscription:prod_pro"]).needs_line_items(session)
    assert not LicenseRules(["active"], ["price_life"]).needs_line_items(obj("checkout", "cs_2", mode="subscription"))
    items = obj("line_items", line_items_id("cs_1"), mode="payment")
    assert not LicenseRules(["active"], ["price_life"]).needs_line_items(items)


def test_a_later_snapshot_replaces_the_held_one_keeping_its_links_and_customer() -> None:
    """Each object is the maximum of its snapshots and links only accumulate (module docstring): a
    later snapshot replaces the held one with the links of both, and the held customer when it names
    none; the same snapshot or an older one changes nothing but new links, and says which it was."""
    held = StripeObject("sub_1", "subscription", T, 2, {"status": "active"}, "cus_1", frozenset({"in_1"}))
    later = StripeObject("sub_1", "subscription", T + 1, 2, {"status": "past_due"}, None, frozenset({"in_2"}))
    assert merge(None, held) == (held, NEWER)
    assert merge(held, later) == (replace(later, links=frozenset({"in_1", "in_2"}), customer="cus_1"), NEWER)
    assert merge(held, replace(later, customer="cus_2")) == (
        replace(later, links=frozenset({"in_1", "in_2"}), customer="cus_2"),
        NEWER,
    )
    assert merge(held, held) == (None, SAME)
    assert merge(later, replace(held, links=frozenset())) == (None, OLDER)
    assert merge(later, replace(held, links=frozenset({"in_3"}))) == (
        replace(later, links=frozenset({"in_2", "in_3"})),
        OLDER,
    )
    assert merge(held, replace(held, links=frozenset({"in_0"}))) == (
        replace(held, links=frozenset({"in_0", "in_1"})),
        SAME,
    )


def test_snapshots_of_one_second_and_stage_are_ordered_by_content_not_by_arrival() -> None:
    """`created` has one-second resolution and Stripe does not order deliveries: of two snapshots of
    one second and one stage the greater content wins, whichever arrives first, and the same content
    with its keys in another order is the same snapshot."""
    a = StripeObject("sub_1", "subscription", T, 2, {"status": "active", "latest_invoice": "in_1"})
    b = StripeObject("sub_1", "subscription", T, 2, {"status": "active", "latest_invoice": "in_2"})
    assert (merge(a, b)[0] or a) == (merge(b, a)[0] or b)
    reordered = replace(a, state={"latest_invoice": "in_1", "status": "active"})
    assert merge(a, reordered) == merge(reordered, a) == (None, SAME)


def test_a_time_the_license_shows_is_an_iso_utc_time_or_nothing() -> None:
    assert iso(T) == "2027-01-15T08:00:00+00:00"
    for not_a_time in (None, True, "1800000000", 1.8e9, 10**20):
        assert iso(not_a_time) is None, not_a_time


@pytest.mark.parametrize(
    ("billing_reason", "period_line", "revoked"),
    [
        ("subscription_update", False, False),  # a proration: pays for a change within the period
        ("subscription_update", True, True),  # a new interval: the change restarts the period
        ("manual", True, False),
        ("subscription_cycle", False, True),
        (None, False, True),  # a row written before billing reasons were kept
    ],
)
def test_a_refund_revokes_a_subscription_only_when_its_invoice_paid_for_the_current_period(
    billing_reason: str | None, period_line: bool, revoked: bool
) -> None:
    """The first invoice and each renewal pay for a period
    (https://docs.stripe.com/api/invoices/object#invoice_object-billing_reason); an update's invoice
    only when the change restarts the billing cycle, a line that is not a proration
    (https://docs.stripe.com/api/subscriptions/update). Refunding a proration leaves the period paid."""
    first = invoice("in_1", created=T - 100, billing_reason="subscription_create", charge="ch_1")
    later = invoice("in_2", billing_reason=billing_reason, period_line=period_line, charge="ch_2")
    refunded = obj("charge", "ch_2", T + 10, refunded=True, payment_intent="pi_2")
    state = derived(sub(latest_invoice="in_2"), first, later, refunded)
    assert state["status"] == ("revoked" if revoked else "active")


def test_an_invoice_row_without_its_created_time_counts_as_the_oldest() -> None:
    """A row is only typed as a mapping: an invoice row without `created` sorts first, never raises."""
    undated = obj("invoice", "in_0", T - 100, status="paid", subscription="sub_1", billing_reason="subscription_create")
    failed = invoice("in_1", "failed", T - 50)
    assert derived(sub("active", T - 200), undated, failed)["status"] == "past_due"


def test_a_broker_trial_shows_its_end_and_expires_once_ended() -> None:
    """The broker's own trial (LICENSE_TRIAL_DAYS, no Stripe object): entitled while running, its end
    shown as when the license ends; `expired` once ended; no end known, none shown."""
    running = obj("trial", "trial:lic_1", T, None, status="trialing", trial_end=T + 86400)
    state = derived(running)
    assert (state["status"], state["kind"], state["entitled"]) == ("trialing", "trial", True)
    assert state["trial_end"] == state["cancels_at"] == "2027-01-16T08:00:00+00:00"
    ended = derived(replace(running, version=T + 86400, state={"status": "ended", "trial_end": T + 86400}))
    assert (ended["status"], ended["entitled"], ended["cancels_at"]) == ("expired", False, None)
    assert ended["trial_end"] == "2027-01-16T08:00:00+00:00"
    undated = derived(obj("trial", "trial:lic_2", T, None, status="trialing"))
    assert (undated["status"], undated["trial_end"], undated["cancels_at"]) == ("trialing", None, None)


def test_a_purchase_made_during_a_broker_trial_decides_the_license_and_its_lease_is_not_cut() -> None:
    """A broker trial decides only where nothing bought does (LicenseRules.derive)."""
    trial = obj("trial", "trial:lic_1", T + 50, None, status="trialing", trial_end=T + 86400)
    state = derived(trial, bought())
    assert (state["status"], state["kind"], state["entitled"]) == ("paid", "perpetual", True)
    assert (state["cancels_at"], state["trial_end"]) == (None, None)


def test_the_entitling_object_nearest_to_paying_decides_then_the_newest() -> None:
    """PRECEDENCE: an active subscription decides over a newer past_due one; of two with one status
    the newest decides; a status the broker does not know comes last."""
    older_active, newer_past_due = sub("active", T, "sub_a"), sub("past_due", T + 10, "sub_b")
    state = derived(older_active, newer_past_due)
    assert (state["status"], state["subscription"]) == ("active", "sub_a")
    assert [s["id"] for s in state["subscriptions"]] == ["sub_a", "sub_b"]
    newer_active = sub("active", T + 20, "sub_c")
    assert derived(older_active, newer_active)["subscription"] == "sub_c"
    assert derived(newer_active, older_active)["subscription"] == "sub_c"
    unknown = derived(sub("canceled", T, "sub_a"), sub("a_status_stripe_adds_later", T + 10, "sub_b"))
    assert (unknown["status"], unknown["subscription"]) == ("canceled", "sub_a")


def test_a_checkout_subscription_is_active_once_its_own_session_is_paid() -> None:
    """Checkout creates the subscription `incomplete` and activates it on payment
    (https://docs.stripe.com/billing/subscriptions/overview): a paid session activates the subscription
    it names, not another, and never brings back one that has ended."""
    paid = obj("checkout", "cs_1", T, mode="subscription", subscription="sub_1", status="paid")
    assert derived(sub("incomplete", T - 10), paid)["status"] == "active"
    unpaid = replace(paid, state={**paid.state, "status": "unpaid"})
    assert derived(sub("incomplete", T - 10), unpaid)["status"] == "incomplete"
    other = obj("checkout", "cs_2", T, mode="subscription", subscription="sub_2", status="paid")
    assert derived(sub("incomplete", T - 10), sub("canceled", T, "sub_2"), other)["status"] == "incomplete"
    assert derived(sub("canceled", T + 10), paid)["status"] == "canceled"


@pytest.mark.parametrize(
    ("status", "outcome", "moved_to"),
    [
        ("incomplete", "paid", "active"),
        ("past_due", "paid", "active"),
        ("unpaid", "paid", "active"),
        ("past_due", "open", "past_due"),
        ("canceled", "paid", "canceled"),
        ("paused", "paid", "paused"),
        ("active", "failed", "past_due"),
        ("active", "open", "active"),
        ("trialing", "failed", "trialing"),
        ("canceled", "failed", "canceled"),
    ],
)
def test_the_latest_invoice_moves_a_subscription_waiting_for_payment_or_charged_automatically(
    status: str, outcome: str, moved_to: str
) -> None:
    """A paid latest invoice moves a subscription awaiting payment (incomplete, past_due, unpaid) to
    active; a failed one moves an active subscription to past_due
    (https://docs.stripe.com/billing/subscriptions/overview); neither moves any other status."""
    state = derived(sub(status, T, latest_invoice="in_1"), invoice("in_1", outcome, T - 100, version=T + 10))
    assert state["status"] == moved_to


def test_an_invoice_moves_a_subscription_only_by_an_event_not_older_than_its_own() -> None:
    """Only an event not older than the subscription's own last word moves it; a failed attempt of the
    same second leaves it to the subscription's own event (Stripe sends `past_due` itself)."""
    assert derived(sub("incomplete", T, latest_invoice="in_1"), invoice("in_1", "paid", T))["status"] == "active"
    assert derived(sub("past_due", T, latest_invoice="in_1"), invoice("in_1", "paid", T - 10))["status"] == "past_due"
    assert derived(sub("active", T, latest_invoice="in_1"), invoice("in_1", "failed", T))["status"] == "active"


@pytest.mark.parametrize(
    ("billing_reason", "invoice_collection", "subscription_collection", "moved_to"),
    [
        ("subscription_cycle", "charge_automatically", "charge_automatically", "past_due"),
        ("subscription_update", "charge_automatically", "charge_automatically", "active"),
        ("subscription_cycle", "send_invoice", "charge_automatically", "active"),
        ("subscription_cycle", "charge_automatically", "send_invoice", "active"),
    ],
)
def test_a_failed_update_or_emailed_invoice_leaves_the_subscription_active(
    billing_reason: str, invoice_collection: str, subscription_collection: str, moved_to: str
) -> None:
    """A failed pending-update invoice: "The subscription will continue to cycle as if no update
    request was made" (https://docs.stripe.com/billing/subscriptions/pending-updates-reference). A
    subscription billed by email "becomes `past_due` when its invoice is not paid by the due date"
    (https://docs.stripe.com/api/subscriptions/object#subscription_object-status), however many
    attempts fail before: its own status says so."""
    active = sub("active", T, latest_invoice="in_1", collection_method=subscription_collection)
    failed = invoice("in_1", "failed", T + 10, billing_reason=billing_reason, collection_method=invoice_collection)
    assert derived(active, failed)["status"] == moved_to


def test_the_latest_invoice_is_the_named_one_unless_a_known_one_was_created_after_it() -> None:
    """Stripe does not order deliveries: a renewal invoice created after the one the subscription
    event names is the latest; one created in the same second is not; when the named invoice is
    unknown here, a known one counts only if created after the subscription event; with none named,
    the newest known."""
    named = invoice("in_1", "paid", T - 400, billing_reason="subscription_create")
    renewals = [
        invoice("in_a", "failed", T - 200, version=T + 20),
        invoice("in_c", "paid", T - 300),
        invoice("in_b", "paid", T - 250),
    ]
    assert derived(sub("active", T, latest_invoice="in_1"), named, *renewals)["status"] == "past_due"
    same_second = invoice("in_0", "failed", T - 400, version=T + 20)
    assert derived(sub("active", T, latest_invoice="in_1"), named, same_second)["status"] == "active"
    unknown_named = sub("past_due", T, latest_invoice="in_9")
    assert derived(unknown_named, invoice("in_1", "paid", T - 50, version=T + 10))["status"] == "past_due"
    assert derived(unknown_named, invoice("in_2", "paid", T + 10))["status"] == "active"
    none_named = sub("active", T - 400)
    assert derived(none_named, renewals[0], renewals[1], renewals[2])["status"] == "past_due"
    assert derived(sub("incomplete", T - 400))["status"] == "incomplete"


def test_another_subscriptions_invoices_never_move_this_one() -> None:
    """An invoice moves and revokes only the subscription it bills."""
    mine = sub("active", T, "sub_1", latest_invoice="in_1")
    theirs = sub("canceled", T, "sub_2")
    failed = invoice("in_2", "failed", T + 10, subscription="sub_2", charge="ch_2")
    refunded = obj("charge", "ch_2", T + 20, refunded=True)
    state = derived(mine, invoice("in_1", "paid", T - 10, charge="ch_1"), theirs, failed, refunded)
    assert (state["status"], state["subscription"]) == ("active", "sub_1")


def test_deleting_the_customer_cancels_its_subscriptions_and_drops_its_features() -> None:
    """Deleting a customer cancels its subscriptions at once (https://docs.stripe.com/api/customers/delete);
    its entitlements go with it, even those of a one-time purchase that still entitles."""
    gone = obj("customer", CUS, T, deleted=True)
    state = derived(sub("active", T), gone)
    assert (state["status"], state["entitled"]) == ("canceled", False)
    assert derived(sub("active", T + 10), obj("customer", CUS, T, not_deleted=True))["status"] == "active"
    summary = obj("entitlements", "ent_1", T, features=["pro"])
    assert derived(bought(), summary)["features"] == ["pro"]
    state = derived(bought(), summary, gone)
    assert (state["status"], state["features"]) == ("paid", [])


@pytest.mark.parametrize("ended", ["canceled", "incomplete_expired"])
def test_an_ended_subscription_whose_period_was_refunded_shows_how_it_ended(ended: str) -> None:
    """`revoked` says a period's money went back while the subscription would run: one that has ended
    (canceled, or incomplete_expired) stays as it ended."""
    first = invoice("in_1", "paid", T - 10, billing_reason="subscription_create", charge="ch_1")
    state = derived(sub(ended, latest_invoice="in_1"), first, obj("charge", "ch_1", T + 10, refunded=True))
    assert state["status"] == ended


def test_license_products_decide_which_subscriptions_grant() -> None:
    rules = LicenseRules(["active"], ["subscription:prod_pro"])
    assert derived(sub(products=["prod_pro"]), rules=rules)["entitled"]
    assert derived(sub(products=["prod_other"]), rules=rules)["status"] == "none"
    assert derived(sub(), rules=rules)["status"] == "none"  # no products known
    assert derived(sub())["entitled"]  # nothing listed: every subscription grants


def test_a_subscription_shows_when_it_ends_only_once_it_is_set_to_end() -> None:
    """`cancel_at` (a date, or flexible billing) or `cancel_at_period_end`
    (https://docs.stripe.com/billing/subscriptions/cancel)."""
    end = T + 30 * 86400
    assert derived(sub(current_period_end=end))["cancels_at"] is None
    assert derived(sub(current_period_end=end, cancel_at=T + 86400))["cancels_at"] == iso(T + 86400)
    at_period_end = derived(sub(current_period_end=end, cancel_at=None, cancel_at_period_end=True))
    assert (at_period_end["cancels_at"], at_period_end["cancel_at_period_end"]) == (iso(end), True)
    assert at_period_end["subscriptions"] == [
        {"id": "sub_1", "status": "active", "current_period_end": iso(end), "cancels_at": iso(end)}
    ]
    trialing = derived(sub("trialing", current_period_end=end, trial_end=T + 86400))
    assert (trialing["trial_end"], trialing["current_period_end"]) == (iso(T + 86400), iso(end))


def test_a_license_ends_only_when_every_entitling_subscription_ends_and_then_at_the_last() -> None:
    a = sub(sub_id="sub_a", cancel_at=T + 86400)
    b = sub(sub_id="sub_b", version=T + 5, cancel_at=T + 2 * 86400)
    assert derived(a, b)["cancels_at"] == iso(T + 2 * 86400)
    assert derived(a, sub(sub_id="sub_c", version=T + 5))["cancels_at"] is None


def test_the_period_a_refund_revokes_is_the_newest_invoice_that_paid_for_one() -> None:
    """The current period's invoice is the newest (by `created`) that pays for a period, or the
    latest one the subscription names while that one is unknown here (it may be a renewal)."""
    old = invoice("in_b", "paid", T - 100, billing_reason="subscription_create", charge="ch_b")
    renewal = invoice("in_a", "paid", T - 10, charge="ch_a")
    refund_old = obj("charge", "ch_b", T + 10, refunded=True)
    assert derived(sub(latest_invoice="in_a"), old, renewal, refund_old)["status"] == "active"
    refund_named = obj("charge", "ch_9", T + 10, refunded=True, invoice="in_9")
    assert derived(sub(latest_invoice="in_9"), old, refund_named)["status"] == "revoked"
    assert derived(sub(latest_invoice="in_9"), old, refund_old)["status"] == "active"


def _period_paid_by(shape: str) -> list[StripeObject]:
    """The first invoice of sub_1, paid as each API shape records it."""
    paid = {
        "invoice.charge": ({"charge": "ch_1", "payments": []}, []),
        "invoice.payment_intent": ({"payment_intent": "pi_1"}, []),
        "invoice.payments": ({"charge": None, "payments": ["pi_1"]}, []),
        "invoice_payment.payment_intent": (
            {},
            [obj("invoice_payment", "inpay_1", T, invoice="in_1", payment_intent="pi_1", charge=None)],
        ),
        "invoice_payment.charge": (
            {},
            [obj("invoice_payment", "inpay_1", T, invoice="in_1", payment_intent=None, charge="ch_1")],
        ),
        "charge.invoice": ({}, [obj("charge", "ch_1", T, invoice="in_1", refunded=False, payment_intent=None)]),
        "invoice.charge and invoice_payment": (
            {"charge": "ch_1"},
            [obj("invoice_payment", "inpay_2", T, invoice="in_1", payment_intent="pi_2", charge=None)],
        ),
    }[shape]
    return [invoice("in_1", "paid", T - 10, billing_reason="subscription_create", **paid[0]), *paid[1]]


SHAPES_OF_A_PAYMENT = [
    "invoice.charge",
    "invoice.payment_intent",
    "invoice.payments",
    "invoice_payment.payment_intent",
    "invoice_payment.charge",
    "charge.invoice",
    "invoice.charge and invoice_payment",
]


@pytest.mark.parametrize("shape", SHAPES_OF_A_PAYMENT)
def test_a_refund_or_chargeback_of_the_periods_payment_revokes_it_whichever_shape_records_the_payment(
    shape: str,
) -> None:
    """The invoice's charge and payment intent (API versions before 2025-03-31 basil), its payments,
    or an invoice_payment (basil and after, https://docs.stripe.com/changelog/basil/2025-03-31/add-support-for-multiple-partial-payments-on-invoices),
    or the charge's invoice: a full refund of that payment, or a chargeback of it, revokes the period."""
    rows = _period_paid_by(shape)
    assert derived(sub(latest_invoice="in_1"), *rows)["status"] == "active"
    charge_id = "pi_1" if "payment_intent" in shape or shape == "invoice.payments" else "ch_1"
    if charge_id == "ch_1":
        back = obj("charge", "ch_1", T + 10, invoice=None, refunded=True, payment_intent=None)
        if shape == "charge.invoice":
            back = replace(back, state={**back.state, "invoice": "in_1"})
        rows = [r for r in rows if r.id != "ch_1"] + [back]
    else:
        dispute = {"status": "needs_response", "reason": "product_not_received", "case_type": "chargeback"}
        rows = [*rows, obj("dispute", "dp_1", T + 10, charge=None, payment_intent="pi_1", **dispute)]
    assert derived(sub(latest_invoice="in_1"), *rows)["status"] == "revoked"


def test_a_payment_of_another_invoice_revokes_nothing_of_this_period() -> None:
    rows = [
        invoice("in_1", "paid", T - 10, billing_reason="subscription_create"),
        obj("invoice_payment", "inpay_0", T, invoice="in_0", payment_intent="pi_0", charge="ch_0"),
        obj("charge", "ch_0", T + 10, invoice="in_0", refunded=True, payment_intent="pi_0"),
    ]
    assert derived(sub(latest_invoice="in_1"), *rows)["status"] == "active"


@pytest.mark.parametrize(
    "paid",
    [
        [invoice("in_1", subscription=None, payment_intent="pi_1")],
        [invoice("in_1", subscription=None, payments=["pi_1"])],
        [obj("invoice_payment", "inpay_1", invoice="in_1", payment_intent="pi_1")],
        [
            invoice("in_1", subscription=None, payment_intent="pi_1"),
            invoice("in_2", subscription=None, payment_intent="pi_2"),
        ],
        [
            invoice("in_1", subscription=None, payment_intent="pi_1"),
            obj("invoice_payment", "inpay_2", invoice="in_2", payment_intent="pi_2"),
        ],
    ],
    ids=["invoice.payment_intent", "invoice.payments", "invoice_payment", "two invoices", "both shapes"],
)
def test_a_payment_intent_that_paid_an_invoice_is_no_purchase_of_its_own(paid: list[StripeObject]) -> None:
    """An invoice's payment intent may name the license in its metadata too: the invoice accounts for
    it (whichever API shape records the payment), it is not also a one-time purchase."""
    intents = {p for row in paid for p in (row.state.get("payment_intent"), *row.state.get("payments", ())) if p}
    state = derived(*paid, *map(bought, sorted(intents)))
    assert (state["status"], state["entitled"]) == ("none", False)


def test_a_succeeded_refund_keeps_a_refunded_charge_revoked_and_a_failed_one_restores_it() -> None:
    """A refund that did not go through restores the payment
    (https://docs.stripe.com/refunds#failed-refunds), even reported in the same second as the charge's
    refund; a refund that went through (or one without a charge) changes nothing; the newest
    failed refund of a charge counts."""
    charge = obj("charge", "ch_1", T + 20, refunded=True, payment_intent="pi_1")
    assert derived(bought(), charge)["status"] == "revoked"
    succeeded = obj("refund", "re_1", T + 30, status="succeeded", charge="ch_1", payment_intent="pi_1")
    assert derived(bought(), charge, succeeded)["status"] == "revoked"
    unattached = obj("refund", "re_2", T + 30, status="failed", charge=None, payment_intent="pi_1")
    assert derived(bought(), charge, unattached)["status"] == "revoked"
    same_second = obj("refund", "re_1", T + 20, status="failed", charge="ch_1", payment_intent="pi_1")
    assert derived(bought(), charge, same_second)["status"] == "paid"
    newest = obj("refund", "re_2", T + 30, status="canceled", charge="ch_1")
    oldest = obj("refund", "re_1", T + 10, status="failed", charge="ch_1")
    assert derived(bought(), charge, newest, oldest)["status"] == "paid"


def test_every_refunded_or_disputed_payment_is_revoked_not_only_the_last() -> None:
    """Two purchases whose money went back, by refund or by chargeback, naming their charge or
    their payment intent: each is revoked."""
    refunded = [
        obj("charge", "ch_1", T + 10, refunded=True, payment_intent="pi_1"),
        obj("charge", "ch_2", T + 10, refunded=True, payment_intent="pi_2"),
    ]
    assert derived(bought("pi_1"), bought("pi_2"), *refunded)["status"] == "revoked"
    back = {"status": "needs_response", "reason": "product_not_received", "case_type": "chargeback"}
    disputed = [
        obj("dispute", "dp_1", T + 10, charge="ch_1", payment_intent="pi_1", **back),
        obj("dispute", "dp_2", T + 10, charge="ch_2", payment_intent="pi_2", **back),
    ]
    rules = LicenseRules(["active"], dispute_revokes="period")
    assert derived(bought("pi_1"), bought("pi_2"), *disputed, rules=rules)["status"] == "revoked"
    by_charge = obj("dispute", "dp_3", T + 10, charge="ch_3", payment_intent=None, **back)
    state = derived(sub(latest_invoice="in_1"), invoice("in_1", charge="ch_3"), by_charge, rules=rules)
    assert state["status"] == "revoked"


def test_a_subscription_known_only_from_its_session_or_invoice_counts_until_its_own_events_arrive() -> None:
    """Checkout creates the subscription `incomplete` and activates it on payment: until its own
    events arrive, the session (or an invoice) stands for it, with the session's first invoice
    as its latest and the customer as the session's."""
    session = obj("checkout", "cs_1", T, mode="subscription", subscription="sub_1", status="paid", invoice="in_1")
    state = derived(session, obj("entitlements", "ent_1", T, features=["pro"]))
    assert (state["status"], state["subscription"], state["customer"], state["features"]) == (
        "active",
        "sub_1",
        CUS,
        ["pro"],
    )
    unpaid = derived(replace(session, state={**session.state, "status": "unpaid"}))
    assert (unpaid["status"], unpaid["subscription"]) == ("incomplete", "sub_1")
    refunded = obj("charge", "ch_1", T + 10, refunded=True, invoice="in_1")
    assert derived(session, refunded)["status"] == "revoked"
    one_time = derived(obj("checkout", "cs_2", T, mode="payment", subscription=None, status="paid"))
    assert (one_time["status"], one_time["kind"], one_time["subscription"]) == ("paid", "perpetual", None)
    by_invoice = derived(invoice("in_1", "open"), obj("entitlements", "ent_1", T, features=["pro"]))
    assert (by_invoice["status"], by_invoice["subscription"], by_invoice["kind"]) == (
        "incomplete",
        "sub_1",
        "subscription",
    )
    paid_invoice = derived(invoice("in_1", "paid"), obj("entitlements", "ent_1", T, features=["pro"]))
    assert (paid_invoice["status"], paid_invoice["features"]) == ("active", ["pro"])


def test_a_subscriptions_own_row_outranks_its_checkout_session() -> None:
    session = obj("checkout", "cs_1", T + 10, mode="subscription", subscription="sub_1", status="paid")
    assert derived(sub("canceled", T), session)["status"] == "canceled"


@pytest.mark.parametrize(
    ("outcome", "status"),
    [
        ("paid", "paid"),
        ("failed", "payment_failed"),
        ("expired", "expired"),
        ("unpaid", "incomplete"),
        (None, "incomplete"),
    ],
)
def test_a_one_time_checkout_is_a_purchase_paid_failed_expired_or_pending(outcome: str | None, status: str) -> None:
    session = obj("checkout", "cs_1", mode="payment", status=outcome, payment_intent="pi_1")
    state = derived(obj("checkout", "cs_0", T - 10, mode="setup", status="paid"), session)
    assert (state["status"], state["kind"], state["entitled"], state["customer"]) == (
        status,
        "perpetual",
        status == "paid",
        CUS,
    )


def test_a_one_time_checkout_is_revoked_when_its_payment_goes_back_and_keeps_its_features_until_then() -> None:
    session = obj("checkout", "cs_1", mode="payment", status="paid", payment_intent="pi_1")
    summary = obj("entitlements", "ent_1", T, features=["pro"])
    assert derived(session, summary)["features"] == ["pro"]
    refunded = obj("charge", "ch_1", T + 10, refunded=True, payment_intent="pi_1")
    assert derived(session, refunded)["status"] == "revoked"
    assert derived(session, obj("charge", "ch_2", T + 10, refunded=True, payment_intent="pi_2"))["status"] == "paid"


def test_a_one_time_checkout_grants_only_when_its_line_items_are_read_and_listed() -> None:
    """LICENSE_PRODUCTS for one-time purchases: judged by the session's line items, read from Stripe's API."""
    rules = LicenseRules(["active"], ["perpetual:price_life"])
    session = obj("checkout", "cs_1", T, mode="payment", status="paid")
    assert derived(session, rules=rules)["status"] == "none"  # line items not read
    items = obj("line_items", line_items_id("cs_1"), products=["price_life"])
    unlisted = obj("checkout", "cs_0", T - 10, mode="payment", status="paid")
    assert derived(unlisted, session, items, rules=rules)["status"] == "paid"
    addon = obj("line_items", line_items_id("cs_1"), products=["price_addon"])
    assert derived(session, addon, rules=rules)["status"] == "none"
    elsewhere = obj("line_items", line_items_id("cs_other"), products=["price_life"])
    assert derived(session, elsewhere, rules=rules)["status"] == "none"


def test_a_payment_intent_purchase_is_paid_once_succeeded_and_only_for_listed_products() -> None:
    """A `succeeded` intent is paid (https://docs.stripe.com/payments/paymentintents/lifecycle); one
    that paid an invoice, or whose metadata names no purchase, is none."""
    state = derived(bought(), obj("entitlements", "ent_1", T, features=["pro"]))
    assert (state["status"], state["kind"], state["entitled"], state["features"]) == (
        "paid",
        "perpetual",
        True,
        ["pro"],
    )
    assert derived(bought(outcome="processing"))["status"] == "incomplete"
    assert derived(bought(invoice="in_1"))["status"] == "none"
    assert derived(bought("pi_0", purchase=False), bought())["status"] == "paid"
    rules = LicenseRules(["active"], ["perpetual:price_life"])
    assert derived(bought("pi_0", products=["price_other"]), bought(products=["price_life"]), rules=rules)["entitled"]
    assert derived(bought(products=["price_other"]), rules=rules)["status"] == "none"


def test_features_partial_only_for_the_entitling_customers_summary() -> None:
    """A summary lists at most 10 entitlements (`has_more`,
    https://docs.stripe.com/api/entitlements/active-entitlement-summary): partial only when the rest of
    an entitling customer's could not be read."""
    partial = obj("entitlements", "ent_1", T, features=["pro"], partial=True)
    assert derived(sub(), partial)["features_partial"] is True
    assert derived(sub(), replace(partial, state={"features": ["pro"], "partial": False}))["features_partial"] is False
    theirs = replace(partial, id="ent_2", customer="cus_other")
    state = derived(sub(), theirs)
    assert (state["features"], state["features_partial"]) == ([], False)


def test_the_licenses_customer_is_the_newest_named_by_a_session_or_subscription() -> None:
    rows = [
        sub("canceled", T, "sub_a"),
        replace(obj("checkout", "cs_1", T + 20, mode="payment", status="paid"), customer="cus_b"),
        replace(sub("canceled", T + 10, "sub_c"), customer="cus_c"),
        replace(invoice("in_1", version=T + 30, subscription="sub_a"), customer="cus_z"),
    ]
    assert derived(*rows)["customer"] == "cus_b"
    assert derived(*rows, replace(sub("canceled", T + 40, "sub_d"), customer="cus_d"))["customer"] == "cus_d"


def test_the_newest_open_action_notice_of_a_running_subscription_is_shown() -> None:
    """`invoice.payment_action_required` (the customer must authenticate,
    https://docs.stripe.com/billing/subscriptions/overview) lasts until its invoice is settled or its
    subscription ends (canceled, or incomplete_expired where Stripe voids the invoice), or its
    customer is deleted; of several, the newest unsettled one."""

    def notice(invoice_id: str, version: int, subscription: str = "sub_1") -> StripeObject:
        url = f"https://invoice.stripe.com/i/{invoice_id}"
        return obj("action_notice", f"{invoice_id}#payment_action_required", version, invoice=invoice_id,
                   subscription=subscription, hosted_invoice_url=url)  # fmt: skip

    older, newer = notice("in_1", T), notice("in_2", T + 10)
    shown = derived(sub(), older, newer)["notice"]
    assert shown == {
        "type": "payment_action_required",
        "invoice": "in_2",
        "hosted_invoice_url": "https://invoice.stripe.com/i/in_2",
    }
    assert derived(sub(), newer, older)["notice"]["invoice"] == "in_2"
    paid = invoice("in_2", "paid", T + 20)
    assert derived(sub(), older, newer, paid)["notice"]["invoice"] == "in_1"
    assert derived(notice("in_3", T, subscription="sub_unknown"))["notice"]["invoice"] == "in_3"
    ended = notice("in_4", T + 30, subscription="sub_2")
    assert derived(sub(), sub("canceled", T, "sub_2"), older, ended)["notice"]["invoice"] == "in_1"
    assert derived(sub("incomplete_expired"), older)["notice"] is None
    assert derived(sub("active", T), older, obj("customer", CUS, T, deleted=True))["notice"] is None


def test_the_trial_notice_is_the_newest_of_a_subscription_still_trialing_to_the_same_end() -> None:
    """`customer.subscription.trial_will_end` (https://docs.stripe.com/billing/subscriptions/trials):
    gone once the trial ends or is extended; of two trialing subscriptions, the newer notice."""
    end = T + 3 * 86400

    def notice(sub_id: str, version: int) -> StripeObject:
        return obj("trial_notice", f"{sub_id}#trial_will_end", version, subscription=sub_id, trial_end=end)

    a, b = sub("trialing", T, "sub_a", trial_end=end), sub("trialing", T, "sub_b", trial_end=end)
    expected = {"type": "trial_will_end", "subscription": "sub_b", "trial_end": iso(end)}
    assert derived(a, b, notice("sub_a", T), notice("sub_b", T + 10))["notice"] == expected
    assert derived(a, b, notice("sub_b", T + 10), notice("sub_a", T))["notice"] == expected
    assert derived(a, notice("sub_unknown", T + 10))["notice"] is None


def test_a_license_revoked_by_a_dispute_names_the_purchase_it_revoked_not_a_subscription_beside_it() -> None:
    """DISPUTE_REVOKES=license revokes what entitles; a subscription that entitles nothing (unpaid)
    is left as it is, so the license shows the revoked purchase, even beside a newer subscription."""
    lost = {"status": "lost", "reason": "product_not_received", "case_type": "chargeback"}
    dispute = obj("dispute", "dp_1", T + 5, charge="ch_1", payment_intent="pi_1", **lost)
    state = derived(bought(), dispute, sub("unpaid", T + 10))
    assert (state["status"], state["kind"], state["subscription"], state["entitled"]) == (
        "revoked",
        "perpetual",
        None,
        False,
    )


def test_the_features_are_those_of_every_entitling_customer_not_deleted() -> None:
    """Stripe keeps active entitlements per customer (https://docs.stripe.com/billing/entitlements):
    a license entitled by purchases of two customers lists the features of both; a customer that
    entitles nothing here, or that was deleted, adds none."""
    other = obj("entitlements", "ent_0", T, "cus_other", features=["other"])
    mine = obj("entitlements", "ent_1", T, features=["pro"])
    second = obj("entitlements", "ent_2", T, "cus_2", features=["team"])
    purchase_2 = replace(bought("pi_2"), customer="cus_2")
    assert derived(bought(), purchase_2, other, mine, second)["features"] == ["pro", "team"]
    gone = obj("customer", CUS, T, deleted=True)
    assert derived(bought(), purchase_2, gone, mine, second)["features"] == ["team"]
