"""Realistic Stripe events for one license, for trying the loop without Stripe (`license-broker
send`, the live page) and for tests. Shapes follow API version 2026-10-28."""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Sequence
from typing import Any, ClassVar

import orjson

from broker.stripe_ledger.objects import Reported, Unprocessable, report
from webhook.sample_actions import ACTIONS
from webhook.signature import sign

API_VERSION = "2026-10-28.endive"

# What `send` and the live page say about a webhook's outcome other than "applied".
OUTCOME_NOTES = {
    "unchanged": "recorded; the license already held what it reports",
    "stale": "recorded; a newer snapshot of its object came first, so it changes nothing",
    "duplicate": "this event id was received before: nothing changed (a Stripe retry looks like this)",
}


def explain(outcome: str, event: dict[str, Any], later: Sequence[dict[str, Any]] = ()) -> str | None:
    """Why `event` had `outcome`, in a sentence; for "pending", what it waits for, and which of the
    `later` events (sent after it) provides that."""
    if outcome != "pending":
        return OUTCOME_NOTES.get(outcome)
    reported = _report(event)
    if reported is None:
        return "kept, not counted yet: it names no license and links to nothing bound to one"
    own = reported.primary
    others = sorted(reported.ids - {own.id})
    bound = f"neither it nor {', '.join(others)} (which it names) is" if others else "it is not"
    linking = next((e["type"] for e in later if (r := _report(e)) is not None and r.ids & reported.ids), None)
    where = f"in this action: {linking}, below" if linking else "`license-broker unmatched` lists it meanwhile"
    return (
        f"kept, not counted yet: the {own.kind.replace('_', ' ')} {own.id} names no license, and {bound} bound to "
        f"one yet; it counts as soon as an event links one of them to a license ({where})"
    )


def _report(event: dict[str, Any]) -> Reported | None:
    try:
        return report(event)
    except Unprocessable:
        return None


def _stable(prefix: str, license_id: str, length: int = 14) -> str:
    return prefix + hashlib.sha256(license_id.encode()).hexdigest()[:length]


class SampleEvents:
    # Per license, the `created` last handed out by tick(): Stripe's events of one customer are
    # seconds apart, and the rules order same-second events by stage, not by arrival.
    _last_created: ClassVar[dict[str, int]] = {}

    def __init__(self, license_id: str) -> None:
        self.license_id = license_id
        self.customer = _stable("cus_", license_id)
        self.subscription = _stable("sub_", license_id, 20)
        self.second_subscription = _stable("sub_", license_id + "/2", 20)

    def period(self, n: int) -> tuple[str, str, str]:
        """The invoice, payment intent and charge of period `n` (1: the first payment, 2: the
        renewal, 3: the second subscription's first payment)."""
        key = f"{self.license_id}/{n}"
        return _stable("in_", key, 20), _stable("pi_", key, 20), _stable("ch_", key, 20)

    def tick(self) -> int:
        """Now, or one second after the previous action of this license if that is later."""
        created = max(int(time.time()), self._last_created.get(self.license_id, 0) + 1)
        self._last_created[self.license_id] = created
        return created

    def for_action(self, action: str, created: int | None = None) -> list[dict[str, Any]]:
        created = created or self.tick()
        sub, second = self.subscription, self.second_subscription
        # As Stripe sends them (each one's effect is in docs/stripe.md).
        if action == "pay":
            return [
                *self.paid_period(1, sub, created),
                self.subscription_event("customer.subscription.updated", "active", created, sub, latest=1),
                self.checkout_completed(created, sub, self.period(1)[0]),
            ]
        if action == "fail":
            return [
                self.invoice_event("invoice.payment_failed", created, 2, sub),
                self.subscription_event("customer.subscription.updated", "past_due", created, sub, latest=2),
            ]
        if action == "recover":
            return [
                *self.paid_period(2, sub, created),
                self.subscription_event("customer.subscription.updated", "active", created, sub, latest=2),
            ]
        if action == "resubscribe":
            return [
                *self.paid_period(3, second, created),
                self.subscription_event("customer.subscription.created", "active", created, second, latest=3),
                self.checkout_completed(created, second, self.period(3)[0]),
            ]
        if action == "cancel_at_period_end":
            return [
                self.subscription_event(
                    "customer.subscription.updated", "active", created, sub, latest=1, cancel_at_period_end=True
                )
            ]
        if action == "cancel":
            return [self.subscription_event("customer.subscription.deleted", "canceled", created, sub, latest=None)]
        if action == "refund":
            return [self.envelope("charge.refunded", self._charge(n, refunded=1200), created) for n in (1, 2, 3)]
        if action == "refund_old":
            return [self.envelope("charge.refunded", self._charge(1, refunded=1200), created)]
        if action in ("dispute", "dispute_won"):
            status = "needs_response" if action == "dispute" else "won"
            kind = "charge.dispute.created" if action == "dispute" else "charge.dispute.closed"
            return [self.envelope(kind, self._dispute(n, status), created) for n in (1, 2, 3)]
        raise ValueError(f"unknown action {action!r}; one of {', '.join(ACTIONS)}")

    def deliveries(self, action: str, secret: str) -> list[tuple[dict[str, Any], bytes, dict[str, str]]]:
        """The events of `action`, each with the body and headers Stripe would send it with."""
        signed = []
        for event in self.for_action(action):
            payload = orjson.dumps(event)
            headers = {"stripe-signature": sign(payload, secret), "content-type": "application/json"}
            signed.append((event, payload, headers))
        return signed

    def envelope(
        self, kind: str, obj: dict[str, Any], created: int, previous: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        data: dict[str, Any] = {"object": obj}
        if previous is not None:  # what an *.updated event changed, as Stripe sends it
            data["previous_attributes"] = previous
        return {
            "id": "evt_" + secrets.token_hex(12),
            "object": "event",
            "api_version": API_VERSION,
            "created": created,
            "data": data,
            "livemode": False,
            "pending_webhooks": 1,
            "request": {"id": "req_" + secrets.token_hex(7), "idempotency_key": None},
            "type": kind,
        }

    def paid_period(self, n: int, subscription: str, created: int) -> list[dict[str, Any]]:
        invoice, payment_intent, _ = self.period(n)
        payment = {
            "id": _stable("inpay_", f"{self.license_id}/{n}"),
            "object": "invoice_payment",
            "invoice": invoice,
            "payment": {"type": "payment_intent", "payment_intent": payment_intent},
            "status": "paid",
        }
        return [
            self.envelope("charge.succeeded", self._charge(n, refunded=0), created),
            self.envelope("invoice_payment.paid", payment, created),
            self.invoice_event("invoice.paid", created, n, subscription),
        ]

    def checkout_completed(
        self, created: int, subscription: str | None = None, invoice: str | None = None
    ) -> dict[str, Any]:
        subscription = subscription or self.subscription
        invoice = invoice or self.period(1)[0]
        return self.envelope(
            "checkout.session.completed",
            {
                "id": _stable("cs_test_", subscription, 24),
                "object": "checkout.session",
                "amount_total": 1200,
                "client_reference_id": self.license_id,
                "created": created - 60,
                "currency": "usd",
                "customer": self.customer,
                "invoice": invoice,
                "livemode": False,
                "metadata": {"license_id": self.license_id},
                "mode": "subscription",
                "payment_status": "paid",
                "status": "complete",
                "subscription": subscription,
            },
            created,
        )

    def subscription_event(
        self,
        kind: str,
        status: str,
        created: int,
        subscription: str | None = None,
        latest: int | None = 1,
        *,
        cancel_at_period_end: bool = False,
    ) -> dict[str, Any]:
        """A subscription event. `cancel_at_period_end`: the customer asked to cancel (the customer
        portal's default mode); Stripe keeps the subscription active, sets `cancel_at` to the
        period's end, and sends customer.subscription.deleted then."""
        subscription = subscription or self.subscription
        period_end = created + 30 * 86400
        asked = status == "canceled" or cancel_at_period_end
        previous = None
        if cancel_at_period_end:
            previous = {
                "cancel_at": None,
                "cancel_at_period_end": False,
                "canceled_at": None,
                "cancellation_details": {"comment": None, "feedback": None, "reason": None},
            }
        return self.envelope(
            kind,
            {
                "id": subscription,
                "object": "subscription",
                "cancel_at": period_end if cancel_at_period_end else None,
                "cancel_at_period_end": cancel_at_period_end,
                "canceled_at": created if asked else None,
                "cancellation_details": {
                    "comment": None,
                    "feedback": None,
                    "reason": "cancellation_requested" if asked else None,
                },
                "created": created - 60,
                "currency": "usd",
                "customer": self.customer,
                "items": {
                    "object": "list",
                    "data": [
                        {
                            "id": _stable("si_", subscription),
                            "object": "subscription_item",
                            "current_period_start": created,
                            "current_period_end": period_end,
                            "price": {"id": "price_1Pro", "product": "prod_Pro", "unit_amount": 1200},
                            "quantity": 1,
                        }
                    ],
                },
                "latest_invoice": self.period(latest)[0] if latest else None,
                "livemode": False,
                "metadata": {"license_id": self.license_id},
                "status": status,
                "trial_end": None,
            },
            created,
            previous,
        )

    def invoice_event(self, kind: str, created: int, n: int = 1, subscription: str | None = None) -> dict[str, Any]:
        paid = kind == "invoice.paid"
        invoice, _, _ = self.period(n)
        return self.envelope(
            kind,
            {
                "id": invoice,
                "object": "invoice",
                "amount_due": 1200,
                "amount_paid": 1200 if paid else 0,
                "attempt_count": 1,
                "billing_reason": "subscription_create" if n != 2 else "subscription_cycle",
                "created": created - 60 if n != 2 else created - 30,
                "customer": self.customer,
                "hosted_invoice_url": None,
                "next_payment_attempt": None if paid else created + 3 * 86400,
                "parent": {
                    "type": "subscription_details",
                    "quote_details": None,
                    "subscription_details": {
                        "metadata": {"license_id": self.license_id},
                        "subscription": subscription or self.subscription,
                    },
                },
                "status": "paid" if paid else "open",
            },
            created,
        )

    def _charge(self, n: int, refunded: int) -> dict[str, Any]:
        _, payment_intent, charge = self.period(n)
        return {
            "id": charge,
            "object": "charge",
            "amount": 1200,
            "amount_captured": 1200,
            "amount_refunded": refunded,
            "captured": True,
            "currency": "usd",
            "customer": self.customer,
            "paid": True,
            "payment_intent": payment_intent,
            "refunded": refunded >= 1200,
            "status": "succeeded",
        }

    def _dispute(self, n: int, status: str) -> dict[str, Any]:
        _, payment_intent, charge = self.period(n)
        return {
            "id": _stable("du_", f"{self.license_id}/{n}", 20),
            "object": "dispute",
            "amount": 1200,
            "charge": charge,
            "currency": "usd",
            "payment_intent": payment_intent,
            "reason": "fraudulent",
            "status": status,
        }
