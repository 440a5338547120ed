"""Stripe event -> the ledger objects it reports. Pure: no I/O, so every shape is a unit test.

Each kind of object is read by its entry in the registry (broker.stripe_ledger.kinds: its events,
parser, ranks, whether it is customer-level, how the refresh reads it); Stripe's fields by
broker.stripe_ledger.fields. This module is what the ingest calls: `report`, the invoice payments of
the API versions whose events name none, and which events may change licenses at all.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from broker.stripe_ledger.fields import (
    MAX_CREATED,
    MAX_ID,
    MAX_LICENSE_ID,
    BadLicenseId,
    Reported,
    Unprocessable,
    as_dict,
    license_of,
    machine_limits,
    products_of,
    valid_license_id,
)
from broker.stripe_ledger.kinds import (
    EVENT_TYPES,
    KINDS,
    complete_entitlements,
    entitlements_id,
    line_items,
    report,
)
from broker.stripe_ledger.ledger import FETCHED_RANK, StripeObject

__all__ = [
    "EVENT_TYPES",
    "MAX_CREATED",
    "MAX_ID",
    "MAX_LICENSE_ID",
    "UNLINKED_VERSIONS",
    "BadLicenseId",
    "EventFilter",
    "Reported",
    "Unprocessable",
    "complete_entitlements",
    "entitlements_id",
    "invoice_payments",
    "license_of",
    "line_items",
    "machine_limits",
    "needs_invoice_payments",
    "products_of",
    "report",
    "unlinked_version",
    "valid_license_id",
]


# Webhook endpoints of these API versions get invoices that name no payment (2025-03-31 removed
# `invoice.charge` and `invoice.payment_intent`, and `invoice` from charges and payment intents,
# https://docs.stripe.com/changelog/basil/2025-03-31/add-support-for-multiple-partial-payments-on-invoices)
# and no `invoice_payment.paid` event yet (it came with 2025-05-28): nothing in their events says
# which payment paid a subscription's invoice, so its refunds and disputes revoke nothing unless the
# invoice's payments are read from Stripe's API.
UNLINKED_VERSIONS = ("2025-03-31", "2025-05-28")  # from, up to (excluded)


def unlinked_version(api_version: Any) -> bool:
    return isinstance(api_version, str) and UNLINKED_VERSIONS[0] <= api_version[:10] < UNLINKED_VERSIONS[1]


def needs_invoice_payments(event: Mapping[str, Any], obj: StripeObject, held: StripeObject | None) -> bool:
    """A paid invoice of such a version that names no payment, not known paid before."""
    state = obj.state
    return (
        obj.kind == "invoice"
        and state.get("status") == "paid"
        and unlinked_version(event.get("api_version"))
        and not (state.get("charge") or state.get("payment_intent") or state.get("payments"))
        and not (held is not None and held.state.get("status") == "paid")
    )


def invoice_payments(items: list[dict[str, Any]], created: int) -> list[StripeObject]:
    """Invoice payments read from Stripe's API, as `invoice_payment.paid` would report them."""
    found = []
    for item in items:
        if as_dict(item).get("status") == "paid":
            paid = KINDS["invoice_payment"].read("invoice_payment.paid", item, created)
            if paid is not None:
                own = paid.primary
                found.append(replace(own, rank=own.rank + FETCHED_RANK))
    return found


@dataclass(frozen=True, slots=True)
class EventFilter:
    """STRIPE_LIVEMODE and STRIPE_ACCOUNTS: which events may change licenses at all."""

    livemode: bool | None = None
    accounts: frozenset[str] = frozenset()

    def reason(self, event: Mapping[str, Any]) -> str | None:
        account = event.get("account")
        if account is not None and (not isinstance(account, str) or account not in self.accounts):
            return "Connect account not listed in STRIPE_ACCOUNTS"
        if self.livemode is not None and (event.get("livemode") is True) != self.livemode:
            return (
                "live-mode event, STRIPE_LIVEMODE=false"
                if self.livemode is False
                else "test-mode event, STRIPE_LIVEMODE=true"
            )
        return None
