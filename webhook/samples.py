"""Realistic Stripe events for one license, for trying the loop without Stripe (`license-broker
send`, the live page) and for tests. Shapes follow API version 2026-10-28."""

from __future__ import annotations

import hashlib
import secrets
import time
from typing import Any, ClassVar

import orjson

from webhook.signature import sign

API_VERSION = "2026-10-28.endive"
ACTIONS = ("pay", "fail", "recover", "cancel", "refund")


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
        self.charge = _stable("ch_", license_id, 20)
        self.payment_intent = _stable("pi_", license_id, 20)

    def tick(self) -> int:
        """Now, or one second after the previous action of this license if that is later."""
        created = max(int(time.time()), self._last_created.get(self.license_id, 0) + 1)
        self._last_created[self.license_id] = created
        return created

    def for_action(self, action: str, created: int | None = None) -> list[dict[str, Any]]:
        created = created or self.tick()
        # As Stripe sends them (each one's effect is in docs/stripe.md); one second, so ties apply.
        if action == "pay":
            return [
                self.charge_succeeded(created),
                self.invoice_event("invoice.paid", created),
                self.subscription_event("customer.subscription.updated", "active", created),
                self.checkout_completed(created),
            ]
        if action == "fail":
            return [
                self.invoice_event("invoice.payment_failed", created),
                self.subscription_event("customer.subscription.updated", "past_due", created),
            ]
        if action == "recover":
            return [
                self.invoice_event("invoice.paid", created),
                self.subscription_event("customer.subscription.updated", "active", created),
            ]
        if action == "cancel":
            return [self.subscription_event("customer.subscription.deleted", "canceled", created)]
        if action == "refund":
            return [self.charge_refunded(created)]
        raise ValueError(f"unknown action {action!r}; one of {', '.join(ACTIONS)}")

    def deliveries(self, action: str, secret: str) -> list[tuple[dict[str, Any], bytes, dict[str, str]]]:
        """The events of `action`, each with the body and headers Stripe would send it with."""
        signed = []
        for event in self.for_action(action):
            payload = orjson.dumps(event)
            headers = {"stripe-signature": sign(payload, secret), "content-type": "application/json"}
            signed.append((event, payload, headers))
        return signed

    def envelope(self, kind: str, obj: dict[str, Any], created: int) -> dict[str, Any]:
        return {
            "id": "evt_" + secrets.token_hex(12),
            "object": "event",
            "api_version": API_VERSION,
            "created": created,
            "data": {"object": obj},
            "livemode": False,
            "pending_webhooks": 1,
            "request": {"id": "req_" + secrets.token_hex(7), "idempotency_key": None},
            "type": kind,
        }

    def checkout_completed(self, created: int) -> dict[str, Any]:
        return self.envelope(
            "checkout.session.completed",
            {
                "id": "cs_test_" + secrets.token_hex(16),
                "object": "checkout.session",
                "amount_total": 1200,
                "client_reference_id": self.license_id,
                "created": created - 60,
                "currency": "usd",
                "customer": self.customer,
                "livemode": False,
                "metadata": {"license_id": self.license_id},
                "mode": "subscription",
                "payment_status": "paid",
                "status": "complete",
                "subscription": self.subscription,
            },
            created,
        )

    def subscription_event(self, kind: str, status: str, created: int) -> dict[str, Any]:
        period_end = created + 30 * 86400
        return self.envelope(
            kind,
            {
                "id": self.subscription,
                "object": "subscription",
                "cancel_at_period_end": False,
                "canceled_at": created if status == "canceled" else None,
                "created": created - 60,
                "currency": "usd",
                "customer": self.customer,
                "items": {
                    "object": "list",
                    "data": [
                        {
                            "id": _stable("si_", self.license_id),
                            "object": "subscription_item",
                            "current_period_start": created,
                            "current_period_end": period_end,
                            "price": {"id": "price_1Pro", "lookup_key": "pro_monthly", "unit_amount": 1200},
                            "quantity": 1,
                        }
                    ],
                },
                "livemode": False,
                "metadata": {"license_id": self.license_id},
                "status": status,
                "trial_end": None,
            },
            created,
        )

    def invoice_event(self, kind: str, created: int) -> dict[str, Any]:
        paid = kind == "invoice.paid"
        return self.envelope(
            kind,
            {
                "id": "in_" + secrets.token_hex(12),
                "object": "invoice",
                "amount_due": 1200,
                "amount_paid": 1200 if paid else 0,
                "attempt_count": 1,
                "billing_reason": "subscription_cycle",
                "customer": self.customer,
                "hosted_invoice_url": None,
                "next_payment_attempt": None if paid else created + 3 * 86400,
                "parent": {
                    "type": "subscription_details",
                    "quote_details": None,
                    "subscription_details": {
                        "metadata": {"license_id": self.license_id},
                        "subscription": self.subscription,
                    },
                },
                "status": "paid" if paid else "open",
            },
            created,
        )

    def charge_succeeded(self, created: int) -> dict[str, Any]:
        return self.envelope("charge.succeeded", self._charge(refunded=0), created)

    def charge_refunded(self, created: int, amount: int = 1200) -> dict[str, Any]:
        return self.envelope("charge.refunded", self._charge(refunded=amount), created)

    def _charge(self, refunded: int) -> dict[str, Any]:
        return {
            "id": self.charge,
            "object": "charge",
            "amount": 1200,
            "amount_captured": 1200,
            "amount_refunded": refunded,
            "captured": True,
            "currency": "usd",
            "customer": self.customer,
            "paid": True,
            "payment_intent": self.payment_intent,
            "refunded": refunded >= 1200,
            "status": "succeeded",
        }
