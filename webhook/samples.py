"""Realistic Stripe events for one license, for trying the loop without Stripe (`license-broker
send`, the live page) and for tests. Shapes follow API version 2026-10-28."""

from __future__ import annotations

import hashlib
import secrets
import time
from typing import Any

API_VERSION = "2026-10-28.endive"
ACTIONS = ("pay", "fail", "recover", "cancel", "refund")


def _stable(prefix: str, license_id: str, length: int = 14) -> str:
    return prefix + hashlib.sha256(license_id.encode()).hexdigest()[:length]


class SampleEvents:
    def __init__(self, license_id: str) -> None:
        self.license_id = license_id
        self.customer = _stable("cus_", license_id)
        self.subscription = _stable("sub_", license_id, 20)
        self.charge = _stable("ch_", license_id, 20)

    def for_action(self, action: str, created: int | None = None) -> list[dict[str, Any]]:
        created = created or int(time.time())
        if action == "pay":
            return [
                self.checkout_completed(created),
                self.subscription_event("customer.subscription.updated", "active", created),
            ]
        if action == "fail":
            return [self.subscription_event("customer.subscription.updated", "past_due", created)]
        if action == "recover":
            return [self.subscription_event("customer.subscription.updated", "active", created)]
        if action == "cancel":
            return [self.subscription_event("customer.subscription.deleted", "canceled", created)]
        if action == "refund":
            return [self.charge_refunded(created)]
        raise ValueError(f"unknown action {action!r}; one of {', '.join(ACTIONS)}")

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

    def charge_refunded(self, created: int) -> dict[str, Any]:
        return self.envelope(
            "charge.refunded",
            {
                "id": self.charge,
                "object": "charge",
                "amount": 1200,
                "amount_captured": 1200,
                "amount_refunded": 1200,
                "captured": True,
                "currency": "usd",
                "customer": self.customer,
                "paid": True,
                "refunded": True,
                "status": "succeeded",
            },
            created,
        )
