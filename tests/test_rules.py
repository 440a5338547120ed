from __future__ import annotations

from broker.licenses import initial_state
from webhook.rules import StripeEventRouter
from webhook.samples import SampleEvents

router = StripeEventRouter(["trialing", "active", "past_due"])
T = 1_800_000_000


def apply(event: dict, state=None, last: int = 0):  # type: ignore[no-untyped-def]
    change = router.route(event)
    assert change is not None
    return change, router.apply(change, state or initial_state(), event["created"], last)


def test_a_paid_subscription_checkout_unlocks_and_links_customer_and_subscription() -> None:
    sample = SampleEvents("lic_a")
    change, state = apply(sample.checkout_completed(T))
    assert change.license_id == "lic_a"
    assert (change.customer, change.subscription) == (sample.customer, sample.subscription)
    assert state is not None and state["status"] == "active" and state["entitled"] is True
    assert state["kind"] == "subscription"


def test_a_one_time_payment_checkout_is_a_perpetual_license() -> None:
    event = SampleEvents("lic_b").checkout_completed(T)
    event["data"]["object"].update(mode="payment", subscription=None)
    _, state = apply(event)
    assert state is not None and (state["status"], state["kind"], state["entitled"]) == ("paid", "perpetual", True)


def test_an_unpaid_checkout_does_not_unlock() -> None:
    event = SampleEvents("lic_c").checkout_completed(T)
    event["data"]["object"]["payment_status"] = "unpaid"
    _, state = apply(event)
    assert state is not None and state["entitled"] is False and state["status"] == "none"


def test_client_reference_id_names_the_license_without_metadata() -> None:
    event = SampleEvents("lic_d").checkout_completed(T)
    event["data"]["object"]["metadata"] = {}
    change, _ = apply(event)
    assert change.license_id == "lic_d"


def test_subscription_status_is_mirrored_and_entitlement_follows_the_setting() -> None:
    sample = SampleEvents("lic_e")
    for status, entitled in [("trialing", True), ("active", True), ("past_due", True), ("unpaid", False),
                             ("canceled", False), ("incomplete", False)]:  # fmt: skip
        _, state = apply(sample.subscription_event("customer.subscription.updated", status, T))
        assert state is not None and (state["status"], state["entitled"]) == (status, entitled)
    strict = StripeEventRouter(["active"])
    event = sample.subscription_event("customer.subscription.updated", "past_due", T)
    change = strict.route(event)
    assert change is not None
    state = strict.apply(change, initial_state(), T, 0)
    assert state is not None and state["entitled"] is False


def test_the_period_end_is_read_from_the_items_or_from_a_legacy_subscription() -> None:
    sample = SampleEvents("lic_f")
    event = sample.subscription_event("customer.subscription.updated", "active", T)
    _, state = apply(event)
    assert state is not None and state["current_period_end"] == "2027-02-14T08:00:00+00:00"
    legacy = sample.subscription_event("customer.subscription.updated", "active", T)
    obj = legacy["data"]["object"]
    obj["current_period_end"] = obj["items"]["data"][0].pop("current_period_end")
    _, state = apply(legacy)
    assert state is not None and state["current_period_end"] == "2027-02-14T08:00:00+00:00"


def test_an_event_older_than_the_last_change_is_stale_and_a_tie_applies() -> None:
    sample = SampleEvents("lic_g")
    event = sample.subscription_event("customer.subscription.updated", "past_due", T - 1)
    _, state = apply(event, last=T)
    assert state is None
    tie = sample.subscription_event("customer.subscription.updated", "past_due", T)
    _, state = apply(tie, last=T)
    assert state is not None and state["status"] == "past_due"


def test_event_types_the_broker_does_not_use_route_nowhere() -> None:
    event = SampleEvents("lic_h").envelope("customer.created", {"id": "cus_1", "object": "customer"}, T)
    assert router.route(event) is None
