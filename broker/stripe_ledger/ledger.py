"""The license ledger: one row per Stripe object a license depends on, and the license as a pure
function of those rows. No I/O here; broker.stripe_ledger.store reads and writes the rows.

Ordering, per object: Stripe does not order its deliveries and an event's `created` has one-second
resolution. An object takes an event's snapshot only when (created, rank, snapshot bytes) is greater
than what it holds, where rank orders the stages of one object's life (a subscription's `canceled`
after `past_due` after `active`, a paid invoice after a failed attempt, a refund's `failed` after
`succeeded`, a charge's larger `amount_refunded` after a smaller one). Each object is therefore the
maximum of its snapshots, whatever order they arrive in, and events of different objects never
overwrite each other. What must outlive a later snapshot of its object is an object of its own: a
3-D Secure notice (a failed attempt of the same second outranks the invoice's action required), a
Checkout Session's line items (no later event of the session carries them). The license is
`derive(objects)`, so any delivery order of the same events ends in the same license
(tests/test_ledger.py checks both with hypothesis). Links between objects (a session names its
subscription, an invoice its payments) only ever accumulate.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal, cast, get_args

import orjson

from broker.storage.licenses import LicenseState

if TYPE_CHECKING:
    from broker.settings import Settings

# Dispute statuses in which the cardholder has the money back: a chargeback withdraws the funds at
# once, until it is won (https://docs.stripe.com/disputes/how-disputes-work); inquiries
# (`warning_*`) withdraw nothing and never revoke. `prevented`: Stripe's dispute prevention stopped
# the chargeback before it was filed, either by refunding the cardholder ("automatically resolve
# (refund)", `case_type: resolution`) or by blocking it with Compelling Evidence ("Block disputes
# entirely", `case_type: block`), where no money moves and nothing is revoked
# (https://docs.stripe.com/disputes/prevention-preview,
# https://docs.stripe.com/changelog/basil/2025-08-27/add-preventions-to-dispute).
REVOKING_DISPUTES = frozenset({"needs_response", "under_review", "lost", "prevented"})
BLOCKED_DISPUTE = "block"
# DISPUTE_REVOKES=license: a dispute lost, or a fraud claim (the cardholder says they did not
# authorize the payment, https://docs.stripe.com/disputes/categories) with the money back, revokes
# the whole license until it is won, not only the period its payment paid for (docs/stripe.md).
FRAUD_REASON = "fraudulent"
# A refund that did not go through restores the payment (https://docs.stripe.com/refunds#failed-refunds).
UNDONE_REFUNDS = frozenset({"failed", "canceled"})
# Subscription statuses a paid latest invoice moves to `active` (https://docs.stripe.com/billing/subscriptions/overview).
AWAITING_PAYMENT = frozenset({"incomplete", "past_due", "unpaid"})
# A failed payment of the latest invoice makes a subscription past_due only when Stripe charges it
# automatically. One billed by email "becomes `past_due` when its invoice is not paid by the due
# date" (https://docs.stripe.com/api/subscriptions/object#subscription_object-status), however many
# attempts fail on the hosted invoice page before then: its own status says so.
BILLED_BY_EMAIL = "send_invoice"
# The invoices that pay for a subscription's period, the one a refund or a chargeback revokes: the
# first and each renewal (https://docs.stripe.com/api/invoices/object#invoice_object-billing_reason).
# A `subscription_update` invoice pays for a period only when the change restarts the billing cycle
# (a new interval: Stripe charges the new price at once and resets the billing date,
# https://docs.stripe.com/api/subscriptions/update), which shows as a line that is not a proration;
# a proration invoice (`proration_behavior=always_invoice`) pays for a change within the period.
PERIOD_BILLING_REASONS = frozenset({"subscription_create", "subscription_cycle"})
# A "confirm your payment" notice (`invoice.payment_action_required`: the customer must authenticate,
# https://docs.stripe.com/billing/subscriptions/overview) lasts until its invoice is settled, paid
# or not (https://docs.stripe.com/api/invoices/object#invoice_object-status), or its
# subscription ends: canceled, or `incomplete_expired`, where Stripe voids that invoice
# (https://docs.stripe.com/billing/subscriptions/overview#subscription-statuses).
SETTLED_INVOICES = frozenset({"paid", "void", "uncollectible"})
ENDED_SUBSCRIPTIONS = frozenset({"canceled", "incomplete_expired"})

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

# Ties within one second: the later stage of an object's life wins. Each kind's ranks are in its
# entry of the registry (broker.stripe_ledger.kinds), where they are linked to Stripe's docs.
MAX_AMOUNT = 2**56  # far above any charge Stripe accepts; keeps every charge rank below FETCHED_RANK
# A snapshot read from Stripe's API (STRIPE_API_KEY) is the truth at the time it was read: it wins
# ties against webhook snapshots of the same second.
FETCHED_RANK = 2**60

# Every kind of object the ledger holds. broker.stripe_ledger.kinds has one entry per kind (its
# events, parser, ranks, whether it is customer-level, how to read it from Stripe's API) and
# refuses to load while one is missing; a row of a kind not listed here is refused (UnknownKind).
Kind = Literal[
    "subscription",
    "checkout",
    "line_items",
    "invoice",
    "action_notice",
    "invoice_payment",
    "charge",
    "refund",
    "dispute",
    "payment_intent",
    "trial_notice",
    "entitlements",
    "customer",
    "trial",
]
KIND_NAMES: frozenset[str] = frozenset(get_args(Kind))
# What a license is of: a subscription, a one-time purchase, or the broker's own trial.
LicenseKind = Literal["subscription", "perpetual", "trial"]


class UnknownKind(ValueError):
    """A kind of object the ledger does not know (a typo, or a row written by a newer version)."""


def as_kind(value: str) -> Kind:
    if value not in KIND_NAMES:
        raise UnknownKind(f"unknown ledger kind {value!r}")
    return cast(Kind, value)


@dataclass(frozen=True, slots=True)
class Grants:
    """LICENSE_PRODUCTS: the product and price ids that grant a license, per kind of purchase. A
    subscription grants when one of its items' prices or products is listed for `subscription`; a
    one-time purchase when one of its line items' (read from Stripe's API: webhooks never carry a
    Checkout Session's line items, https://docs.stripe.com/api/checkout/sessions/line_items) is
    listed for `perpetual`. Nothing listed: every purchase that names the license grants."""

    subscription: frozenset[str] = frozenset()
    perpetual: frozenset[str] = frozenset()

    @classmethod
    def of(cls, entries: Iterable[str]) -> Grants:
        """`prod_...` or `price_...`, for both kinds, or prefixed `subscription:` / `perpetual:`."""
        kinds: dict[str, set[str]] = {"subscription": set(), "perpetual": set()}
        for entry in entries:
            kind, _, product = entry.rpartition(":")
            for each in (kind,) if kind else tuple(kinds):
                kinds[each].add(product)
        return cls(frozenset(kinds["subscription"]), frozenset(kinds["perpetual"]))

    @property
    def listed(self) -> bool:
        return bool(self.subscription or self.perpetual)

    def allow(self, kind: LicenseKind, products: Iterable[str] | None) -> bool:
        """Whether a purchase of `kind` of these products grants (None: not known)."""
        if not self.listed:
            return True
        listed = self.subscription if kind == "subscription" else self.perpetual
        return products is not None and not listed.isdisjoint(products)


def line_items_id(session_id: str) -> str:
    """The ledger id of a Checkout Session's line items, read from Stripe's API."""
    return f"{session_id}#line_items"


@dataclass(frozen=True, slots=True)
class StripeObject:
    """One ledger row: the fields of a Stripe object the rules read, and its ordering version."""

    id: str
    kind: Kind
    version: int  # `created` of the event that set this snapshot
    rank: int
    state: Mapping[str, Any]
    customer: str | None = None
    links: frozenset[str] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        as_kind(self.kind)  # a row read from the database is only typed as a string

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
    kind: LicenseKind
    entitled: bool
    version: int
    subscription: StripeObject | None = None
    cancels_at: int | None = None
    customer: str | None = None
    trial_end: int | None = None  # a broker trial's end (a subscription's is in its state)


class LicenseRules:
    """`derive`: the license of a set of ledger objects (see PRECEDENCE and docs/stripe.md)."""

    def __init__(
        self,
        entitled_statuses: Iterable[str],
        products: Iterable[str] = (),
        dispute_revokes: Literal["period", "license"] = "license",
    ) -> None:
        self.entitled_statuses = frozenset(entitled_statuses) - {"revoked"}
        self.grants = Grants.of(products)
        self.dispute_revokes = dispute_revokes

    @classmethod
    def from_settings(cls, settings: Settings) -> LicenseRules:
        return cls(settings.entitled_statuses, settings.license_products, settings.dispute_revokes)

    def needs_line_items(self, obj: StripeObject) -> bool:
        """Whether the rules judge this object by line items only Stripe's API gives: a one-time
        Checkout purchase while LICENSE_PRODUCTS lists products for one-time purchases."""
        return bool(self.grants.perpetual) and obj.kind == "checkout" and obj.state.get("mode") == "payment"

    def derive(self, objects: Iterable[StripeObject]) -> LicenseState:
        by_kind: dict[Kind, dict[str, StripeObject]] = defaultdict(dict)
        for obj in objects:
            by_kind[obj.kind][obj.id] = obj
        view = _View(by_kind, self.grants, self.entitled_statuses)
        candidates = [*view.subscriptions(), *view.purchases(), *view.trials()]
        if self.dispute_revokes == "license" and view.license_disputed():
            candidates = [replace(c, status="revoked", entitled=False) if c.entitled else c for c in candidates]
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
            "features": view.features(entitling),
            "features_partial": view.features_partial(entitling),
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
        by_kind: Mapping[Kind, Mapping[str, StripeObject]],
        grants: Grants,
        entitled_statuses: frozenset[str],
    ) -> None:
        self.by_kind = by_kind
        self.grants = grants
        self.entitled_statuses = entitled_statuses
        self.sessions = self.of("checkout")
        self.invoices = self.of("invoice")
        self.deleted = {o.id: o.version for o in self.of("customer").values() if o.state.get("deleted")}
        self.revoked = self._revoked_payments()
        self.invoice_payments = self._invoice_payments()

    def of(self, kind: Kind) -> Mapping[str, StripeObject]:
        """The license's objects of this kind, by id."""
        return self.by_kind.get(kind, {})

    # -- payments -----------------------------------------------------------------------------

    def _revoked_payments(self) -> set[str]:
        """Charge and payment-intent ids whose money went back: fully refunded, or disputed."""
        undone: dict[str, int] = {}
        for refund in self.of("refund").values():
            charge = refund.state.get("charge")
            if charge and refund.state.get("status") in UNDONE_REFUNDS:
                undone[charge] = max(undone.get(charge, -1), refund.version)
        revoked: set[str] = set()
        for charge in self.of("charge").values():
            # A failed or canceled refund newer than the charge's last word puts the money back.
            if charge.state.get("refunded") and undone.get(charge.id, -1) < charge.version:
                revoked |= {
                    charge.id,
                    *([charge.state["payment_intent"]] if charge.state.get("payment_intent") else []),
                }
        for dispute in self.of("dispute").values():
            if _money_back(dispute):
                revoked |= {p for p in (dispute.state.get("charge"), dispute.state.get("payment_intent")) if p}
        return revoked

    def license_disputed(self) -> bool:
        """A dispute of one of the license's payments lost, or a fraud claim, with the money back."""
        return any(
            _money_back(d) and (d.state.get("status") == "lost" or d.state.get("reason") == FRAUD_REASON)
            for d in self.of("dispute").values()
        )

    def _invoice_payments(self) -> set[str]:
        """Every charge and payment intent known to have paid some invoice."""
        paid: set[str] = set()
        for invoice in self.invoices.values():
            paid |= {p for p in (invoice.state.get("charge"), invoice.state.get("payment_intent")) if p}
            paid |= set(invoice.state.get("payments") or ())
        for payment in self.of("invoice_payment").values():
            paid |= {p for p in (payment.state.get("payment_intent"), payment.state.get("charge")) if p}
        return paid

    def _paid_by(self, invoice_id: str) -> set[str]:
        """Every charge and payment intent known to have paid an invoice (both API shapes)."""
        paid: set[str] = set()
        invoice = self.invoices.get(invoice_id)
        if invoice is not None:
            paid |= {p for p in (invoice.state.get("charge"), invoice.state.get("payment_intent")) if p}
            paid |= set(invoice.state.get("payments") or ())
        for payment in self.of("invoice_payment").values():
            if payment.state.get("invoice") == invoice_id:
                paid |= {p for p in (payment.state.get("payment_intent"), payment.state.get("charge")) if p}
        for charge in self.of("charge").values():
            if charge.state.get("invoice") == invoice_id:
                paid.add(charge.id)
        return paid

    # -- subscriptions ------------------------------------------------------------------------

    def subscriptions(self) -> list[_Candidate]:
        subs = dict(self.of("subscription"))
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
                and BILLED_BY_EMAIL not in (invoice.state.get("collection_method"), state.get("collection_method"))
            ):
                status = "past_due"
        if sub.customer in self.deleted and self.deleted[sub.customer] >= sub.version:
            status = "canceled"  # deleting a customer cancels its subscriptions at once
        period = self.period_invoice(sub)
        if period and status not in ("canceled", "incomplete_expired") and self._paid_by(period) & self.revoked:
            status = "revoked"  # its current period was refunded or charged back
        if not self.grants.allow("subscription", state.get("products") or ()):
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
            sub.customer,
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

    def period_invoice(self, sub: StripeObject) -> str | None:
        """The invoice that paid for the subscription's current period: the newest of its invoices
        that pay for a period (PERIOD_BILLING_REASONS), or the latest invoice it names while that one
        is unknown here (it may be a renewal)."""
        candidates = [
            (_int(i.state.get("created")), i.id)
            for i in self.invoices.values()
            if i.state.get("subscription") == sub.id and _pays_for_period(i)
        ]
        named = sub.state.get("latest_invoice")
        if named and named not in self.invoices:
            candidates.append((sub.version, str(named)))
        return max(candidates)[1] if candidates else None

    # -- one-time purchases -------------------------------------------------------------------

    def purchases(self) -> list[_Candidate]:
        return [*self._checkout_purchases(), *self._intent_purchases()]

    def _intent_purchases(self) -> list[_Candidate]:
        """Payment intents that name the license in their own metadata and that no Checkout Session
        or invoice accounts for: purchases by the Payment Element or the API. A `succeeded` intent is
        paid (https://docs.stripe.com/payments/paymentintents/lifecycle)."""
        accounted = {s.state.get("payment_intent") for s in self.sessions.values()} | self.invoice_payments
        found = []
        for intent in self.of("payment_intent").values():
            if not intent.state.get("purchase") or intent.id in accounted or intent.state.get("invoice"):
                continue
            if not self.grants.allow("perpetual", intent.state.get("products")):
                continue  # LICENSE_PRODUCTS: only an intent whose metadata.license_product is listed
            status = "paid" if intent.state.get("status") == "succeeded" else "incomplete"
            if status == "paid" and intent.id in self.revoked:
                status = "revoked"
            found.append(_Candidate(status, "perpetual", status == "paid", intent.version, customer=intent.customer))
        return found

    def _checkout_purchases(self) -> list[_Candidate]:
        found = []
        for session in self.sessions.values():
            if session.state.get("mode") != "payment":
                continue
            outcome = session.state.get("status")
            status = {"paid": "paid", "failed": "payment_failed", "expired": "expired"}.get(str(outcome), "incomplete")
            payment = session.state.get("payment_intent")
            if status == "paid" and payment and payment in self.revoked:
                status = "revoked"
            line_items = self.of("line_items").get(line_items_id(session.id))
            if not self.grants.allow("perpetual", line_items.state.get("products") if line_items else None):
                continue  # LICENSE_PRODUCTS: only purchases whose line items are known and listed
            found.append(_Candidate(status, "perpetual", status == "paid", session.version, customer=session.customer))
        return found

    # -- trials the broker gives (no Stripe object) --------------------------------------------

    def trials(self) -> list[_Candidate]:
        """A running trial entitles whatever ENTITLED_STATUSES says (the seller turned trials on
        with LICENSE_TRIAL_DAYS); an ended one is `expired`."""
        found = []
        for trial in self.of("trial").values():
            running = trial.state.get("status") == "trialing"
            end = _int(trial.state.get("trial_end")) or None
            found.append(_Candidate("trialing" if running else "expired", "trial", running, trial.version,
                                    cancels_at=end, trial_end=end))  # fmt: skip
        return found

    # -- customer-level facts and notices -----------------------------------------------------

    def features(self, entitling: list[_Candidate]) -> list[str]:
        """The active entitlements (https://docs.stripe.com/billing/entitlements) of the customers
        whose subscriptions or purchases entitle the license; none while nothing does. Stripe keeps
        them per customer, so two entitled licenses of one customer list the same features."""
        customers = {c.customer for c in entitling if c.customer}
        features: set[str] = set()
        for summary in self.of("entitlements").values():
            if summary.customer not in customers:
                continue
            if summary.customer in self.deleted and self.deleted[summary.customer] >= summary.version:
                continue
            features |= set(summary.state.get("features") or ())
        return sorted(features)

    def features_partial(self, entitling: list[_Candidate]) -> bool:
        """Whether `features` may miss some: a summary lists at most 10 entitlements (`has_more`),
        and the rest could not be read (no STRIPE_API_KEY, or the read failed)."""
        customers = {c.customer for c in entitling if c.customer}
        return any(s.customer in customers and s.state.get("partial") for s in self.of("entitlements").values())

    def customer(self) -> str | None:
        customers = sorted(
            (o.version, o.customer)
            for kind in ("checkout", "subscription")
            for o in self.of(kind).values()
            if o.customer
        )
        return customers[-1][1] if customers else None

    def notice(self) -> dict[str, Any] | None:
        subs = self.of("subscription")
        for notice in sorted(self.of("action_notice").values(), key=lambda n: (-n.version, n.id)):
            invoice = self.invoices.get(str(notice.state.get("invoice")))
            if invoice is not None and invoice.state.get("status") in SETTLED_INVOICES:
                continue
            sub = subs.get(str(notice.state.get("subscription")))
            if sub is not None and (
                sub.state.get("status") in ENDED_SUBSCRIPTIONS
                or (sub.customer in self.deleted and self.deleted[sub.customer] >= sub.version)
            ):
                continue
            return {
                "type": "payment_action_required",
                "invoice": notice.state.get("invoice"),
                "hosted_invoice_url": notice.state.get("hosted_invoice_url"),
            }
        for notice in sorted(self.of("trial_notice").values(), key=lambda n: -n.version):
            sub = subs.get(str(notice.state.get("subscription")))
            # Gone once the trial ends (no longer trialing) or is extended (another trial_end).
            if (
                sub
                and sub.state.get("status") == "trialing"
                and sub.state.get("trial_end") == notice.state.get("trial_end")
            ):
                return {"type": "trial_will_end", "subscription": sub.id, "trial_end": iso(sub.state.get("trial_end"))}
        return None


def _money_back(dispute: StripeObject) -> bool:
    status, case = dispute.state.get("status"), dispute.state.get("case_type")
    return status in REVOKING_DISPUTES and not (status == "prevented" and case == BLOCKED_DISPUTE)


def _pays_for_period(invoice: StripeObject) -> bool:
    reason = invoice.state.get("billing_reason")
    if reason is None or reason in PERIOD_BILLING_REASONS:
        return True  # None: a ledger row written before billing reasons were kept
    return reason == "subscription_update" and bool(invoice.state.get("period_line"))


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0
