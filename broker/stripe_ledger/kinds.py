"""The kinds of object the ledger holds, one registry entry each (the dj-stripe model: one class per
Stripe object, a registry that refuses unknown ones). Pure: no I/O (`retrieve` says how the refresh
reads an object, broker.stripe_ledger.refresh makes the call).

An entry (`KindSpec`) holds everything the broker knows of its kind: the Stripe object and its docs
page, the event types that report it and the parser that reads them, the ranks that order its
snapshots of one second (broker.stripe_ledger.ledger explains the order), whether it applies to
every license of its customer, and how to read one object of it from Stripe's API. Every table
that used to list kinds is derived from `KINDS`: the event types users enable (EVENT_TYPES,
docs/stripe.md), the customer-level and broker-kept kinds the ledger store and the ingest select by,
the refresh's RETRIEVE. The registry refuses to load while `broker.stripe_ledger.ledger.Kind`
and its entries disagree, or an entry misses a part, or two kinds claim one event type;
tests/test_kinds.py checks each part against Stripe's published objects.

Both API shapes are read: before 2025-03-31 an invoice names its subscription in `subscription` and
`subscription_details` and its payment in `charge` / `payment_intent`, a charge names its
`invoice`, and a subscription holds `current_period_end`; since then the subscription is under
`parent.subscription_details`, payments are `invoice_payment` objects (`invoice_payment.paid`) and
periods are on the subscription items.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from broker.stripe_ledger.fields import (
    Reported,
    Unprocessable,
    as_dict,
    int_field,
    license_of,
    link_set,
    machine_limits,
    own_id,
    pays_a_period,
    products_of,
    stripe_id,
    text,
    valid_license_id,
)
from broker.stripe_ledger.ledger import (
    FETCHED_RANK,
    KIND_NAMES,
    MAX_AMOUNT,
    Kind,
    StripeObject,
    UnknownKind,
    as_kind,
    line_items_id,
)

if TYPE_CHECKING:
    import stripe

# (the kind's entry, the event's type, its `data.object`, its `created`) -> what the event reports;
# None for an event that changes no license (a Checkout Session in setup mode, an invoice event
# whose object is not an invoice).
Parse = Callable[["KindSpec", str, dict[str, Any], int], "Reported | None"]
# (the client, the object's id, the request's options) -> the object as Stripe's API reads it now.
Retrieve = Callable[["stripe.StripeClient", str, "stripe.RequestOptions"], Awaitable["stripe.StripeObject"]]


@dataclass(frozen=True, slots=True)
class KindSpec:
    """One kind of ledger object. A kind is one of three: reported by Stripe's events (`events` and
    `parse`), a part of another kind's report (`part_of`: the parser of that kind makes it), or kept
    by the broker itself (`broker`)."""

    kind: Kind
    docs: str  # the Stripe docs page of the object (or of what the broker keeps in its place)
    stripe_object: str | None = None  # the `object` field of its Stripe object; None: no such object
    # Event type -> what it says of the object (the outcome the parser records), or None when the
    # object's own fields say it all.
    events: Mapping[str, str | None] = field(default_factory=dict)
    parse: Parse | None = None
    # Status -> its stage in the object's life: of two snapshots of one second, the later stage
    # wins. Empty: the kind has no stages (a snapshot replaces the one of the same second by bytes).
    ranks: Mapping[str, int] = field(default_factory=dict)
    customer_level: bool = False  # applies to every license that holds an object of its customer
    retrieve: Retrieve | None = None
    part_of: Kind | None = None
    broker: bool = False

    def rank(self, status: Any) -> int:
        return self.ranks.get(str(status), 0)

    def read(self, event_type: str, obj: dict[str, Any], created: int) -> Reported | None:
        """What an event of this kind reports."""
        if self.parse is None:
            raise UnknownKind(f"no event reports a {self.kind} of its own")
        return self.parse(self, event_type, obj, created)

    def problems(self) -> list[str]:
        """What this entry misses (nothing for a complete one)."""
        found = []
        origins = [bool(self.events), self.part_of is not None, self.broker]
        if sum(origins) != 1:
            found.append("is not exactly one of: reported by events, part of another kind, kept by the broker")
        if bool(self.events) != (self.parse is not None):
            found.append("has events without a parser, or a parser without events")
        if not self.docs.startswith("https://docs.stripe.com/"):
            found.append("links no Stripe docs page")
        if self.events and self.stripe_object is None:
            found.append("is reported by events but names no Stripe object")
        # What the refresh cannot read has a reason: no single object (customer-level), not an
        # object of Stripe's own (a part), or not Stripe's at all (the broker's).
        if (self.retrieve is None) != (self.customer_level or self.part_of is not None or self.broker):
            found.append("has no way to be read from Stripe's API, or one it cannot use")
        return [f"{self.kind} {problem}" for problem in found]


# -- the parsers, one per kind reported by events -------------------------------------------------


def _object(
    spec: KindSpec, obj: Mapping[str, Any], created: int, status: Any, state: dict[str, Any], *links: str | None
) -> StripeObject:
    """The ledger row of a Stripe object of its own id, ranked by its status."""
    return StripeObject(
        own_id(obj), spec.kind, created, spec.rank(status), state, stripe_id(obj.get("customer")), link_set(*links)
    )


def _checkout(spec: KindSpec, event_type: str, session: dict[str, Any], created: int) -> Reported | None:
    mode = session.get("mode")
    if mode not in ("payment", "subscription"):
        return None  # mode=setup buys nothing
    outcome = spec.events[event_type]
    if outcome is None:
        paid = session.get("payment_status") in ("paid", "no_payment_required")
        outcome = "paid" if paid else "unpaid"
    subscription, invoice = stripe_id(session.get("subscription")), stripe_id(session.get("invoice"))
    payment_intent = stripe_id(session.get("payment_intent"))
    state = {
        "mode": mode,
        "status": outcome,
        "subscription": subscription,
        "invoice": invoice,
        "payment_intent": payment_intent,
        **machine_limits(session.get("metadata"), session.get("line_items")),
    }
    own = _object(spec, session, created, outcome, state, subscription, invoice, payment_intent)
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
        line_items_id(session.id), "line_items", created, rank, state, session.customer, link_set(session.id)
    )


def _subscription(spec: KindSpec, event_type: str, sub: dict[str, Any], created: int) -> Reported:
    status = str(sub.get("status") or "incomplete")
    items = as_dict(sub.get("items"))
    # Since API version 2025-03-31 the period lives on the items; before, on the subscription.
    periods = (int_field(as_dict(i).get("current_period_end")) for i in items.get("data") or [])
    ends = [e for e in periods if e is not None]
    latest_invoice = stripe_id(sub.get("latest_invoice"))
    state = {
        "status": status,
        "latest_invoice": latest_invoice,
        "current_period_end": max(ends) if ends else int_field(sub.get("current_period_end")),
        "cancel_at": int_field(sub.get("cancel_at")),
        "cancel_at_period_end": sub.get("cancel_at_period_end") is True,
        "trial_end": int_field(sub.get("trial_end")),
        "collection_method": text(sub.get("collection_method")),
        "products": products_of(items),
        **machine_limits(sub.get("metadata"), items),
    }
    own = _object(spec, sub, created, status, state, latest_invoice)
    objects = [own]
    if spec.events[event_type] == "trial_will_end":
        trial = {"subscription": own.id, "trial_end": state["trial_end"]}
        notice_id = f"{own.id}#trial_will_end"
        objects.append(StripeObject(notice_id, "trial_notice", created, 0, trial, own.customer, link_set(own.id)))
    return Reported(tuple(objects), license_of(sub.get("metadata")))


def _invoice(spec: KindSpec, event_type: str, invoice: dict[str, Any], created: int) -> Reported | None:
    if invoice.get("object", spec.stripe_object) != spec.stripe_object:
        return None
    outcome = str(spec.events[event_type])
    details = as_dict(as_dict(invoice.get("parent")).get("subscription_details"))
    subscription = stripe_id(details.get("subscription"))
    if subscription is None:  # before API version 2025-03-31
        details = as_dict(invoice.get("subscription_details"))
        subscription = stripe_id(invoice.get("subscription"))
    payments = set()
    for item in as_dict(invoice.get("payments")).get("data") or []:  # the new shape, when expanded
        paid_with = as_dict(as_dict(item).get("payment"))
        payments |= {p for p in (stripe_id(paid_with.get("charge")), stripe_id(paid_with.get("payment_intent"))) if p}
    charge, payment_intent = stripe_id(invoice.get("charge")), stripe_id(invoice.get("payment_intent"))
    hosted = text(invoice.get("hosted_invoice_url"))
    state = {
        "status": outcome,
        "subscription": subscription,
        "created": int_field(invoice.get("created")),
        "billing_reason": text(invoice.get("billing_reason")),
        "charge": charge,
        "payment_intent": payment_intent,
        "payments": sorted(payments),
        "hosted_invoice_url": hosted,
        "collection_method": text(invoice.get("collection_method")),
        "products": products_of(invoice.get("lines")),
        "period_line": pays_a_period(invoice.get("lines")),
    }
    own = _object(spec, invoice, created, outcome, state, subscription, charge, payment_intent, *payments)
    objects = [own]
    if outcome == "action_required":
        # An object of its own, so that a failed attempt of the same second (which outranks the
        # action required in the invoice's own snapshot) cannot erase it.
        notice = {"invoice": own.id, "subscription": subscription, "hosted_invoice_url": hosted}
        notice_id = f"{own.id}#payment_action_required"
        objects.append(StripeObject(notice_id, "action_notice", created, 0, notice, own.customer, link_set(own.id)))
    return Reported(tuple(objects), license_of(details.get("metadata")) or license_of(invoice.get("metadata")))


def _invoice_payment(spec: KindSpec, event_type: str, payment: dict[str, Any], created: int) -> Reported:
    # The payment under `payment` (2025-03-31 and later); some newer versions put it at the top.
    paid_with = as_dict(payment.get("payment")) or payment
    invoice = stripe_id(payment.get("invoice"))
    charge, payment_intent = stripe_id(paid_with.get("charge")), stripe_id(paid_with.get("payment_intent"))
    status = spec.events[event_type]  # what invoice_payment.paid says, whatever the snapshot's status field holds
    state = {"invoice": invoice, "charge": charge, "payment_intent": payment_intent, "status": status}
    return Reported((_object(spec, payment, created, status, state, invoice, charge, payment_intent),))


def _charge(spec: KindSpec, event_type: str, charge: dict[str, Any], created: int) -> Reported:
    captured = int_field(charge.get("amount_captured")) or 0
    refunded_amount = int_field(charge.get("amount_refunded")) or 0
    # `refunded` is true only for a full refund; a partial one leaves the payment standing.
    refunded = charge.get("refunded") is True or (captured > 0 and refunded_amount >= captured)
    payment_intent, invoice = stripe_id(charge.get("payment_intent")), stripe_id(charge.get("invoice"))
    status = text(charge.get("status"))
    state = {
        "payment_intent": payment_intent,
        "invoice": invoice,
        "refunded": refunded,
        "amount_refunded": refunded_amount,
        "status": status,
    }
    own = StripeObject(
        own_id(charge),
        spec.kind,
        created,
        charge_rank(spec, refunded_amount, status),
        state,
        stripe_id(charge.get("customer")),
        link_set(payment_intent, invoice),
    )
    return Reported((own,), license_of(charge.get("metadata")))


def charge_rank(spec: KindSpec, amount_refunded: int, status: Any) -> int:
    """A charge's snapshots are ordered by `amount_refunded`, which only grows (refunds add to it,
    https://docs.stripe.com/api/charges/object#charge_object-amount_refunded), then by status (a
    pending charge settles as succeeded or failed): two partial refunds of one second that add up to
    the whole charge end in the full refund, whatever order they arrive in."""
    return min(amount_refunded, MAX_AMOUNT) * 4 + spec.rank(status)


def _refund(spec: KindSpec, event_type: str, refund: dict[str, Any], created: int) -> Reported:
    charge, payment_intent = stripe_id(refund.get("charge")), stripe_id(refund.get("payment_intent"))
    status = text(refund.get("status"))
    state: dict[str, Any] = {"status": status, "charge": charge, "payment_intent": payment_intent}
    own = _object(spec, refund, created, status, state, charge, payment_intent)
    return Reported((own,), license_of(refund.get("metadata")))


def _payment_intent(spec: KindSpec, event_type: str, intent: dict[str, Any], created: int) -> Reported:
    """A payment intent: a one-time purchase of its own when its metadata names the license (the
    Payment Element or an API integration, no Checkout), else only the link to its charges."""
    invoice = stripe_id(intent.get("invoice"))  # before 2025-03-31: the invoice it paid
    named = license_of(intent.get("metadata"))
    status = text(intent.get("status"))
    # An intent sells no Stripe product: with LICENSE_PRODUCTS, its metadata says which one it buys.
    product = text(as_dict(intent.get("metadata")).get("license_product"))
    state = {
        "status": status,
        "invoice": invoice,
        "purchase": named is not None,
        "products": [product] if product else [],
    }
    return Reported((_object(spec, intent, created, status, state, invoice),), named)


def _dispute(spec: KindSpec, event_type: str, dispute: dict[str, Any], created: int) -> Reported:
    charge, payment_intent = stripe_id(dispute.get("charge")), stripe_id(dispute.get("payment_intent"))
    status = text(dispute.get("status"))
    card = as_dict(as_dict(dispute.get("payment_method_details")).get("card"))
    state = {
        "status": status,
        "charge": charge,
        "payment_intent": payment_intent,
        "reason": text(dispute.get("reason")),
        "case_type": text(card.get("case_type")),  # chargeback, inquiry, ... block, resolution (prevented)
    }
    own = _object(spec, dispute, created, status, state, charge, payment_intent)
    return Reported((own,), license_of(dispute.get("metadata")))


def _entitlements(spec: KindSpec, event_type: str, summary: dict[str, Any], created: int) -> Reported:
    customer = stripe_id(summary.get("customer"))
    if customer is None:
        raise Unprocessable("entitlement summary without a customer")
    listed = as_dict(summary.get("entitlements"))
    entitlements = listed.get("data") or []
    features = sorted({e["lookup_key"] for e in entitlements if isinstance(as_dict(e).get("lookup_key"), str)})
    # The summary lists the first entitlements only; `has_more`: there are others.
    state = {"features": features, "partial": listed.get("has_more") is True}
    own = StripeObject(entitlements_id(customer), spec.kind, created, 0, state, customer)
    return Reported((own,), customer_level=spec.customer_level)


def entitlements_id(customer: str) -> str:
    """The ledger id of a customer's entitlement summary (Stripe gives the summary no id)."""
    return f"entitlements:{customer}"


def complete_entitlements(summary: StripeObject, features: list[str]) -> StripeObject:
    """A partial summary completed with every active entitlement, read from Stripe's API."""
    state = {"features": sorted(set(features)), "partial": False}
    return replace(summary, rank=summary.rank + FETCHED_RANK, state=state)


def _customer(spec: KindSpec, event_type: str, customer: dict[str, Any], created: int) -> Reported:
    customer_id = stripe_id(customer.get("id"))
    if customer_id is None:
        raise Unprocessable(f"{event_type} without an id")
    own = StripeObject(customer_id, spec.kind, created, 0, {"deleted": True}, customer_id)
    return Reported((own,), customer_level=spec.customer_level)


# -- the registry ---------------------------------------------------------------------------------

_SUBSCRIPTION_STAGES = ("incomplete", "trialing", "active", "past_due", "unpaid", "paused", "incomplete_expired")

_ENTRIES = (
    KindSpec(
        "subscription",
        "https://docs.stripe.com/api/subscriptions/object",
        "subscription",
        events={
            "customer.subscription.created": None,
            "customer.subscription.updated": None,
            "customer.subscription.deleted": None,
            "customer.subscription.paused": None,
            "customer.subscription.resumed": None,
            # Also a notice of its own (trial_notice), until the trial ends or is extended.
            "customer.subscription.trial_will_end": "trial_will_end",
            "customer.subscription.pending_update_applied": None,
            "customer.subscription.pending_update_expired": None,
        },
        parse=_subscription,
        # The statuses in the order a subscription's life goes through them
        # (https://docs.stripe.com/billing/subscriptions/overview#subscription-statuses); canceled is final.
        ranks={status: i for i, status in enumerate(_SUBSCRIPTION_STAGES, 1)} | {"canceled": 99},
        retrieve=lambda c, i, o: c.v1.subscriptions.retrieve_async(i, options=o),
    ),
    KindSpec(
        "checkout",
        "https://docs.stripe.com/api/checkout/sessions/object",
        "checkout.session",
        # What each event says of the session (https://docs.stripe.com/payments/checkout/fulfill-orders):
        # `completed` is paid, or unpaid until an async payment settles.
        events={
            "checkout.session.completed": None,
            "checkout.session.async_payment_succeeded": "paid",
            "checkout.session.async_payment_failed": "failed",
            "checkout.session.expired": "expired",
        },
        parse=_checkout,
        ranks={"unpaid": 0, "expired": 1, "failed": 1, "paid": 2},
        retrieve=lambda c, i, o: c.v1.checkout.sessions.retrieve_async(i, options=o),
    ),
    # Only Stripe's API gives a session's line items and later snapshots of the session do not carry
    # them (https://docs.stripe.com/api/checkout/sessions/line_items): read once, by the ingest.
    KindSpec("line_items", "https://docs.stripe.com/api/checkout/sessions/line_items", part_of="checkout"),
    KindSpec(
        "invoice",
        "https://docs.stripe.com/api/invoices/object",
        "invoice",
        # What each invoice event the rules use says of the invoice. Any other invoice.* event
        # (created, updated, finalized, ...) is ignored: an `invoice.updated` of an open invoice would
        # otherwise erase the failed attempt or the action required that a payment event reported.
        events={
            "invoice.paid": "paid",
            "invoice.payment_succeeded": "paid",
            "invoice.payment_failed": "failed",
            # Also a notice of its own (action_notice), until the invoice is settled.
            "invoice.payment_action_required": "action_required",
            "invoice.voided": "void",
            "invoice.marked_uncollectible": "uncollectible",
        },
        parse=_invoice,
        # https://docs.stripe.com/invoicing/overview#invoice-statuses: paid, void and uncollectible are final.
        ranks={"draft": 0, "open": 1, "action_required": 2, "failed": 3, "paid": 4, "uncollectible": 5, "void": 5},
        retrieve=lambda c, i, o: c.v1.invoices.retrieve_async(i, options=o),
    ),
    # A "confirm your payment" notice (https://docs.stripe.com/billing/subscriptions/overview), an
    # object of its own so that a failed attempt of the same second cannot erase it.
    KindSpec("action_notice", "https://docs.stripe.com/billing/subscriptions/overview", part_of="invoice"),
    KindSpec(
        "invoice_payment",
        "https://docs.stripe.com/api/invoice-payment/object",
        "invoice_payment",
        events={"invoice_payment.paid": "paid"},
        parse=_invoice_payment,
        ranks={"open": 0, "paid": 1, "canceled": 2},
        retrieve=lambda c, i, o: c.v1.invoice_payments.retrieve_async(i, options=o),
    ),
    KindSpec(
        "charge",
        "https://docs.stripe.com/api/charges/object",
        "charge",
        events={
            "charge.succeeded": None,
            "charge.refunded": None,
            "charge.updated": None,
            "charge.captured": None,
            "charge.failed": None,
            "charge.pending": None,
        },
        parse=_charge,
        # After `amount_refunded` (charge_rank): a pending charge settles as succeeded or failed.
        ranks={"pending": 0, "succeeded": 1, "failed": 1},
        retrieve=lambda c, i, o: c.v1.charges.retrieve_async(i, options=o),
    ),
    KindSpec(
        "refund",
        "https://docs.stripe.com/api/refunds/object",
        "refund",
        events={"refund.created": None, "refund.updated": None, "refund.failed": None, "charge.refund.updated": None},
        parse=_refund,
        # A refund that did not go through comes after its success (https://docs.stripe.com/refunds#failed-refunds).
        ranks={"pending": 0, "requires_action": 1, "succeeded": 2, "failed": 3, "canceled": 3},
        retrieve=lambda c, i, o: c.v1.refunds.retrieve_async(i, options=o),
    ),
    KindSpec(
        "dispute",
        "https://docs.stripe.com/api/disputes/object",
        "dispute",
        events={
            "charge.dispute.created": None,
            "charge.dispute.updated": None,
            "charge.dispute.closed": None,
            "charge.dispute.funds_withdrawn": None,
            "charge.dispute.funds_reinstated": None,
        },
        parse=_dispute,
        # Inquiries (`warning_*`) before chargebacks, each closed last
        # (https://docs.stripe.com/disputes/how-disputes-work).
        ranks={
            "warning_needs_response": 0,
            "warning_under_review": 1,
            "warning_closed": 2,
            "needs_response": 3,
            "under_review": 4,
            "won": 5,
            "lost": 5,
            "prevented": 5,
        },
        retrieve=lambda c, i, o: c.v1.disputes.retrieve_async(i, options=o),
    ),
    KindSpec(
        "payment_intent",
        "https://docs.stripe.com/api/payment_intents/object",
        "payment_intent",
        events={"payment_intent.succeeded": None},
        parse=_payment_intent,
        # https://docs.stripe.com/payments/paymentintents/lifecycle
        ranks={
            "requires_payment_method": 0,
            "requires_confirmation": 1,
            "requires_action": 2,
            "processing": 3,
            "requires_capture": 4,
            "succeeded": 5,
            "canceled": 5,
        },
        retrieve=lambda c, i, o: c.v1.payment_intents.retrieve_async(i, options=o),
    ),
    # A subscription's "your trial ends soon" notice (`customer.subscription.trial_will_end`,
    # https://docs.stripe.com/billing/subscriptions/trials).
    KindSpec("trial_notice", "https://docs.stripe.com/billing/subscriptions/trials", part_of="subscription"),
    KindSpec(
        "entitlements",
        "https://docs.stripe.com/api/entitlements/active-entitlement-summary/object",
        "entitlements.active_entitlement_summary",
        events={"entitlements.active_entitlement_summary.updated": None},
        parse=_entitlements,
        customer_level=True,
    ),
    KindSpec(
        "customer",
        "https://docs.stripe.com/api/customers/delete",  # deleting a customer cancels its subscriptions
        "customer",
        events={"customer.deleted": None},
        parse=_customer,
        customer_level=True,
    ),
    # The broker's own: a trial without a card (broker.licensing.trials), `trial:<license id>`, state
    # {"status": "trialing" | "ended", "trial_end": epoch seconds}; the docs page is Stripe's trials,
    # which it stands in for. Its end is written as a new snapshot when it comes (no clock here): the
    # rules stay pure. Never read from Stripe's API; kept as they are when the ledger is refilled
    # from Stripe's events (rebuild). An ended trial comes after the running one.
    KindSpec(
        "trial", "https://docs.stripe.com/billing/subscriptions/trials", ranks={"trialing": 0, "ended": 1}, broker=True
    ),
)


def build_registry(entries: Iterable[KindSpec]) -> Mapping[Kind, KindSpec]:
    """The entries by kind; raises on a kind listed twice, a kind of `Kind` without an entry, an
    incomplete entry, an event type two kinds claim, or a part of a kind no event reports."""
    registry: dict[Kind, KindSpec] = {}
    claimed: dict[str, Kind] = {}
    problems = []
    for spec in entries:
        if spec.kind in registry:
            problems.append(f"{spec.kind} is registered twice")
        registry[as_kind(spec.kind)] = spec
        problems += spec.problems()
        if spec.part_of is not None and as_kind(spec.part_of) == spec.kind:
            problems.append(f"{spec.kind} is a part of itself")
        for event_type in spec.events:
            if event_type in claimed:
                problems.append(f"{event_type} is claimed by {claimed[event_type]} and {spec.kind}")
            claimed[event_type] = spec.kind
    problems += [f"{kind} has no entry" for kind in sorted(KIND_NAMES - set(registry))]
    problems += [
        f"{spec.kind} is a part of {spec.part_of}, which no event reports"
        for spec in registry.values()
        if spec.part_of is not None and spec.part_of in registry and not registry[spec.part_of].events
    ]
    if problems:
        raise UnknownKind("the kind registry is incomplete: " + "; ".join(problems))
    return MappingProxyType(registry)


KINDS: Mapping[Kind, KindSpec] = build_registry(_ENTRIES)


def spec_of(kind: str) -> KindSpec:
    """The entry of a kind; UnknownKind for any other string."""
    return KINDS[as_kind(kind)]


# -- the tables derived from the registry ---------------------------------------------------------

# Event type -> the kind it reports.
BY_EVENT: Mapping[str, KindSpec] = MappingProxyType({t: s for s in KINDS.values() for t in s.events})
# Every event type that can change a license; docs/stripe.md lists them for the user to enable.
EVENT_TYPES: tuple[str, ...] = tuple(sorted(BY_EVENT))
# Customer-level objects apply to every license that holds an object of their customer.
CUSTOMER_KINDS: frozenset[Kind] = frozenset(k for k, s in KINDS.items() if s.customer_level)
# Objects the broker keeps itself: never read from Stripe's API, kept as they are when the ledger is
# refilled from Stripe's events (rebuild).
BROKER_KINDS: frozenset[Kind] = frozenset(k for k, s in KINDS.items() if s.broker)
# Kind -> how the refresh reads one object of it. Customer-level kinds, parts and the broker's own
# have no single Stripe object to read: their events apply as they come.
RETRIEVE: Mapping[Kind, Retrieve] = MappingProxyType(
    {k: s.retrieve for k, s in KINDS.items() if s.retrieve is not None}
)


def rank_of(kind: Kind, status: Any) -> int:
    return KINDS[kind].rank(status)


def report(event: Mapping[str, Any], *, fetched: bool = False) -> Reported | None:
    """The objects an event reports, or None for a type that changes no license.

    `fetched`: `data.object` was read from Stripe's API just now (it outranks webhook snapshots)."""
    obj: dict[str, Any] = event["data"]["object"]
    event_type: str = event["type"]
    created = int_field(event.get("created"))
    if created is None:
        raise Unprocessable("created is not a timestamp")
    spec = BY_EVENT.get(event_type)
    reported = spec.read(event_type, obj, created) if spec is not None else None
    if reported is not None and fetched:
        first = reported.primary
        objects = (replace(first, rank=first.rank + FETCHED_RANK), *reported.objects[1:])
        reported = replace(reported, objects=objects)
    return reported
