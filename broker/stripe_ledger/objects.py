"""Stripe event -> the ledger objects it reports. Pure: no I/O, so every shape is a unit test.

Both API shapes are read: before 2025-03-31 an invoice names its subscription in `subscription` and
`subscription_details` and its payment in `charge` / `payment_intent`, a charge names its
`invoice`, and a subscription holds `current_period_end`; since then the subscription is under
`parent.subscription_details`, payments are `invoice_payment` objects (`invoice_payment.paid`) and
periods are on the subscription items.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from broker.stripe_ledger.ledger import FETCHED_RANK, StripeObject, charge_rank, line_items_id, rank_of

# Stripe ids fit these columns; a longer or odd value is content the broker cannot use.
MAX_ID = 255
MAX_LICENSE_ID = 200
MAX_CREATED = 2**53  # far beyond any real timestamp, well inside BIGINT

SUBSCRIPTION_EVENTS = frozenset(
    {
        "customer.subscription.created",
        "customer.subscription.updated",
        "customer.subscription.deleted",
        "customer.subscription.paused",
        "customer.subscription.resumed",
        "customer.subscription.trial_will_end",
        "customer.subscription.pending_update_applied",
        "customer.subscription.pending_update_expired",
    }
)
CHECKOUT_EVENTS: Mapping[str, str | None] = {
    "checkout.session.completed": None,  # paid, or unpaid until an async payment settles
    "checkout.session.async_payment_succeeded": "paid",
    "checkout.session.async_payment_failed": "failed",
    "checkout.session.expired": "expired",
}
# What each invoice event the rules use says of the invoice. Any other invoice.* event (created,
# updated, finalized, ...) is ignored: an `invoice.updated` of an open invoice would otherwise erase
# the failed attempt or the action required that a payment event reported.
INVOICE_OUTCOMES: Mapping[str, str] = {
    "invoice.paid": "paid",
    "invoice.payment_succeeded": "paid",
    "invoice.payment_failed": "failed",
    "invoice.payment_action_required": "action_required",
    "invoice.voided": "void",
    "invoice.marked_uncollectible": "uncollectible",
}
CHARGE_EVENTS = frozenset(
    {"charge.succeeded", "charge.refunded", "charge.updated", "charge.captured", "charge.failed", "charge.pending"}
)
REFUND_EVENTS = frozenset({"refund.created", "refund.updated", "refund.failed", "charge.refund.updated"})
DISPUTE_EVENTS = frozenset(
    {
        "charge.dispute.created",
        "charge.dispute.updated",
        "charge.dispute.closed",
        "charge.dispute.funds_withdrawn",
        "charge.dispute.funds_reinstated",
    }
)
# Every event type that can change a license; docs/stripe.md lists them for the user to enable.
EVENT_TYPES = tuple(
    sorted(
        {
            *SUBSCRIPTION_EVENTS,
            *CHECKOUT_EVENTS,
            *INVOICE_OUTCOMES,
            "invoice_payment.paid",
            *CHARGE_EVENTS,
            *REFUND_EVENTS,
            *DISPUTE_EVENTS,
            "payment_intent.succeeded",
            "entitlements.active_entitlement_summary.updated",
            "customer.deleted",
        }
    )
)


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
        if _dict(item).get("status") == "paid":
            own = _invoice_payment(item, created).primary
            found.append(replace(own, rank=own.rank + FETCHED_RANK))
    return found


class Unprocessable(Exception):
    """A well-signed event whose content the broker cannot use: recorded with this reason, 2xx."""


class BadLicenseId(Unprocessable):
    """The event names a license by an id the broker cannot hold: rejected."""


@dataclass(frozen=True, slots=True)
class Reported:
    """What one event reports: ledger objects (the first is its own), and the license it names."""

    objects: tuple[StripeObject, ...]
    license_id: str | None = None
    # Named only by `client_reference_id`, which anyone can set on a Payment Link's URL.
    by_reference: bool = False
    customer_level: bool = False  # applies to every license that holds an object of its customer

    @property
    def primary(self) -> StripeObject:
        return self.objects[0]

    @property
    def customer(self) -> str | None:
        return self.primary.customer

    @property
    def ids(self) -> set[str]:
        """Every id whose binding this event reads or writes (its objects and their links)."""
        return {i for obj in self.objects for i in (obj.id, *obj.links)}


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _id(value: Any) -> str | None:
    """Stripe fields hold an id, or the expanded object, or null."""
    if isinstance(value, dict):
        value = value.get("id")
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > MAX_ID or not value.isprintable():
        raise Unprocessable(f"malformed Stripe id {str(value)[:40]!r}")
    return value


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < MAX_CREATED else None


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def license_of(metadata: Any) -> str | None:
    value = _dict(metadata).get("license_id")
    if value is None or value == "":
        return None
    return valid_license_id(value)


def valid_license_id(value: Any) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_LICENSE_ID or not value.isprintable():
        raise BadLicenseId(f"license_id must be 1-{MAX_LICENSE_ID} printable characters")
    return value


def _links(*ids: str | None) -> frozenset[str]:
    return frozenset(i for i in ids if i)


def products_of(items: Any) -> list[str]:
    """Price and product ids of subscription items, invoice lines or Checkout line items."""
    found: set[str] = set()
    for item in _dict(items).get("data") or []:
        item = _dict(item)
        pricing = _dict(_dict(item.get("pricing")).get("price_details"))
        for price in (item.get("price"), item.get("plan"), pricing):
            price = _dict(price) if isinstance(price, dict) else {"id": price}
            for key in ("id", "price", "product"):
                value = price.get(key)
                value = value.get("id") if isinstance(value, dict) else value
                if isinstance(value, str) and value:
                    found.add(value)
    return sorted(found)


def _pays_a_period(lines: Any) -> bool:
    """Whether an invoice has a subscription line that is not a proration: the period itself, not a
    change within it (since 2025-03-31 `parent.subscription_item_details.proration`, before
    `type: subscription` and `proration`)."""
    for line in _dict(lines).get("data") or []:
        line = _dict(line)
        parent = _dict(line.get("parent"))
        if parent:
            details = _dict(parent.get("subscription_item_details"))
            if parent.get("type") == "subscription_item_details" and details.get("proration") is False:
                return True
        elif line.get("type") == "subscription" and line.get("proration") is False:
            return True
    return False


def _machine_count(value: Any) -> int | None:
    """A metadata value (Stripe keeps strings) as a machine count, or None."""
    if isinstance(value, str) and value.strip().isdigit() and len(value.strip()) <= 6:
        return int(value)
    return None


def machine_limits(metadata: Any, items: Any) -> dict[str, int]:
    """`max_machines` from the object's own metadata and `price_max_machines` from its prices'
    (subscription items, expanded Checkout line items), when they say so: nothing otherwise, so
    that the state of an object without them is what it always was (broker.licensing reads them)."""
    found: dict[str, int] = {}
    if (own := _machine_count(_dict(metadata).get("max_machines"))) is not None:
        found["max_machines"] = own
    prices = [
        n
        for item in _dict(items).get("data") or []
        if (n := _machine_count(_dict(_dict(_dict(item).get("price")).get("metadata")).get("max_machines"))) is not None
    ]
    if prices:
        found["price_max_machines"] = max(prices)
    return found


def report(event: Mapping[str, Any], *, fetched: bool = False) -> Reported | None:
    """The objects an event reports, or None for a type that changes no license.

    `fetched`: `data.object` was read from Stripe's API just now (it outranks webhook snapshots)."""
    obj: dict[str, Any] = event["data"]["object"]
    kind: str = event["type"]
    created = _int(event.get("created"))
    if created is None:
        raise Unprocessable("created is not a timestamp")
    reported = _report(kind, obj, created)
    if reported is not None and fetched:
        first = reported.primary
        objects = (
            StripeObject(
                first.id, first.kind, first.version, first.rank + FETCHED_RANK, first.state, first.customer, first.links
            ),
            *reported.objects[1:],
        )
        reported = Reported(objects, reported.license_id, reported.by_reference, reported.customer_level)
    return reported


def _report(kind: str, obj: dict[str, Any], created: int) -> Reported | None:
    if kind in CHECKOUT_EVENTS:
        return _checkout(obj, CHECKOUT_EVENTS[kind], created)
    if kind in SUBSCRIPTION_EVENTS:
        return _subscription(obj, created, notice=kind == "customer.subscription.trial_will_end")
    if kind in INVOICE_OUTCOMES and obj.get("object", "invoice") == "invoice":
        return _invoice(obj, INVOICE_OUTCOMES[kind], created)
    if kind == "invoice_payment.paid":
        return _invoice_payment(obj, created)
    if kind in CHARGE_EVENTS:
        return _charge(obj, created)
    if kind in REFUND_EVENTS:
        return _simple(obj, "refund", created, ("charge", "payment_intent"))
    if kind in DISPUTE_EVENTS:
        return _dispute(obj, created)
    if kind == "payment_intent.succeeded":
        return _payment_intent(obj, created)
    if kind == "entitlements.active_entitlement_summary.updated":
        customer = _id(obj.get("customer"))
        if customer is None:
            raise Unprocessable("entitlement summary without a customer")
        listed = _dict(obj.get("entitlements"))
        entitlements = listed.get("data") or []
        features = sorted({e["lookup_key"] for e in entitlements if isinstance(_dict(e).get("lookup_key"), str)})
        # The summary lists the first entitlements only; `has_more`: there are others.
        state = {"features": features, "partial": listed.get("has_more") is True}
        summary = StripeObject(entitlements_id(customer), "entitlements", created, 0, state, customer)
        return Reported((summary,), customer_level=True)
    if kind == "customer.deleted":
        customer = _id(obj.get("id"))
        if customer is None:
            raise Unprocessable("customer.deleted without an id")
        return Reported(
            (StripeObject(customer, "customer", created, 0, {"deleted": True}, customer),), customer_level=True
        )
    return None


def entitlements_id(customer: str) -> str:
    """The ledger id of a customer's entitlement summary (Stripe gives the summary no id)."""
    return f"entitlements:{customer}"


def complete_entitlements(summary: StripeObject, features: list[str]) -> StripeObject:
    """A partial summary completed with every active entitlement, read from Stripe's API."""
    state = {"features": sorted(set(features)), "partial": False}
    return replace(summary, rank=summary.rank + FETCHED_RANK, state=state)


def _own_id(obj: Mapping[str, Any]) -> str:
    own = _id(obj.get("id"))
    if own is None:
        raise Unprocessable("object without an id")
    return own


def _object(
    kind: str, obj: Mapping[str, Any], created: int, status: Any, state: dict[str, Any], *links: str | None
) -> StripeObject:
    """The ledger row of a Stripe object of its own id, ranked by its status."""
    return StripeObject(
        _own_id(obj), kind, created, rank_of(kind, status), state, _id(obj.get("customer")), _links(*links)
    )


def _checkout(session: dict[str, Any], outcome: str | None, created: int) -> Reported | None:
    mode = session.get("mode")
    if mode not in ("payment", "subscription"):
        return None  # mode=setup buys nothing
    if outcome is None:
        paid = session.get("payment_status") in ("paid", "no_payment_required")
        outcome = "paid" if paid else "unpaid"
    subscription, invoice = _id(session.get("subscription")), _id(session.get("invoice"))
    payment_intent = _id(session.get("payment_intent"))
    state = {
        "mode": mode,
        "status": outcome,
        "subscription": subscription,
        "invoice": invoice,
        "payment_intent": payment_intent,
        **machine_limits(session.get("metadata"), session.get("line_items")),
    }
    own = _object("checkout", session, created, outcome, state, subscription, invoice, payment_intent)
    objects = [own]
    if isinstance(session.get("line_items"), dict):  # never in a webhook; in a session read with expand
        objects.append(line_items(own, products_of(session["line_items"]), created))
    named = license_of(session.get("metadata"))
    reference = session.get("client_reference_id")
    if named is None and reference not in (None, ""):
        return Reported(tuple(objects), valid_license_id(reference), by_reference=True)
    return Reported(tuple(objects), named)


def line_items(session: StripeObject, products: list[str], created: int, *, fetched: bool = False) -> StripeObject:
    """A Checkout Session's line items (their price and product ids): an object of its own, since
    only Stripe's API gives them and later snapshots of the session do not carry them."""
    state = {"products": sorted(set(products))}
    rank = FETCHED_RANK if fetched else 0
    return StripeObject(
        line_items_id(session.id), "line_items", created, rank, state, session.customer, _links(session.id)
    )


def _subscription(sub: dict[str, Any], created: int, *, notice: bool) -> Reported:
    status = str(sub.get("status") or "incomplete")
    items = _dict(sub.get("items"))
    # Since API version 2025-03-31 the period lives on the items; before, on the subscription.
    ends = [e for e in (_int(_dict(i).get("current_period_end")) for i in items.get("data") or []) if e is not None]
    latest_invoice = _id(sub.get("latest_invoice"))
    state = {
        "status": status,
        "latest_invoice": latest_invoice,
        "current_period_end": max(ends) if ends else _int(sub.get("current_period_end")),
        "cancel_at": _int(sub.get("cancel_at")),
        "cancel_at_period_end": sub.get("cancel_at_period_end") is True,
        "trial_end": _int(sub.get("trial_end")),
        "collection_method": _str(sub.get("collection_method")),
        "products": products_of(items),
        **machine_limits(sub.get("metadata"), items),
    }
    own_id = _own_id(sub)
    customer = _id(sub.get("customer"))
    objects = [
        StripeObject(
            own_id, "subscription", created, rank_of("subscription", status), state, customer, _links(latest_invoice)
        )
    ]
    if notice:
        trial = {"subscription": own_id, "trial_end": state["trial_end"]}
        objects.append(
            StripeObject(f"{own_id}#trial_will_end", "trial_notice", created, 0, trial, customer, _links(own_id))
        )
    return Reported(tuple(objects), license_of(sub.get("metadata")))


def _invoice(invoice: dict[str, Any], outcome: str, created: int) -> Reported:
    details = _dict(_dict(invoice.get("parent")).get("subscription_details"))
    subscription = _id(details.get("subscription"))
    if subscription is None:  # before API version 2025-03-31
        details = _dict(invoice.get("subscription_details"))
        subscription = _id(invoice.get("subscription"))
    payments = set()
    for item in _dict(invoice.get("payments")).get("data") or []:  # the new shape, when expanded
        paid_with = _dict(_dict(item).get("payment"))
        payments |= {p for p in (_id(paid_with.get("charge")), _id(paid_with.get("payment_intent"))) if p}
    charge, payment_intent = _id(invoice.get("charge")), _id(invoice.get("payment_intent"))
    status = outcome
    hosted = _str(invoice.get("hosted_invoice_url"))
    state = {
        "status": status,
        "subscription": subscription,
        "created": _int(invoice.get("created")),
        "billing_reason": _str(invoice.get("billing_reason")),
        "charge": charge,
        "payment_intent": payment_intent,
        "payments": sorted(payments),
        "hosted_invoice_url": hosted,
        "collection_method": _str(invoice.get("collection_method")),
        "products": products_of(invoice.get("lines")),
        "period_line": _pays_a_period(invoice.get("lines")),
    }
    own = _object("invoice", invoice, created, status, state, subscription, charge, payment_intent, *payments)
    objects = [own]
    if outcome == "action_required":
        # An object of its own, so that a failed attempt of the same second (which outranks the
        # action required in the invoice's own snapshot) cannot erase it.
        notice = {"invoice": own.id, "subscription": subscription, "hosted_invoice_url": hosted}
        notice_id = f"{own.id}#payment_action_required"
        objects.append(StripeObject(notice_id, "action_notice", created, 0, notice, own.customer, _links(own.id)))
    return Reported(tuple(objects), license_of(details.get("metadata")) or license_of(invoice.get("metadata")))


def _invoice_payment(payment: dict[str, Any], created: int) -> Reported:
    # The payment under `payment` (2025-03-31 and later); some newer versions put it at the top.
    paid_with = _dict(payment.get("payment")) or payment
    invoice = _id(payment.get("invoice"))
    charge, payment_intent = _id(paid_with.get("charge")), _id(paid_with.get("payment_intent"))
    status = "paid"  # what invoice_payment.paid says, whatever the snapshot's status field holds
    state = {"invoice": invoice, "charge": charge, "payment_intent": payment_intent, "status": status}
    own = _object("invoice_payment", payment, created, status, state, invoice, charge, payment_intent)
    return Reported((own,))


def _charge(charge: dict[str, Any], created: int) -> Reported:
    captured = _int(charge.get("amount_captured")) or 0
    refunded_amount = _int(charge.get("amount_refunded")) or 0
    # `refunded` is true only for a full refund; a partial one leaves the payment standing.
    refunded = charge.get("refunded") is True or (captured > 0 and refunded_amount >= captured)
    payment_intent, invoice = _id(charge.get("payment_intent")), _id(charge.get("invoice"))
    status = _str(charge.get("status"))
    state = {
        "payment_intent": payment_intent,
        "invoice": invoice,
        "refunded": refunded,
        "amount_refunded": refunded_amount,
        "status": status,
    }
    own = StripeObject(
        _own_id(charge),
        "charge",
        created,
        charge_rank(refunded_amount, status),
        state,
        _id(charge.get("customer")),
        _links(payment_intent, invoice),
    )
    return Reported((own,), license_of(charge.get("metadata")))


def _payment_intent(intent: dict[str, Any], created: int) -> Reported:
    """A payment intent: a one-time purchase of its own when its metadata names the license (the
    Payment Element or an API integration, no Checkout), else only the link to its charges."""
    invoice = _id(intent.get("invoice"))  # before 2025-03-31: the invoice it paid
    named = license_of(intent.get("metadata"))
    status = _str(intent.get("status"))
    # An intent sells no Stripe product: with LICENSE_PRODUCTS, its metadata says which one it buys.
    product = _str(_dict(intent.get("metadata")).get("license_product"))
    state = {
        "status": status,
        "invoice": invoice,
        "purchase": named is not None,
        "products": [product] if product else [],
    }
    return Reported((_object("payment_intent", intent, created, status, state, invoice),), named)


def _dispute(dispute: dict[str, Any], created: int) -> Reported:
    charge, payment_intent = _id(dispute.get("charge")), _id(dispute.get("payment_intent"))
    status = _str(dispute.get("status"))
    card = _dict(_dict(dispute.get("payment_method_details")).get("card"))
    state = {
        "status": status,
        "charge": charge,
        "payment_intent": payment_intent,
        "reason": _str(dispute.get("reason")),
        "case_type": _str(card.get("case_type")),  # chargeback, inquiry, ... block, resolution (prevented)
    }
    own = _object("dispute", dispute, created, status, state, charge, payment_intent)
    return Reported((own,), license_of(dispute.get("metadata")))


def _simple(obj: dict[str, Any], kind: str, created: int, link_fields: tuple[str, ...]) -> Reported:
    linked = {f: _id(obj.get(f)) for f in link_fields}
    status = _str(obj.get("status"))
    state: dict[str, Any] = {"status": status, **linked}
    own = _object(kind, obj, created, status, state, *linked.values())
    return Reported((own,), license_of(obj.get("metadata")))


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
