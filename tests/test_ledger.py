"""The ledger's rules, pure (broker.stripe_ledger: ledger, objects, binding): each Stripe
behaviour of docs/stripe.md, and the order-independence properties."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
import sqlalchemy as sa
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.storage.licenses import initial_state
from broker.storage.schema import metadata, stripe_events, stripe_links, stripe_objects
from broker.stripe_ledger.binding import TAKEOVER, MemoryLedger, resolve
from broker.stripe_ledger.fill import fill_ledger
from broker.stripe_ledger.ledger import FETCHED_RANK, LicenseRules, StripeObject, line_items_id, merge
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
