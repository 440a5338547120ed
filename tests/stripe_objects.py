"""Stripe events built from Stripe's own published example objects (stripe/openapi fixtures3.json,
kept in tests/fixtures/stripe-openapi/resources.json), in two API shapes.

Each builder deep-copies Stripe's example, sets every field a license rule may read, and clears the
example's filler values that would mislead a rule (the subscription example is canceled with
cancel_at_period_end, the invoice example's parent is a quote, the charge example is uncaptured).

- "current" (API 2025-03-31 and later): the invoice names its subscription in
  parent.subscription_details, periods are on the subscription items, invoice_payment objects link an
  invoice to its payment intent, a charge does not name its invoice.
- "legacy" (before 2025-03-31): invoice.subscription and invoice.subscription_details,
  invoice.charge and invoice.payment_intent, subscription.current_period_start/end, charge.invoice.
"""

from __future__ import annotations

import copy
import json
import secrets
from functools import cache
from pathlib import Path
from typing import Any, Literal

Shape = Literal["current", "legacy"]
SHAPES: tuple[Shape, ...] = ("current", "legacy")
API_VERSIONS: dict[Shape, str] = {"current": "2025-09-30.clover", "legacy": "2025-02-24.acacia"}
# The current shape before invoice_payment.paid existed: nothing in an event links an invoice to its payment.
UNLINKED_API_VERSION = "2025-04-30.basil"

# Stripe's published example objects, copied into the repository (source and license in its README).
FIXTURES_DIR = Path(__file__).resolve().parent / "fixtures" / "stripe-openapi"


@cache
def _examples() -> dict[str, dict[str, Any]]:
    examples: dict[str, dict[str, Any]] = json.loads((FIXTURES_DIR / "resources.json").read_text())
    return examples


def example(resource: str) -> dict[str, Any]:
    """A fresh deep copy of Stripe's example object of `resource` ("subscription", "invoice", ...)."""
    return copy.deepcopy(_examples()[resource])


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(8)}"


# --- the event envelope -------------------------------------------------------------------------


def event(
    kind: str,
    obj: dict[str, Any],
    *,
    created: int,
    shape: Shape,
    livemode: bool = False,
    account: str | None = None,
    previous_attributes: dict[str, Any] | None = None,
    api_version: str | None = None,
) -> dict[str, Any]:
    """Stripe's `event` example around `obj`: a snapshot event as a webhook endpoint receives it
    (`api_version`: the endpoint's, if not the shape's usual one)."""
    envelope = example("event")
    envelope.update(
        id=new_id("evt"),
        type=kind,
        created=created,
        livemode=livemode,
        api_version=api_version or API_VERSIONS[shape],
        pending_webhooks=1,
        request={"id": new_id("req"), "idempotency_key": None},
    )
    envelope["data"] = {"object": obj}
    if previous_attributes is not None:
        envelope["data"]["previous_attributes"] = previous_attributes
    if account is not None:
        envelope["account"] = account  # a Connect event: it happened on this connected account
    return envelope


# --- subscriptions ------------------------------------------------------------------------------


def subscription(
    shape: Shape,
    *,
    id: str,
    customer: str,
    status: str,
    created: int,
    period_start: int,
    period_end: int,
    price: str,
    product: str,
    item: str,
    livemode: bool = False,
    metadata: dict[str, str] | None = None,
    latest_invoice: str | None = None,
    cancel_at: int | None = None,
    cancel_at_period_end: bool = False,
    canceled_at: int | None = None,
    ended_at: int | None = None,
    trial_start: int | None = None,
    trial_end: int | None = None,
    quantity: int = 1,
    collection_method: str = "charge_automatically",
) -> dict[str, Any]:
    sub = example("subscription")
    sub.update(
        id=id,
        customer=customer,
        status=status,
        created=created,
        start_date=created,
        billing_cycle_anchor=period_start,
        livemode=livemode,
        metadata=dict(metadata or {}),
        latest_invoice=latest_invoice,
        cancel_at=cancel_at,
        cancel_at_period_end=cancel_at_period_end,
        canceled_at=canceled_at,
        ended_at=ended_at,
        trial_start=trial_start,
        trial_end=trial_end,
        collection_method=collection_method,
        days_until_due=30 if collection_method == "send_invoice" else None,
        # The example's filler: a pause, a pending update, a Connect transfer, a pending invoice item.
        pause_collection=None,
        pending_update=None,
        pending_invoice_item_interval=None,
        next_pending_invoice_item_invoice=None,
        transfer_data=None,
        billing_cycle_anchor_config=None,
        billing_thresholds=None,
        schedule=None,
        test_clock=None,
    )
    sub["cancellation_details"] = {"comment": None, "feedback": None, "reason": None}
    item_obj = sub["items"]["data"][0]
    item_obj.update(id=item, subscription=id, created=created, billing_thresholds=None, quantity=quantity)
    item_obj["price"].update(id=price, product=product, livemode=livemode, lookup_key=None)
    item_obj["plan"].update(id=price, product=product, livemode=livemode, currency="usd", amount=2000)
    item_obj["plan"].update(amount_decimal="2000", billing_scheme="per_unit", interval_count=1)
    item_obj["plan"].update(transform_usage=None, created=created)
    item_obj["price"]["transform_quantity"] = None
    sub["items"]["url"] = f"/v1/subscription_items?subscription={id}"
    if shape == "current":
        # Since 2025-03-31 the period is per item; 2025-09-30.clover creates flexible billing.
        item_obj.update(current_period_start=period_start, current_period_end=period_end)
        sub["billing_mode"] = {"type": "flexible", "flexible": {"proration_discounts": "included"}}
        sub.pop("billing_schedules", None)
    else:
        del item_obj["current_period_start"], item_obj["current_period_end"]
        sub.update(current_period_start=period_start, current_period_end=period_end)
        for newer in ("billing_mode", "billing_schedules", "managed_payments", "customer_account"):
            sub.pop(newer, None)
    return sub


# --- invoices and their payments ----------------------------------------------------------------


def invoice(
    shape: Shape,
    *,
    id: str,
    customer: str,
    subscription: str,
    status: str,
    created: int,
    amount: int,
    billing_reason: str,
    period_start: int,
    period_end: int,
    price: str,
    product: str,
    item: str,
    livemode: bool = False,
    subscription_metadata: dict[str, str] | None = None,
    charge: str | None = None,
    payment_intent: str | None = None,
    proration: bool = False,
    collection_method: str = "charge_automatically",
    due_date: int | None = None,
) -> dict[str, Any]:
    """A subscription's invoice. `charge` / `payment_intent` appear only in the legacy shape.

    `proration`: its one line is a proration (a mid-period change invoiced at once, `always_invoice`),
    not the period. `collection_method="send_invoice"`: emailed, paid on the hosted page by `due_date`."""
    paid = status == "paid"
    inv = example("invoice")
    inv.update(
        id=id,
        customer=customer,
        status=status,
        created=created,
        effective_at=created,
        livemode=livemode,
        amount_due=amount,
        amount_paid=amount if paid else 0,
        amount_remaining=0 if paid else amount,
        amount_overpaid=0,
        subtotal=amount,
        subtotal_excluding_tax=amount,
        total=amount,
        total_excluding_tax=amount,
        attempt_count=1,
        attempted=True,
        auto_advance=not paid,
        billing_reason=billing_reason,
        period_start=period_start,
        period_end=period_end,
        number=f"{id[-8:].upper()}-0001",
        hosted_invoice_url=f"https://invoice.stripe.com/i/{id}",
        invoice_pdf=f"https://pay.stripe.com/invoice/{id}/pdf",
        next_payment_attempt=None if paid or collection_method == "send_invoice" else created + 3 * 86400,
        collection_method=collection_method,
        due_date=due_date,
        from_invoice=None,
        last_finalization_error=None,
        shipping_cost=None,
        webhooks_delivered_at=created,
        metadata={},
    )
    inv["status_transitions"] = {
        "finalized_at": created,
        "marked_uncollectible_at": None,
        "paid_at": created if paid else None,
        "voided_at": None,
    }
    line = inv["lines"]["data"][0]
    line.update(
        id=new_id("il"),
        invoice=id,
        amount=amount,
        subtotal=amount,
        livemode=livemode,
        description=f"Prorated change of {product}" if proration else f"1 x {product} (at ${amount / 100:.2f} / month)",
        period={"start": period_start, "end": period_end},
        metadata=dict(subscription_metadata or {}),
    )
    inv["lines"]["url"] = f"/v1/invoices/{id}/lines"
    details = {"metadata": dict(subscription_metadata or {}), "subscription": subscription}
    if shape == "current":
        line["parent"] = {
            "type": "subscription_item_details",
            "invoice_item_details": None,
            "subscription_item_details": {
                "invoice_item": new_id("ii") if proration else None,
                "proration": proration,
                "proration_details": {"credited_items": None},
                "subscription": subscription,
                "subscription_item": item,
            },
        }
        line["pricing"] = {"type": "price_details", "price_details": {"price": price, "product": product}}
        line["subscription"] = None
        inv["parent"] = {"type": "subscription_details", "quote_details": None, "subscription_details": details}
        inv["subscription"] = None  # as in Stripe's example: the field is gone since 2025-03-31
    else:
        for newer in ("parent", "pricing", "pretax_credit_amounts", "taxes"):
            line.pop(newer, None)
        line.update(
            type="invoiceitem" if proration else "subscription",
            subscription=subscription,
            subscription_item=item,
            proration=proration,
            price={"id": price, "object": "price", "product": product, "unit_amount": amount},
        )
        for newer in ("parent", "amount_overpaid", "customer_account", "from_invoice", "latest_revision"):
            inv.pop(newer, None)
        inv.update(
            subscription=subscription,
            subscription_details={"metadata": details["metadata"]},
            charge=charge,
            payment_intent=payment_intent,
            paid=paid,
        )
    return inv


def invoice_payment(
    *, id: str, invoice: str, payment_intent: str, amount: int, created: int, livemode: bool = False
) -> dict[str, Any]:
    """Current shape only: what links an invoice to the payment intent that paid it."""
    payment = example("invoice_payment")
    payment.update(
        id=id,
        invoice=invoice,
        amount_paid=amount,
        amount_requested=amount,
        created=created,
        currency="usd",
        livemode=livemode,
        is_default=True,
        status="paid",
        payment={"type": "payment_intent", "payment_intent": payment_intent},
        status_transitions={"canceled_at": None, "paid_at": created},
    )
    return payment


def charge(
    shape: Shape,
    *,
    id: str,
    customer: str,
    payment_intent: str,
    amount: int,
    created: int,
    livemode: bool = False,
    amount_refunded: int = 0,
    invoice: str | None = None,
    refunds: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A captured card charge of a payment intent. `invoice` appears only in the legacy shape."""
    ch = example("charge")
    ch.update(
        id=id,
        customer=customer,
        payment_intent=payment_intent,
        amount=amount,
        amount_captured=amount,
        amount_refunded=amount_refunded,
        refunded=amount_refunded >= amount,
        captured=True,
        paid=True,
        status="succeeded",
        created=created,
        livemode=livemode,
        metadata={},
        balance_transaction=new_id("txn"),
        source=None,  # the example carries a legacy Source as well as its card
        transfer_data=None,
        receipt_url=f"https://pay.stripe.com/receipts/payment/{id}",
    )
    ch["outcome"].update(type="authorized", network_status="approved_by_network", seller_message="Payment complete.")
    ch["payment_method_details"]["card"]["amount_authorized"] = amount
    ch["refunds"] = {
        "object": "list",
        "data": list(refunds or []),
        "has_more": False,
        "url": f"/v1/charges/{id}/refunds",
    }
    if shape == "legacy":
        ch["invoice"] = invoice
    else:
        ch.pop("invoice", None)
    return ch


def payment_intent(
    *,
    id: str,
    customer: str | None,
    amount: int,
    status: str,
    created: int,
    latest_charge: str | None,
    livemode: bool = False,
    metadata: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A payment intent confirmed with the Payment Element or the API (no Checkout, no invoice)."""
    pi = example("payment_intent")
    succeeded = status == "succeeded"
    pi.update(
        id=id,
        customer=customer,
        amount=amount,
        amount_received=amount if succeeded else 0,
        amount_capturable=0,
        currency="usd",
        status=status,
        created=created,
        livemode=livemode,
        metadata=dict(metadata or {}),
        latest_charge=latest_charge if succeeded else None,
        client_secret=f"{id}_secret_{new_id('s')[2:]}",
        canceled_at=None,
        last_payment_error=None,
        next_action=None,
        processing=None,
        transfer_data=None,
        payment_method=new_id("pm"),
        payment_method_configuration_details=None,
        description="License (perpetual)",
    )
    return pi


def refund(*, id: str, charge: str, payment_intent: str, amount: int, status: str, created: int) -> dict[str, Any]:
    re = example("refund")
    re.update(
        id=id,
        charge=charge,
        payment_intent=payment_intent,
        amount=amount,
        status=status,
        created=created,
        balance_transaction=new_id("txn"),
        reason="requested_by_customer",
    )
    return re


# Disputes in these statuses are inquiries (no funds withdrawn); the others are chargebacks.
INQUIRY_STATUSES = frozenset({"warning_needs_response", "warning_under_review", "warning_closed"})


def dispute(
    *,
    id: str,
    charge: str,
    payment_intent: str,
    amount: int,
    status: str,
    created: int,
    livemode: bool = False,
    reason: str = "fraudulent",
    case_type: str | None = None,
) -> dict[str, Any]:
    """`case_type`: inquiry or chargeback by default (from the status); `block` or `resolution` for a
    dispute Stripe's dispute prevention stopped (status `prevented`)."""
    du = example("dispute")
    du.update(
        id=id,
        charge=charge,
        payment_intent=payment_intent,
        amount=amount,
        status=status,
        created=created,
        livemode=livemode,
        reason=reason,
        is_charge_refundable=status in INQUIRY_STATUSES,
    )
    default_case = "inquiry" if status in INQUIRY_STATUSES else "chargeback"
    du["payment_method_details"]["card"]["case_type"] = case_type or default_case
    du["evidence_details"]["due_by"] = created + 7 * 86400
    return du


# --- Checkout -----------------------------------------------------------------------------------


def checkout_session(
    *,
    id: str,
    mode: str,
    customer: str,
    payment_status: str,
    status: str,
    created: int,
    amount: int,
    livemode: bool = False,
    metadata: dict[str, str] | None = None,
    client_reference_id: str | None = None,
    subscription: str | None = None,
    invoice: str | None = None,
    payment_intent: str | None = None,
    payment_link: str | None = None,
) -> dict[str, Any]:
    session = example("checkout.session")
    session.update(
        id=id,
        mode=mode,
        customer=customer,
        customer_creation="if_required",
        payment_status=payment_status,
        status=status,
        created=created,
        expires_at=created + 86400,
        livemode=livemode,
        metadata=dict(metadata or {}),
        client_reference_id=client_reference_id,
        subscription=subscription,
        invoice=invoice,
        payment_intent=payment_intent,
        payment_link=payment_link,
        amount_subtotal=amount,
        amount_total=amount,
        currency="usd",
        url=None,  # a completed or expired session has no page any more
        # The example's filler: a recovery offer, a currency conversion, shipping, discounts.
        after_expiration=None,
        currency_conversion=None,
        shipping_cost=None,
        shipping_address_collection=None,
        invoice_creation=None,
        total_details={"amount_discount": 0, "amount_shipping": 0, "amount_tax": 0},
        payment_method_configuration_details={"id": new_id("pmc"), "parent": None},
    )
    session["custom_text"] = dict.fromkeys(session["custom_text"])
    return session


def line_item(*, price: str, product: str, amount: int, one_time: bool = True) -> dict[str, Any]:
    """One of a Checkout Session's line items, as GET /v1/checkout/sessions/:id/line_items lists it."""
    price_obj = example("price")
    price_obj.update(id=price, product=product, unit_amount=amount, unit_amount_decimal=str(amount))
    price_obj.update(transform_quantity=None, custom_unit_amount=None, created=1_700_000_000)
    if one_time:
        price_obj.update(type="one_time", recurring=None)
    return {
        "id": new_id("li"),
        "object": "item",
        "amount_discount": 0,
        "amount_subtotal": amount,
        "amount_tax": 0,
        "amount_total": amount,
        "currency": "usd",
        "description": product,
        "price": price_obj,
        "quantity": 1,
    }


# --- customer-level facts -----------------------------------------------------------------------

# An event's summary lists at most this many entitlements (`has_more` says there are others).
SUMMARY_PAGE = 10


def active_entitlement(*, key: str, livemode: bool = False) -> dict[str, Any]:
    """One of a customer's active entitlements, as the summary and GET /v1/entitlements/active_entitlements
    list them."""
    entry = example("entitlements.active_entitlement_summary")["entitlements"]["data"][0]
    entry.update(id=new_id("ent"), lookup_key=key, livemode=livemode)
    entry["feature"].update(id=new_id("feat"), lookup_key=key, name=key, livemode=livemode, metadata={})
    return entry


def entitlement_summary(
    *, customer: str, lookup_keys: list[str], livemode: bool = False, entries: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """The summary as `entitlements.active_entitlement_summary.updated` carries it: the first
    SUMMARY_PAGE entitlements, `has_more` when there are others."""
    summary = example("entitlements.active_entitlement_summary")
    data = entries if entries is not None else [active_entitlement(key=k, livemode=livemode) for k in lookup_keys]
    summary.update(customer=customer, livemode=livemode)
    summary["entitlements"] = {
        "object": "list",
        "data": data[:SUMMARY_PAGE],
        "has_more": len(data) > SUMMARY_PAGE,
        "url": f"/v1/customer/{customer}/entitlements",
    }
    return summary


def customer(*, id: str, created: int, livemode: bool = False) -> dict[str, Any]:
    """The customer as `customer.deleted` carries it (its last snapshot)."""
    cus = example("customer")
    cus.update(id=id, created=created, livemode=livemode, discount=None, email=f"{id}@example.com")
    return cus
