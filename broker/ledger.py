"""The license ledger: one row per Stripe object a license depends on, and the license as a pure
function of those rows. No I/O here; broker.ledger_store reads and writes the rows.

Ordering, per object: Stripe does not order its deliveries and an event's `created` has one-second
resolution. An object takes an event's snapshot only when (created, rank, snapshot bytes) is greater
than what it holds, where rank orders the stages of one object's life (a subscription's `canceled`
after `past_due` after `active`, a paid invoice after a failed attempt, a refund's `failed` after
`succeeded`). Each object is therefore the maximum of its snapshots, whatever order they arrive in,
and events of different objects never overwrite each other. The license is `derive(objects)`, so any
delivery order of the same events ends in the same license (tests/test_ledger.py checks both with
hypothesis). Links between objects (a session names its subscription, an invoice its payments) only
ever accumulate.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import orjson

from broker.licenses import LicenseState

# What a dispute in each status does: inquiries withdraw no funds and never revoke; a chargeback
# revokes until it is won (https://docs.stripe.com/disputes/how-disputes-work).
# `prevented` (Visa Rapid Dispute Resolution) refunds the cardholder at once: it revokes too.
REVOKING_DISPUTES = frozenset({"needs_response", "under_review", "lost", "prevented"})
# A refund that did not go through restores the payment (https://docs.stripe.com/refunds#failed-refunds).
UNDONE_REFUNDS = frozenset({"failed", "canceled"})
# Subscription statuses a paid latest invoice moves to `active` (https://docs.stripe.com/billing/subscriptions/overview).
AWAITING_PAYMENT = frozenset({"incomplete", "past_due", "unpaid"})

# Which object decides `status` and `kind`: entitling objects first, then the one nearest to paying.
PRECEDENCE = (
    "active",
    "trialing",
    "past_due",
    "paid",
    "revoked",
    "unpaid",
    "paused",
    "incomplete",
    "payment_failed",
    "canceled",
    "incomplete_expired",
    "expired",
)

_SUBSCRIPTION_STAGES = ("incomplete", "trialing", "active", "past_due", "unpaid", "paused", "incomplete_expired")
# Ties within one second: the later stage of an object's life wins.
RANKS: dict[str, dict[str, int]] = {
    "subscription": {status: i for i, status in enumerate(_SUBSCRIPTION_STAGES, 1)} | {"canceled": 99},
    "checkout": {"unpaid": 0, "expired": 1, "failed": 1, "paid": 2},
    "trial": {"trialing": 0, "ended": 1},
    "invoice": {"draft": 0, "open": 1, "action_required": 2, "failed": 3, "paid": 4, "uncollectible": 5, "void": 5},
    "invoice_payment": {"open": 0, "paid": 1, "canceled": 2},
    "refund": {"pending": 0, "requires_action": 1, "succeeded": 2, "failed": 3, "canceled": 3},
    "dispute": {
        "warning_needs_response": 0,
        "warning_under_review": 1,
        "warning_closed": 2,
        "needs_response": 3,
        "under_review": 4,
        "won": 5,
        "lost": 5,
        "prevented": 5,
    },
}
# A snapshot read from Stripe's API (STRIPE_API_KEY) is the truth at the time it was read: it wins
# ties against webhook snapshots of the same second.
FETCHED_RANK = 1000

# Customer-level objects apply to every license that holds an object of their customer.
CUSTOMER_KINDS = frozenset({"entitlements", "customer"})
# Objects the broker keeps itself, not Stripe's: a trial without a card (broker.licensing.trials),
# `trial:<license id>`, state {"status": "trialing" | "ended", "trial_end": epoch seconds}. Its end
# is written as a new snapshot when it comes (no clock here): the rules stay pure. Never read from
# Stripe's API; kept as they are when the ledger is refilled from Stripe's events (rebuild).
BROKER_KINDS = frozenset({"trial"})


@dataclass(frozen=True, slots=True)
class StripeObject:
    """One ledger row: the fields of a Stripe object the rules read, and its ordering version."""

    id: str
    kind: str
    version: int  # `created` of the event that set this snapshot
    rank: int
    state: Mapping[str, Any]
    customer: str | None = None
    links: frozenset[str] = field(default_factory=frozenset)

    def row(self) -> dict[str, Any]:
        """Its `stripe_objects` columns, but for when it was written."""
        return {
            "id": self.id,
            "kind": self.kind,
            "version": self.version,
            "rank": self.rank,
            "customer": self.customer,
            "state": dict(self.state),
        }

    def order(self) -> tuple[int, int, bytes]:
        return self.version, self.rank, orjson.dumps(dict(self.state), option=orjson.OPT_SORT_KEYS)


def rank_of(kind: str, status: Any) -> int:
    if kind == "charge":
        return 0
    return RANKS.get(kind, {}).get(str(status), 0)


NEWER, SAME, OLDER = "newer", "same", "older"


def merge(current: StripeObject | None, proposed: StripeObject) -> tuple[StripeObject | None, str]:
    """(the object to store, or None when nothing changes; NEWER when the snapshot was taken, SAME
    when it is the one held, OLDER when a newer one is held)."""
    if current is None:
        return proposed, NEWER
    links = current.links | proposed.links
    order, held = proposed.order(), current.order()
    if order > held:
        return replace(proposed, links=links, customer=proposed.customer or current.customer), NEWER
    verdict = SAME if order == held else OLDER
    if links != current.links:
        return replace(current, links=links), verdict
    return None, verdict


def iso(timestamp: Any) -> str | None:
    if isinstance(timestamp, bool) or not isinstance(timestamp, int):
        return None
    try:
        return datetime.fromtimestamp(timestamp, UTC).isoformat()
    except (OverflowError, OSError, ValueError):
        return None


@dataclass(frozen=True, slots=True)
class _Candidate:
    status: str
    kind: str  # "subscription" | "perpetual" | "trial"
    entitled: bool
    version: int
    subscription: StripeObject | None = None
    cancels_at: int | None = None
    trial_end: int | None = None  # a broker trial's end (a subscription's is in its state)


class LicenseRules:
    """`derive`: the license of a set of ledger objects (see PRECEDENCE and docs/stripe.md)."""

    def __init__(self, entitled_statuses: Iterable[str], products: Iterable[str] = ()) -> None:
        self.entitled_statuses = frozenset(entitled_statuses) - {"revoked"}
        self.products = frozenset(products)

    def derive(self, objects: Iterable[StripeObject]) -> LicenseState:
        by_kind: dict[str, dict[str, StripeObject]] = defaultdict(dict)
        for obj in objects:
            by_kind[obj.kind][obj.id] = obj
        view = _View(by_kind, self.products, self.entitled_statuses)
        candidates = [*view.subscriptions(), *view.purchases(), *view.trials()]
        # A broker trial decides only where nothing bought does: a purchase made during the trial
        # is what the license is from then on (its lease is not cut at the trial's end).
        candidates.sort(key=lambda c: (not c.entitled, c.kind == "trial", _precedence(c.status), -c.version))
        deciding = candidates[0] if candidates else None
        entitling = [c for c in candidates if c.entitled]
        sub = deciding.subscription if deciding else None
        sub_state = sub.state if sub else {}
        cancels = [c.cancels_at for c in entitling]
        return {
            "status": deciding.status if deciding else "none",
            "entitled": bool(entitling),
            "kind": deciding.kind if deciding else None,
            "features": view.features(),
            "cancels_at": iso(max(cancels)) if entitling and None not in cancels else None,  # type: ignore[type-var]
            "cancel_at_period_end": bool(sub_state.get("cancel_at_period_end")),
            "current_period_end": iso(sub_state.get("current_period_end")),
            "trial_end": iso(sub_state.get("trial_end") if sub else (deciding.trial_end if deciding else None)),
            "customer": view.customer(),
            "subscription": sub.id if sub else None,
            "subscriptions": [
                {
                    "id": c.subscription.id,
                    "status": c.status,
                    "current_period_end": iso(c.subscription.state.get("current_period_end")),
                    "cancels_at": iso(c.cancels_at),
                }
                for c in entitling
                if c.subscription is not None
            ],
            "notice": view.notice(),
        }


def _precedence(status: str) -> int:
    return PRECEDENCE.index(status) if status in PRECEDENCE else len(PRECEDENCE)


class _View:
    """One derivation's look at the objects of a license."""

    def __init__(
        self,
        by_kind: Mapping[str, Mapping[str, StripeObject]],
        products: frozenset[str],
        entitled_statuses: frozenset[str],
    ) -> None:
        self.by_kind = by_kind
        self.products = products
        self.entitled_statuses = entitled_statuses
        self.sessions = by_kind.get("checkout", {})
        self.invoices = by_kind.get("invoice", {})
        self.deleted = {o.id: o.version for o in by_kind.get("customer", {}).values() if o.state.get("deleted")}
        self.revoked = self._revoked_payments()

    # -- payments -----------------------------------------------------------------------------

    def _revoked_payments(self) -> set[str]:
        """Charge and payment-intent ids whose money went back: fully refunded, or disputed."""
        undone: dict[str, int] = {}
        for refund in self.by_kind.get("refund", {}).values():
            charge = refund.state.get("charge")
            if charge and refund.state.get("status") in UNDONE_REFUNDS:
                undone[charge] = max(undone.get(charge, -1), refund.version)
        revoked: set[str] = set()
        for charge in self.by_kind.get("charge", {}).values():
            # A failed or canceled refund newer than the charge's last word puts the money back.
            if charge.state.get("refunded") and undone.get(charge.id, -1) < charge.version:
                revoked |= {
                    charge.id,
                    *([charge.state["payment_intent"]] if charge.state.get("payment_intent") else []),
                }
        for dispute in self.by_kind.get("dispute", {}).values():
            if dispute.state.get("status") in REVOKING_DISPUTES:
                revoked |= {p for p in (dispute.state.get("charge"), dispute.state.get("payment_intent")) if p}
        return revoked

    def _paid_by(self, invoice_id: str) -> set[str]:
        """Every charge and payment intent known to have paid an invoice (both API shapes)."""
        paid: set[str] = set()
        invoice = self.invoices.get(invoice_id)
        if invoice is not None:
            paid |= {p for p in (invoice.state.get("charge"), invoice.state.get("payment_intent")) if p}
            paid |= set(invoice.state.get("payments") or ())
        for payment in self.by_kind.get("invoice_payment", {}).values():
            if payment.state.get("invoice") == invoice_id:
                paid |= {p for p in (payment.state.get("payment_intent"), payment.state.get("charge")) if p}
        for charge in self.by_kind.get("charge", {}).values():
            if charge.state.get("invoice") == invoice_id:
                paid.add(charge.id)
        return paid

    # -- subscriptions ------------------------------------------------------------------------

    def subscriptions(self) -> list[_Candidate]:
        subs = dict(self.by_kind.get("subscription", {}))
        # A subscription known only from its Checkout Session, or only from its invoices, until its
        # own events arrive: Checkout creates it `incomplete` and activates it on payment.
        for session in self.sessions.values():
            sub_id = session.state.get("subscription")
            if session.state.get("mode") == "subscription" and sub_id and sub_id not in subs:
                status = "active" if session.state.get("status") == "paid" else "incomplete"
                subs[sub_id] = StripeObject(
                    sub_id,
                    "subscription",
                    -1,
                    0,
                    {"status": status, "latest_invoice": session.state.get("invoice")},
                    session.customer,
                )
        for invoice in self.invoices.values():
            sub_id = invoice.state.get("subscription")
            if sub_id and sub_id not in subs:
                subs[sub_id] = StripeObject(sub_id, "subscription", -1, 0, {"status": "incomplete"}, invoice.customer)
        return [c for c in map(self._subscription, subs.values()) if c is not None]

    def _subscription(self, sub: StripeObject) -> _Candidate | None:
        state = sub.state
        status = str(state.get("status") or "incomplete")
        if status == "incomplete" and any(
            s.state.get("subscription") == sub.id and s.state.get("status") == "paid" for s in self.sessions.values()
        ):
            status = "active"
        latest = self.latest_invoice(sub)
        invoice = self.invoices.get(latest) if latest else None
        # Only the latest invoice moves the subscription, and only by an event not older than the
        # subscription's own last word (https://docs.stripe.com/billing/subscriptions/overview).
        if invoice is not None and invoice.version >= sub.version:
            outcome = invoice.state.get("status")
            if outcome == "paid" and status in AWAITING_PAYMENT:
                status = "active"
            # A failed pending-update invoice leaves the subscription as it was (Stripe: "the
            # subscription continues to cycle as if the update never happened").
            elif (
                outcome == "failed"
                and status == "active"
                and invoice.version > sub.version
                and invoice.state.get("billing_reason") != "subscription_update"
            ):
                status = "past_due"
        if sub.customer in self.deleted and self.deleted[sub.customer] >= sub.version:
            status = "canceled"  # deleting a customer cancels its subscriptions at once
        if latest and status not in ("canceled", "incomplete_expired") and self._paid_by(latest) & self.revoked:
            status = "revoked"  # its current period was refunded or charged back
        if self.products and not (set(state.get("products") or ()) & self.products):
            return None  # LICENSE_PRODUCTS: another product's subscription grants nothing here
        cancels_at = state.get("cancel_at")
        if not isinstance(cancels_at, int) and state.get("cancel_at_period_end"):
            cancels_at = state.get("current_period_end")
        return _Candidate(
            status,
            "subscription",
            status in self.entitled_statuses,
            sub.version,
            sub,
            cancels_at if isinstance(cancels_at, int) else None,
        )

    def latest_invoice(self, sub: StripeObject) -> str | None:
        """The subscription's latest invoice: the one it names, unless a known invoice of it was
        created after that one (or, when that one is unknown here, after the subscription event)."""
        named = sub.state.get("latest_invoice")
        known = sorted(
            (i for i in self.invoices.values() if i.state.get("subscription") == sub.id),
            key=lambda i: (_int(i.state.get("created")), i.id),
        )
        if not named:
            return known[-1].id if known else None
        named_obj = self.invoices.get(named)
        floor = _int(named_obj.state.get("created")) if named_obj else sub.version
        newer = [i for i in known if i.id != named and _int(i.state.get("created")) > floor]
        return newer[-1].id if newer else str(named)

    # -- one-time purchases -------------------------------------------------------------------

    def purchases(self) -> list[_Candidate]:
        found = []
        for session in self.sessions.values():
            if session.state.get("mode") != "payment":
                continue
            outcome = session.state.get("status")
            status = {"paid": "paid", "failed": "payment_failed", "expired": "expired"}.get(str(outcome), "incomplete")
            payment = session.state.get("payment_intent")
            if status == "paid" and payment and payment in self.revoked:
                status = "revoked"
            if self.products and not (set(session.state.get("products") or ()) & self.products):
                continue  # LICENSE_PRODUCTS: only purchases whose line items are known and listed
            found.append(_Candidate(status, "perpetual", status == "paid", session.version))
        return found

    # -- trials the broker gives (no Stripe object) --------------------------------------------

    def trials(self) -> list[_Candidate]:
        """A running trial entitles whatever ENTITLED_STATUSES says (the seller turned trials on
        with LICENSE_TRIAL_DAYS); an ended one is `expired`."""
        found = []
        for trial in self.by_kind.get("trial", {}).values():
            running = trial.state.get("status") == "trialing"
            end = _int(trial.state.get("trial_end")) or None
            found.append(_Candidate("trialing" if running else "expired", "trial", running, trial.version,
                                    cancels_at=end, trial_end=end))  # fmt: skip
        return found

    # -- customer-level facts and notices -----------------------------------------------------

    def features(self) -> list[str]:
        features: set[str] = set()
        for summary in self.by_kind.get("entitlements", {}).values():
            if summary.customer in self.deleted and self.deleted[summary.customer] >= summary.version:
                continue
            features |= set(summary.state.get("features") or ())
        return sorted(features)

    def customer(self) -> str | None:
        customers = sorted(
            (o.version, o.customer)
            for kind in ("checkout", "subscription")
            for o in self.by_kind.get(kind, {}).values()
            if o.customer
        )
        return customers[-1][1] if customers else None

    def notice(self) -> dict[str, Any] | None:
        for invoice in sorted(self.invoices.values(), key=lambda i: -i.version):
            if invoice.state.get("status") == "action_required":
                return {
                    "type": "payment_action_required",
                    "invoice": invoice.id,
                    "hosted_invoice_url": invoice.state.get("hosted_invoice_url"),
                }
        subs = self.by_kind.get("subscription", {})
        for notice in sorted(self.by_kind.get("trial_notice", {}).values(), key=lambda n: -n.version):
            sub = subs.get(str(notice.state.get("subscription")))
            # Gone once the trial ends (no longer trialing) or is extended (another trial_end).
            if (
                sub
                and sub.state.get("status") == "trialing"
                and sub.state.get("trial_end") == notice.state.get("trial_end")
            ):
                return {"type": "trial_will_end", "subscription": sub.id, "trial_end": iso(sub.state.get("trial_end"))}
        return None


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0
