from __future__ import annotations

import copy
import random
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from broker.licenses import LicenseState, initial_state
from webhook.rules import StripeEventRouter
from webhook.samples import SampleEvents

router = StripeEventRouter(["trialing", "active", "past_due"])
T = 1_800_000_000
Event = dict[str, Any]


def apply(event: Event, state: LicenseState | None = None) -> LicenseState | None:
    change = router.route(event)
    assert change is not None
    return router.apply(change, state or initial_state(), event["created"])


def fold(events: list[Event], license_id: str) -> LicenseState:
    """What webhook.ingest does for one license, in memory: an event that names neither the license
    nor an id already linked to it waits (pending) until one is, then applies with the events it
    links, in `created` order; a duplicate event id is dropped."""
    state, linked, pending, seen = initial_state(), set[str](), list[Event](), set[str]()

    def linkable(event: Event) -> bool:
        change = router.route(event)
        return change is not None and (change.license_id == license_id or bool(linked & set(change.keys)))

    for event in events:
        if event["id"] in seen:
            continue
        seen.add(event["id"])
        if not linkable(event):
            pending.append(event)
            continue
        batch = [event]
        while True:
            change = router.route(batch[-1])
            assert change is not None
            linked |= set(change.keys)
            released = [e for e in pending if linkable(e)]
            if not released:
                break
            pending = [e for e in pending if e not in released]
            batch += released
        for each in sorted(batch, key=lambda e: (e["created"], e["id"])):
            change = router.route(each)
            assert change is not None
            state = router.apply(change, state, each["created"]) or state
    return state


def visible(state: LicenseState) -> dict[str, Any]:
    return {k: v for k, v in state.items() if k != "versions"}


# --- purchase -------------------------------------------------------------------------------------


def test_a_paid_subscription_checkout_unlocks_and_links_customer_and_subscription() -> None:
    sample = SampleEvents("lic_a")
    change = router.route(sample.checkout_completed(T))
    assert change is not None and change.license_id == "lic_a"
    assert (change.customer, change.subscription) == (sample.customer, sample.subscription)
    state = apply(sample.checkout_completed(T))
    assert state is not None and (state["status"], state["entitled"], state["kind"]) == ("active", True, "subscription")
    assert (state["customer"], state["subscription"]) == (sample.customer, sample.subscription)


def test_a_one_time_payment_checkout_is_a_perpetual_license() -> None:
    event = SampleEvents("lic_b").checkout_completed(T)
    event["data"]["object"].update(mode="payment", subscription=None, payment_intent="pi_once")
    change = router.route(event)
    assert change is not None and change.payment_intent == "pi_once"
    state = apply(event)
    assert state is not None and (state["status"], state["kind"], state["entitled"]) == ("paid", "perpetual", True)


def test_an_unpaid_checkout_waits_for_the_async_payment_to_succeed_or_fail() -> None:
    sample = SampleEvents("lic_c")
    for mode, waiting, failed in [("payment", "incomplete", "payment_failed"), ("subscription", "incomplete", None)]:
        unpaid = sample.checkout_completed(T)
        unpaid["data"]["object"].update(mode=mode, payment_status="unpaid")
        state = apply(unpaid)
        assert state is not None and (state["status"], state["entitled"]) == (waiting, False)
        succeeded = copy.deepcopy(unpaid)
        succeeded.update(type="checkout.session.async_payment_succeeded", created=T + 60)
        after = apply(succeeded, state)
        assert after is not None and after["entitled"] is True
        lost = copy.deepcopy(unpaid)
        lost.update(type="checkout.session.async_payment_failed", created=T + 60)
        after = apply(lost, state)
        assert after is not None and after["entitled"] is False
        if failed:
            assert after["status"] == failed


def test_client_reference_id_names_the_license_without_metadata() -> None:
    event = SampleEvents("lic_d").checkout_completed(T)
    event["data"]["object"]["metadata"] = {}
    change = router.route(event)
    assert change is not None and change.license_id == "lic_d"


def test_checkout_metadata_wins_over_client_reference_id() -> None:
    event = SampleEvents("lic_d2").checkout_completed(T)
    event["data"]["object"]["client_reference_id"] = "usr_123"
    change = router.route(event)
    assert change is not None and change.license_id == "lic_d2"


# --- subscription life ----------------------------------------------------------------------------


def test_subscription_status_is_mirrored_and_entitlement_follows_the_setting() -> None:
    sample = SampleEvents("lic_e")
    for status, entitled in [("trialing", True), ("active", True), ("past_due", True), ("unpaid", False),
                             ("canceled", False), ("incomplete", False), ("paused", False)]:  # fmt: skip
        state = apply(sample.subscription_event("customer.subscription.updated", status, T))
        assert state is not None and (state["status"], state["entitled"]) == (status, entitled)
    strict = StripeEventRouter(["active"])
    change = strict.route(sample.subscription_event("customer.subscription.updated", "past_due", T))
    assert change is not None
    state = strict.apply(change, initial_state(), T)
    assert state is not None and state["entitled"] is False


def test_the_period_end_is_read_from_the_items_or_from_a_legacy_subscription() -> None:
    sample = SampleEvents("lic_f")
    state = apply(sample.subscription_event("customer.subscription.updated", "active", T))
    assert state is not None and state["current_period_end"] == "2027-02-14T08:00:00+00:00"
    legacy = sample.subscription_event("customer.subscription.updated", "active", T)
    obj = legacy["data"]["object"]
    obj["current_period_end"] = obj["items"]["data"][0].pop("current_period_end")
    state = apply(legacy)
    assert state is not None and state["current_period_end"] == "2027-02-14T08:00:00+00:00"


def test_cancel_at_period_end_reaches_the_app_and_keeps_it_unlocked_until_deleted() -> None:
    sample = SampleEvents("lic_g")
    ending = sample.subscription_event("customer.subscription.updated", "active", T)
    ending["data"]["object"]["cancel_at_period_end"] = True
    state = apply(ending)
    assert state is not None and (state["cancel_at_period_end"], state["entitled"]) == (True, True)
    state = apply(sample.subscription_event("customer.subscription.deleted", "canceled", T + 10), state)
    assert state is not None and (state["status"], state["entitled"]) == ("canceled", False)


def test_trial_will_end_is_a_notice_that_lasts_while_the_trial_does() -> None:
    sample = SampleEvents("lic_h")
    warning = sample.subscription_event("customer.subscription.trial_will_end", "trialing", T)
    warning["data"]["object"]["trial_end"] = T + 3 * 86400
    state = apply(warning)
    assert state is not None and state["status"] == "trialing"
    assert state.get("notice") == {
        "type": "trial_will_end",
        "trial_end": "2027-01-18T08:00:00+00:00",
        "at": "2027-01-15T08:00:00+00:00",
    }
    state = apply(sample.subscription_event("customer.subscription.updated", "active", T + 3 * 86400), state)
    assert state is not None and state.get("notice") is None


# --- invoices -------------------------------------------------------------------------------------


def legacy_invoice(event: Event) -> Event:
    """The same invoice as an account on an API version before 2025-03-31 receives it."""
    legacy = copy.deepcopy(event)
    obj = legacy["data"]["object"]
    details = obj.pop("parent")["subscription_details"]
    obj.update(subscription=details["subscription"], subscription_details={"metadata": details["metadata"]})
    obj.update(charge="ch_legacy", payment_intent="pi_legacy")
    return legacy


def test_an_invoice_names_its_subscription_and_license_in_either_api_shape() -> None:
    sample = SampleEvents("lic_i")
    current = sample.invoice_event("invoice.paid", T)
    for event in (current, legacy_invoice(current)):
        change = router.route(event)
        assert change is not None
        assert (change.license_id, change.subscription, change.customer) == (
            "lic_i",
            sample.subscription,
            sample.customer,
        )
    change = router.route(legacy_invoice(current))
    assert change is not None and change.payments == ("ch_legacy", "pi_legacy")


def test_an_invoice_without_a_subscription_routes_nowhere() -> None:
    event = SampleEvents("lic_j").invoice_event("invoice.paid", T)
    del event["data"]["object"]["parent"]
    assert router.route(event) is None


def test_a_newer_invoice_moves_the_status_the_way_stripe_will_and_an_older_one_does_not() -> None:
    sample = SampleEvents("lic_k")
    active = apply(sample.subscription_event("customer.subscription.updated", "active", T))
    failed = apply(sample.invoice_event("invoice.payment_failed", T + 5), active)
    assert failed is not None and failed["status"] == "past_due"
    assert failed.get("last_invoice", {}) and failed["last_invoice"]["outcome"] == "payment_failed"  # type: ignore[index]
    past_due = apply(sample.subscription_event("customer.subscription.updated", "past_due", T + 6), failed)
    paid = apply(sample.invoice_event("invoice.paid", T + 100), past_due)
    assert paid is not None and (paid["status"], paid["entitled"]) == ("active", True)
    old_failure = apply(sample.invoice_event("invoice.payment_failed", T - 5), active)
    assert old_failure is not None and old_failure["status"] == "active"
    canceled = apply(sample.subscription_event("customer.subscription.deleted", "canceled", T))
    late_paid = apply(sample.invoice_event("invoice.paid", T + 5), canceled)
    assert late_paid is not None and late_paid["status"] == "canceled"


# --- money back, entitlements ---------------------------------------------------------------------


def test_a_full_refund_revokes_and_a_partial_one_does_not() -> None:
    sample = SampleEvents("lic_l")
    paid = apply(sample.checkout_completed(T))
    full = apply(sample.charge_refunded(T + 60), paid)
    assert full is not None and (full["status"], full["entitled"]) == ("revoked", False)
    partial = apply(sample.charge_refunded(T + 60, amount=500), paid)
    assert partial is not None and visible(partial) == visible(paid)  # type: ignore[arg-type]


def test_a_dispute_revokes_and_names_only_the_charge() -> None:
    paid = apply(SampleEvents("lic_m").checkout_completed(T))
    dispute = SampleEvents("lic_m").envelope(
        "charge.dispute.created",
        {"id": "du_1", "object": "dispute", "charge": "ch_1", "payment_intent": "pi_1", "status": "needs_response"},
        T + 60,
    )
    change = router.route(dispute)
    assert change is not None and (change.license_id, change.customer, change.payments) == (
        None,
        None,
        ("ch_1", "pi_1"),
    )
    state = apply(dispute, paid)
    assert state is not None and (state["status"], state["entitled"]) == ("revoked", False)


def test_a_newer_payment_lifts_a_revocation_and_a_subscription_update_does_not() -> None:
    sample = SampleEvents("lic_n")
    revoked = apply(sample.charge_refunded(T + 60), apply(sample.checkout_completed(T)))
    touched = apply(sample.subscription_event("customer.subscription.updated", "active", T + 120), revoked)
    assert touched is not None and touched["status"] == "revoked"
    repaid = apply(sample.invoice_event("invoice.paid", T + 180), touched)
    assert repaid is not None and (repaid["status"], repaid["entitled"]) == ("active", True)


def test_the_entitlement_summary_sets_the_feature_list() -> None:
    sample = SampleEvents("lic_o")
    summary = sample.envelope(
        "entitlements.active_entitlement_summary.updated",
        {
            "object": "entitlements.active_entitlement_summary",
            "customer": sample.customer,
            "entitlements": {"object": "list", "data": [{"lookup_key": "export"}, {"lookup_key": "desktop_pro"}]},
        },
        T,
    )
    state = apply(summary)
    assert state is not None and state["features"] == ["desktop_pro", "export"]


# --- ordering -------------------------------------------------------------------------------------


def test_an_event_older_than_every_facet_it_touches_is_stale() -> None:
    sample = SampleEvents("lic_p")
    canceled = apply(sample.subscription_event("customer.subscription.deleted", "canceled", T))
    assert apply(sample.subscription_event("customer.subscription.updated", "active", T - 1), canceled) is None


def test_an_older_event_still_sets_a_facet_no_newer_event_has_set() -> None:
    sample = SampleEvents("lic_q")
    revoked = apply(sample.charge_refunded(T + 60), apply(sample.checkout_completed(T + 30)))
    summary = sample.envelope(
        "entitlements.active_entitlement_summary.updated",
        {"customer": sample.customer, "entitlements": {"data": [{"lookup_key": "desktop_pro"}]}},
        T,
    )
    state = apply(summary, revoked)
    assert state is not None and state["features"] == ["desktop_pro"] and state["status"] == "revoked"


def test_a_tie_within_one_second_goes_to_the_later_stage_in_either_arrival_order() -> None:
    sample = SampleEvents("lic_r")
    active = sample.subscription_event("customer.subscription.updated", "active", T)
    canceled = sample.subscription_event("customer.subscription.deleted", "canceled", T)
    one = apply(canceled, apply(active))
    other = apply(active, apply(canceled))
    assert one is not None and one["status"] == "canceled"
    assert other is not None and visible(other) == visible(one)


def test_event_types_the_broker_does_not_use_route_nowhere() -> None:
    sample = SampleEvents("lic_s")
    assert router.route(sample.envelope("customer.created", {"id": "cus_1", "object": "customer"}, T)) is None
    setup = sample.checkout_completed(T)
    setup["data"]["object"]["mode"] = "setup"
    assert router.route(setup) is None


# --- the permutation property ---------------------------------------------------------------------


def full_life(license_id: str) -> list[Event]:
    """Purchase with a trial, payment failure, recovery, cancellation and refund, in Stripe's order."""
    s = SampleEvents(license_id)
    t = T
    checkout = s.checkout_completed(t + 2)
    checkout["data"]["object"]["payment_status"] = "no_payment_required"
    checkout["data"]["object"]["metadata"] = {}  # only client_reference_id: the subscription carries it
    created = s.subscription_event("customer.subscription.created", "trialing", t)
    created["data"]["object"]["metadata"] = {}
    summary = s.envelope(
        "entitlements.active_entitlement_summary.updated",
        {"customer": s.customer, "entitlements": {"data": [{"lookup_key": "desktop_pro"}]}},
        t + 1,
    )
    trial_ends = s.subscription_event("customer.subscription.trial_will_end", "trialing", t + 11 * 86400)
    ending = s.subscription_event("customer.subscription.updated", "active", t + 60 * 86400)
    ending["data"]["object"]["cancel_at_period_end"] = True
    deleted = s.subscription_event("customer.subscription.deleted", "canceled", t + 74 * 86400)
    deleted["data"]["object"]["cancel_at_period_end"] = True
    no_features = s.envelope(
        "entitlements.active_entitlement_summary.updated",
        {"customer": s.customer, "entitlements": {"data": []}},
        t + 75 * 86400,
    )
    return [
        created,
        s.invoice_event("invoice.paid", t + 1),
        summary,
        checkout,
        trial_ends,
        s.subscription_event("customer.subscription.updated", "active", t + 14 * 86400),
        s.charge_succeeded(t + 14 * 86400 + 1),
        s.invoice_event("invoice.paid", t + 14 * 86400 + 1),
        s.invoice_event("invoice.payment_failed", t + 44 * 86400),
        s.subscription_event("customer.subscription.updated", "past_due", t + 44 * 86400 + 1),
        s.invoice_event("invoice.paid", t + 47 * 86400),
        s.subscription_event("customer.subscription.updated", "active", t + 47 * 86400),
        ending,
        deleted,
        no_features,
        s.charge_refunded(t + 75 * 86400),
    ]


LIFE = full_life("lic_life")


def test_a_full_life_in_stripes_order_ends_revoked_with_its_history_in_the_state() -> None:
    state = fold(LIFE, "lic_life")
    assert (state["status"], state["entitled"], state["kind"]) == ("revoked", False, "subscription")
    assert state.get("subscription_status") == "canceled" and state["cancel_at_period_end"] is True
    assert state["features"] == [] and state.get("notice") is None


@settings(max_examples=300, deadline=None)
@given(st.permutations(LIFE))
def test_any_delivery_order_of_a_full_life_ends_in_the_state_of_stripes_order(order: list[Event]) -> None:
    assert fold(order, "lic_life") == fold(LIFE, "lic_life")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(LIFE), min_size=1, max_size=30), st.randoms(use_true_random=False))
def test_duplicates_and_any_order_of_any_part_of_a_life_end_in_the_same_state(
    events: list[Event], rng: random.Random
) -> None:
    shuffled = events[:]
    rng.shuffle(shuffled)
    in_stripes_order = sorted(set(map(LIFE.index, events)))
    assert fold(shuffled, "lic_life") == fold([LIFE[i] for i in in_stripes_order], "lic_life")


_STATUSES = ["incomplete", "trialing", "active", "past_due", "unpaid", "paused", "canceled"]


@st.composite
def random_event(draw: st.DrawFn) -> Event:
    s = SampleEvents("lic_rand")
    created = T + draw(st.integers(0, 5))  # a narrow window: many ties
    kind = draw(st.sampled_from(["sub", "invoice.paid", "invoice.payment_failed", "checkout", "refund", "features"]))
    if kind == "sub":
        event = s.subscription_event("customer.subscription.updated", draw(st.sampled_from(_STATUSES)), created)
        event["data"]["object"]["cancel_at_period_end"] = draw(st.booleans())
        return event
    if kind.startswith("invoice"):
        return s.invoice_event(kind, created)
    if kind == "checkout":
        event = s.checkout_completed(created)
        event["data"]["object"]["payment_status"] = draw(st.sampled_from(["paid", "unpaid"]))
        return event
    if kind == "refund":
        return s.charge_refunded(created, amount=draw(st.sampled_from([500, 1200])))
    keys = draw(st.lists(st.sampled_from(["a", "b", "c"]), unique=True))
    return s.envelope(
        "entitlements.active_entitlement_summary.updated",
        {"customer": s.customer, "entitlements": {"data": [{"lookup_key": k} for k in keys]}},
        created,
    )


@settings(max_examples=300, deadline=None)
@given(st.lists(random_event(), min_size=1, max_size=12), st.randoms(use_true_random=False))
def test_any_set_of_events_folds_to_one_state_whatever_the_order_even_within_one_second(
    events: list[Event], rng: random.Random
) -> None:
    shuffled = events[:]
    rng.shuffle(shuffled)
    assert fold(shuffled, "lic_rand") == fold(events, "lic_rand")
