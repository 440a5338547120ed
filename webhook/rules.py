"""Stripe event -> license change. Pure: no I/O, so every rule is a unit test.

A license's state is made of facets (the subscription's state, the Checkout purchase, the newest
invoice, the feature list, a notice, a refund or dispute, the customer and subscription ids). An
event proposes values for some facets; `status`, `entitled` and `kind` are derived from the facets.

Ordering: Stripe does not order its deliveries and `created` has one-second resolution. A facet
takes a proposed value only if the event is newer than the one that last set that facet; an older
one changes nothing ("stale" when it loses on every facet it touches). Ties (the same second) do
not depend on arrival: the later lifecycle stage wins (canceled over past_due over active over
trialing over incomplete; paid over failed; dispute over refund), then a fixed order of the values.
Each facet is thus the maximum of (created, rank, value) over the events seen, and the derived
fields are a function of the facets, so any delivery order of one set of events ends in the same
state (tests/test_rules.py checks this property with hypothesis).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from broker.licenses import LicenseState

# facet -> the state keys it owns
FACETS: dict[str, tuple[str, ...]] = {
    "customer": ("customer",),
    "subscription": ("subscription",),
    "subscription_state": ("subscription_status", "cancel_at_period_end", "current_period_end", "trial_end"),
    "purchase": ("payment",),
    "invoice": ("last_invoice",),
    "features": ("features",),
    "notice": ("notice",),
    "revocation": ("revocation",),
}

# Ranks break ties within one second: a later stage of a life wins over an earlier one.
_SUBSCRIPTION_STAGES = ("incomplete", "trialing", "active", "past_due", "unpaid", "paused", "incomplete_expired")
_RANKS: dict[str, dict[str, int]] = {
    "subscription_state": {status: i for i, status in enumerate(_SUBSCRIPTION_STAGES, 1)} | {"canceled": 99},
    "purchase": {"unpaid": 0, "failed": 1, "paid": 2},
    "invoice": {"payment_failed": 0, "paid": 1},
    "revocation": {"refund": 0, "dispute": 1},
}
_RANKED_FIELD = {
    "subscription_state": ("subscription_status", None),
    "purchase": ("payment", "status"),
    "invoice": ("last_invoice", "outcome"),
    "revocation": ("revocation", "reason"),
}
# Subscription statuses that wait for money: a newer paid invoice means the subscription is active.
_AWAITING_PAYMENT = frozenset({"none", "incomplete", "past_due", "unpaid"})

SUBSCRIPTION_EVENTS = frozenset(
    {
        "customer.subscription.created",
        "customer.subscription.updated",
        "customer.subscription.deleted",
        "customer.subscription.paused",
        "customer.subscription.resumed",
        "customer.subscription.trial_will_end",
    }
)
CHECKOUT_EVENTS = {
    "checkout.session.completed": None,  # paid, or unpaid until an async payment settles
    "checkout.session.async_payment_succeeded": "paid",
    "checkout.session.async_payment_failed": "failed",
}
INVOICE_EVENTS = {"invoice.paid": "paid", "invoice.payment_failed": "payment_failed"}
# Every type the router uses; docs/stripe.md lists them for the user to enable.
EVENT_TYPES = tuple(
    sorted(
        {
            *SUBSCRIPTION_EVENTS,
            *CHECKOUT_EVENTS,
            *INVOICE_EVENTS,
            "charge.succeeded",
            "charge.refunded",
            "charge.dispute.created",
            "entitlements.active_entitlement_summary.updated",
        }
    )
)

Facets = Mapping[str, Mapping[str, Any]]


@dataclass(frozen=True, slots=True)
class Change:
    """What one Stripe event means for a license."""

    license_id: str | None  # named by the event itself (metadata.license_id, client_reference_id)
    customer: str | None  # ids that find the license, or that a later event links to one
    subscription: str | None
    charge: str | None = None
    payment_intent: str | None = None
    facets: Facets = field(default_factory=dict)  # facet -> {state key: value}

    @property
    def payments(self) -> tuple[str, ...]:
        return tuple(p for p in (self.charge, self.payment_intent) if p)

    @property
    def keys(self) -> tuple[str, ...]:
        """Every Stripe id this event can be linked by (Stripe ids are unique across types)."""
        return tuple(k for k in (self.customer, self.subscription, self.charge, self.payment_intent) if k)


def _iso(timestamp: Any) -> str | None:
    return datetime.fromtimestamp(timestamp, UTC).isoformat() if isinstance(timestamp, int) else None


def _id(value: Any) -> str | None:
    """Stripe fields hold an id, or the expanded object, or null."""
    if isinstance(value, dict):
        value = value.get("id")
    return value if isinstance(value, str) and value else None


def _license(metadata: Any) -> str | None:
    value = metadata.get("license_id") if isinstance(metadata, dict) else None
    return value if isinstance(value, str) and value else None


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _period_end(subscription: dict[str, Any]) -> Any:
    # Since API version 2025-03-31 the period lives on the items; before, on the subscription.
    items = _dict(subscription.get("items")).get("data") or []
    ends: list[int] = [
        item["current_period_end"]
        for item in items
        if isinstance(item, dict) and isinstance(item.get("current_period_end"), int)
    ]
    return max(ends) if ends else subscription.get("current_period_end")


def _rank(facet: str, value: Mapping[str, Any]) -> int:
    spec = _RANKED_FIELD.get(facet)
    if spec is None:
        return 0
    key, sub = spec
    raw = value.get(key)
    if sub is not None:
        raw = raw.get(sub) if isinstance(raw, dict) else None
    return _RANKS[facet].get(str(raw), 0) if raw is not None else -1


def _order(facet: str, created: int, value: Mapping[str, Any]) -> tuple[int, int, bytes]:
    return created, _rank(facet, value), orjson.dumps(dict(value), option=orjson.OPT_SORT_KEYS)


def _facet_value(state: Mapping[str, Any], facet: str) -> dict[str, Any]:
    return {key: state.get(key) for key in FACETS[facet]}


class StripeEventRouter:
    def __init__(self, entitled_statuses: Iterable[str]) -> None:
        self.entitled_statuses = frozenset(entitled_statuses) - {"revoked"}

    def route(self, event: dict[str, Any]) -> Change | None:
        """The change an event makes, or None for an event type the broker does not use."""
        obj: dict[str, Any] = event["data"]["object"]
        kind: str = event["type"]
        created: int = event["created"]
        if kind in CHECKOUT_EVENTS:
            return self._checkout(obj, CHECKOUT_EVENTS[kind])
        if kind in SUBSCRIPTION_EVENTS:
            return self._subscription(obj, notice=kind == "customer.subscription.trial_will_end", created=created)
        if kind in INVOICE_EVENTS:
            return self._invoice(obj, INVOICE_EVENTS[kind])
        if kind in ("charge.succeeded", "charge.refunded"):
            return self._charge(obj, refund=kind == "charge.refunded", created=created)
        if kind == "charge.dispute.created":
            revocation = {"reason": "dispute", "dispute": _id(obj.get("id")), "charge": _id(obj.get("charge"))}
            return Change(
                _license(obj.get("metadata")),
                None,
                None,
                charge=_id(obj.get("charge")),
                payment_intent=_id(obj.get("payment_intent")),
                facets={"revocation": {"revocation": revocation | {"at": _iso(created)}}},
            )
        if kind == "entitlements.active_entitlement_summary.updated":
            entitlements = _dict(obj.get("entitlements")).get("data") or []
            features = sorted({e["lookup_key"] for e in entitlements if isinstance(e, dict) and e.get("lookup_key")})
            return Change(None, _id(obj.get("customer")), None, facets={"features": {"features": features}})
        return None

    def apply(self, change: Change, state: LicenseState, created: int) -> LicenseState | None:
        """The state after the change, or None when every facet it touches is newer (stale)."""
        new: dict[str, Any] = dict(state)
        versions = dict(state.get("versions") or {})
        won = tied = False
        for facet, value in change.facets.items():
            if facet in versions:
                proposed = _order(facet, created, value)
                current = _order(facet, versions[facet], _facet_value(state, facet))
                if proposed <= current:
                    tied = tied or proposed == current
                    continue
            new.update(value)
            versions[facet] = created
            won = True
        if change.facets and not (won or tied):
            return None
        new["versions"] = versions
        return self.derive(new)  # type: ignore[arg-type]

    def derive(self, state: LicenseState) -> LicenseState:
        """`kind`, `status` and `entitled` from the facets (see the module docstring)."""
        v = state.get("versions") or {}
        payment = state.get("payment") or {}
        invoice = state.get("last_invoice") or {}
        sub_status = state.get("subscription_status")
        kind: str | None = None
        status = "none"
        if payment.get("mode") == "payment" and (
            sub_status is None or v.get("purchase", -1) >= v.get("subscription_state", -1)
        ):
            kind = "perpetual"
            status = {"paid": "paid", "failed": "payment_failed"}.get(payment.get("status", ""), "incomplete")
        elif sub_status is not None or payment or invoice:
            kind = "subscription"
            base = -1
            if sub_status is not None:
                status, base = sub_status, v.get("subscription_state", -1)
            elif payment:
                status, base = ("active" if payment.get("status") == "paid" else "incomplete"), v.get("purchase", -1)
            # Checkout creates the subscription `incomplete` and activates it on payment: a paid
            # session of this subscription means active, whatever order its events arrive in.
            if (
                status == "incomplete"
                and payment.get("status") == "paid"
                and payment.get("subscription") in (None, state.get("subscription"))
            ):
                status = "active"
            # An invoice newer than the subscription's last word moves it the way Stripe will.
            if invoice and v.get("invoice", -1) > base:
                if invoice.get("outcome") == "paid" and status in _AWAITING_PAYMENT:
                    status = "active"
                elif invoice.get("outcome") == "payment_failed" and status == "active":
                    status = "past_due"
        if state.get("revocation"):
            # A full refund or a dispute revokes until a newer payment (a new Checkout, a paid invoice).
            paid_at = max(
                v.get("purchase", -1) if payment.get("status") == "paid" else -1,
                v.get("invoice", -1) if invoice.get("outcome") == "paid" else -1,
            )
            if v.get("revocation", -1) >= paid_at:
                status = "revoked"
        state["kind"] = kind
        state["status"] = status
        state["entitled"] = self.entitled(status)
        return state

    def entitled(self, status: str) -> bool:
        return status == "paid" or status in self.entitled_statuses

    def _checkout(self, session: dict[str, Any], outcome: str | None) -> Change | None:
        mode = session.get("mode")
        if mode not in ("payment", "subscription"):
            return None  # mode=setup buys nothing
        if outcome is None:
            paid = session.get("payment_status") in ("paid", "no_payment_required")
            outcome = "paid" if paid else "unpaid"
        customer, subscription = _id(session.get("customer")), _id(session.get("subscription"))
        payment = {"mode": mode, "status": outcome, "session": _id(session.get("id")), "subscription": subscription}
        facets: dict[str, dict[str, Any]] = {"purchase": {"payment": payment}}
        if customer:
            facets["customer"] = {"customer": customer}
        if subscription:
            facets["subscription"] = {"subscription": subscription}
        return Change(
            _license(session.get("metadata")) or _id(session.get("client_reference_id")),
            customer,
            subscription,
            payment_intent=_id(session.get("payment_intent")),
            facets=facets,
        )

    def _subscription(self, subscription: dict[str, Any], *, notice: bool, created: int) -> Change:
        customer, sub_id = _id(subscription.get("customer")), _id(subscription.get("id"))
        status = str(subscription.get("status") or "incomplete")
        facets: dict[str, dict[str, Any]] = {
            "subscription_state": {
                "subscription_status": status,
                "cancel_at_period_end": bool(subscription.get("cancel_at_period_end")),
                "current_period_end": _iso(_period_end(subscription)),
                "trial_end": _iso(subscription.get("trial_end")),
            }
        }
        if notice:
            trial_end = _iso(subscription.get("trial_end"))
            facets["notice"] = {"notice": {"type": "trial_will_end", "trial_end": trial_end, "at": _iso(created)}}
        elif status != "trialing":
            facets["notice"] = {"notice": None}  # the trial is over: its notice no longer applies
        if customer:
            facets["customer"] = {"customer": customer}
        if sub_id:
            facets["subscription"] = {"subscription": sub_id}
        return Change(_license(subscription.get("metadata")), customer, sub_id, facets=facets)

    def _invoice(self, invoice: dict[str, Any], outcome: str) -> Change | None:
        # Since API version 2025-03-31: parent.subscription_details; before: subscription(_details).
        details = _dict(_dict(invoice.get("parent")).get("subscription_details"))
        subscription = _id(details.get("subscription"))
        if subscription is None:
            details = _dict(invoice.get("subscription_details"))
            subscription = _id(invoice.get("subscription"))
        if subscription is None:
            return None  # a one-off invoice: no subscription, no license change
        customer = _id(invoice.get("customer"))
        charge, payment_intent = _id(invoice.get("charge")), _id(invoice.get("payment_intent"))
        for item in _dict(invoice.get("payments")).get("data") or []:  # new shape, when expanded
            paid_with = _dict(_dict(item).get("payment"))
            charge = charge or _id(paid_with.get("charge"))
            payment_intent = payment_intent or _id(paid_with.get("payment_intent"))
        last_invoice = {
            "id": _id(invoice.get("id")),
            "outcome": outcome,
            "billing_reason": invoice.get("billing_reason"),
            "attempt_count": invoice.get("attempt_count"),
            "next_payment_attempt": _iso(invoice.get("next_payment_attempt")),
            "hosted_invoice_url": invoice.get("hosted_invoice_url"),
        }
        facets: dict[str, dict[str, Any]] = {
            "invoice": {"last_invoice": last_invoice},
            "subscription": {"subscription": subscription},
        }
        if customer:
            facets["customer"] = {"customer": customer}
        return Change(
            _license(details.get("metadata")) or _license(invoice.get("metadata")),
            customer,
            subscription,
            charge=charge,
            payment_intent=payment_intent,
            facets=facets,
        )

    def _charge(self, charge: dict[str, Any], *, refund: bool, created: int) -> Change:
        facets: dict[str, dict[str, Any]] = {}
        captured = charge.get("amount_captured") or charge.get("amount") or 0
        refunded = charge.get("amount_refunded") or 0
        # Only a full refund revokes; a partial one (a goodwill credit) leaves the license alone.
        if refund and (charge.get("refunded") is True or (captured and refunded >= captured)):
            revocation = {"reason": "refund", "charge": _id(charge.get("id")), "at": _iso(created)}
            facets["revocation"] = {"revocation": revocation}
        return Change(
            _license(charge.get("metadata")),
            _id(charge.get("customer")),
            None,
            charge=_id(charge.get("id")),
            payment_intent=_id(charge.get("payment_intent")),
            facets=facets,
        )
