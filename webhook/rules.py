"""Stripe event -> license transition. Pure: no I/O, so every rule is a unit test.

Ordering: Stripe does not order its deliveries and `created` has one-second resolution. An event
older than the one that last changed the license changes nothing ("stale"); an event of the same
second is applied (ties go to arrival order).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from broker.licenses import LicenseState

Transition = Callable[[LicenseState], LicenseState]


@dataclass(frozen=True, slots=True)
class Change:
    """What one Stripe event means for a license."""

    license_id: str | None  # named by the event itself (metadata.license_id, client_reference_id)
    customer: str | None  # ids that later events use to find the license
    subscription: str | None
    transition: Transition


def _iso(timestamp: Any) -> str | None:
    return datetime.fromtimestamp(timestamp, UTC).isoformat() if isinstance(timestamp, int) else None


def _id(value: Any) -> str | None:
    """Stripe fields hold an id, or the expanded object, or null."""
    if isinstance(value, dict):
        value = value.get("id")
    return value if isinstance(value, str) and value else None


def _metadata_license(obj: dict[str, Any]) -> str | None:
    metadata = obj.get("metadata")
    value = metadata.get("license_id") if isinstance(metadata, dict) else None
    return value if isinstance(value, str) and value else None


def _period_end(subscription: dict[str, Any]) -> Any:
    # Since API version 2025-03-31 the period lives on the items; before, on the subscription.
    items = (subscription.get("items") or {}).get("data") or []
    ends: list[int] = [
        item["current_period_end"]
        for item in items
        if isinstance(item, dict) and isinstance(item.get("current_period_end"), int)
    ]
    return max(ends) if ends else subscription.get("current_period_end")


class StripeEventRouter:
    def __init__(self, entitled_statuses: Iterable[str]) -> None:
        self.entitled_statuses = frozenset(entitled_statuses)

    def route(self, event: dict[str, Any]) -> Change | None:
        """The change an event makes, or None for an event type the broker does not use."""
        obj: dict[str, Any] = event["data"]["object"]
        kind: str = event["type"]
        if kind == "checkout.session.completed":
            return self._checkout_completed(obj)
        if kind in (
            "customer.subscription.created",
            "customer.subscription.updated",
            "customer.subscription.deleted",
            "customer.subscription.paused",
            "customer.subscription.resumed",
        ):
            return self._subscription(obj)
        return None

    def apply(self, change: Change, state: LicenseState, created: int, last_created: int) -> LicenseState | None:
        """The state after the change, or None when the event is older than the license's state."""
        if created < last_created:
            return None
        new = change.transition(dict(state))  # type: ignore[arg-type]
        new["entitled"] = self.entitled(new["status"])
        return new

    def entitled(self, status: str) -> bool:
        return status == "paid" or status in self.entitled_statuses

    def _checkout_completed(self, session: dict[str, Any]) -> Change:
        license_id = _metadata_license(session) or session.get("client_reference_id") or None
        mode = session.get("mode")
        paid = session.get("payment_status") in ("paid", "no_payment_required")

        def transition(state: LicenseState) -> LicenseState:
            state["customer"] = _id(session.get("customer")) or state["customer"]
            if mode == "payment":
                state["kind"] = "perpetual"
                if paid:
                    state["status"] = "paid"
            elif mode == "subscription":
                state["kind"] = "subscription"
                state["subscription"] = _id(session.get("subscription")) or state["subscription"]
                # Checkout creates the subscription `incomplete` and activates it on payment;
                # a paid session means it is active, whatever order its events arrive in.
                if paid and state["status"] in ("none", "incomplete"):
                    state["status"] = "active"
            return state

        return Change(license_id, _id(session.get("customer")), _id(session.get("subscription")), transition)

    def _subscription(self, subscription: dict[str, Any]) -> Change:
        def transition(state: LicenseState) -> LicenseState:
            state["kind"] = "subscription"
            state["status"] = str(subscription.get("status") or state["status"])
            state["customer"] = _id(subscription.get("customer")) or state["customer"]
            state["subscription"] = _id(subscription.get("id")) or state["subscription"]
            state["cancel_at_period_end"] = bool(subscription.get("cancel_at_period_end"))
            state["current_period_end"] = _iso(_period_end(subscription))
            state["trial_end"] = _iso(subscription.get("trial_end"))
            return state

        return Change(
            _metadata_license(subscription),
            _id(subscription.get("customer")),
            _id(subscription.get("id")),
            transition,
        )
