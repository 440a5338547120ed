"""A small Stripe account for scenario tests: customers, Checkout purchases, subscriptions with
their invoices, payments, refunds and disputes, and a clock that advances each event's `created`.

Every action appends the events Stripe would send for it, in the order Stripe usually sends them
(objects from tests.stripe_objects); `take()` hands them over for delivery:

    s = Scenario("current")
    alice = s.customer()
    old = s.subscribe(alice, license_id)
    old.schedule_cancel()
    s.subscribe(alice, license_id)
    old.end()
    deliver(s.take())
"""

from __future__ import annotations

import time
from typing import Any, Literal

from tests import stripe_objects as objects
from tests.stripe_objects import Shape, new_id
from tests.support.stripe_api import FakeStripeApi

MONTH = 30 * 86400
PRICE, PRODUCT = "price_desktop_pro_monthly", "prod_desktop_pro"
OTHER_PRICE, OTHER_PRODUCT = "price_cloud_backup_monthly", "prod_cloud_backup"
# One-time prices: the perpetual license, and a small add-on bought through Checkout too.
LIFETIME_PRICE = "price_desktop_pro_lifetime"
ADDON_PRICE, ADDON_PRODUCT = "price_export_pack", "prod_export_pack"

# How a Checkout Session names its license:
#   metadata             session metadata and subscription_data.metadata (what docs/stripe.md asks)
#   session              the session's metadata only (the subscription carries none)
#   client_reference_id  only client_reference_id (a Payment Link: anyone can set it)
#   none                 nothing: a purchase of something else, no license
Bind = Literal["metadata", "session", "client_reference_id", "none"]


class Clock:
    """Stripe's `created`, one-second resolution: each event is a second after the previous one."""

    def __init__(self, start: int) -> None:
        self.now = start

    def tick(self, seconds: int = 1) -> int:
        self.now += seconds
        return self.now

    def advance_to(self, moment: int) -> int:
        self.now = max(self.now, moment)
        return self.now


class Scenario:
    def __init__(
        self,
        shape: Shape,
        *,
        livemode: bool = False,
        account: str | None = None,
        api: FakeStripeApi | None = None,
        api_version: str | None = None,
    ) -> None:
        """`api_version`: the webhook endpoint's, when not the shape's usual one; with
        objects.UNLINKED_API_VERSION (current shape), no invoice_payment.paid is sent."""
        self.shape = shape
        self.api_version = api_version
        self.livemode = livemode
        self.account = account
        self.api = api  # where what only Stripe's API gives (line items, entitlements) can be read
        # The first period contains the present; renewals move on from there.
        self.clock = Clock(int(time.time()) - 5 * 86400)
        self.outbox: list[dict[str, Any]] = []

    def customer(self) -> str:
        return new_id("cus")

    def emit(
        self,
        kind: str,
        obj: dict[str, Any],
        previous: dict[str, Any] | None = None,
        *,
        same_second: bool = False,
        at: int | None = None,
    ) -> dict[str, Any]:
        """`same_second`: created in the second of the previous event (Stripe's `created` has
        one-second resolution, and some events come in pairs); `at`: in that second."""
        created = at if at is not None else self.clock.now if same_second else self.clock.tick()
        envelope = objects.event(
            kind,
            obj,
            created=created,
            shape=self.shape,
            livemode=self.livemode,
            account=self.account,
            previous_attributes=previous,
            api_version=self.api_version,
        )
        self.outbox.append(envelope)
        return envelope

    def take(self) -> list[dict[str, Any]]:
        """The events emitted since the last take, oldest first."""
        taken, self.outbox = self.outbox, []
        return taken

    def session_id(self) -> str:
        return new_id("cs_live" if self.livemode else "cs_test")

    def subscribe(
        self,
        customer: str,
        license_id: str | None,
        *,
        bind: Bind = "metadata",
        price: str = PRICE,
        product: str = PRODUCT,
        amount: int = 2000,
    ) -> Subscription:
        """A paid Checkout in mode=subscription: the subscription is created `incomplete`, its first
        invoice is paid, it turns `active`, and the session completes."""
        sub_metadata = {"license_id": license_id} if bind == "metadata" and license_id else {}
        sub = Subscription(self, customer, sub_metadata, price=price, product=product, amount=amount)
        first = sub.new_invoice("subscription_create")
        sub.emit("customer.subscription.created")
        first.pay()
        sub.update(status="active")
        session = objects.checkout_session(
            id=self.session_id(),
            mode="subscription",
            customer=customer,
            payment_status="paid",
            status="complete",
            created=sub.created,
            amount=amount,
            livemode=self.livemode,
            subscription=sub.id,
            invoice=first.id,
            **_naming(license_id, bind),
        )
        self.emit("checkout.session.completed", session)
        return sub

    def entitlements(self, customer: str, lookup_keys: list[str]) -> None:
        """entitlements.active_entitlement_summary.updated: the customer's active features now (the
        event lists the first 10; the fake API lists them all)."""
        entries = [objects.active_entitlement(key=k, livemode=self.livemode) for k in lookup_keys]
        summary = objects.entitlement_summary(
            customer=customer, lookup_keys=lookup_keys, livemode=self.livemode, entries=entries
        )
        if self.api is not None:
            self.api.put_list("/v1/entitlements/active_entitlements", entries, customer=customer)
        self.emit("entitlements.active_entitlement_summary.updated", summary)

    def subscribe_by_invoice(self, customer: str, license_id: str) -> Subscription:
        """A subscription billed by email (`collection_method=send_invoice`, 30 days to pay): active
        at once; each invoice is paid on its hosted page."""
        sub = Subscription(self, customer, {"license_id": license_id}, price=PRICE, product=PRODUCT, amount=2000)
        sub.collection_method, sub.status = "send_invoice", "active"
        first = sub.new_invoice("subscription_create")
        sub.emit("customer.subscription.created")
        first.pay()
        return sub

    def buy_with_payment_intent(self, customer: str, license_id: str, *, amount: int = 4900) -> IntentPurchase:
        """A perpetual license paid through a payment intent alone (Payment Element, no Checkout)."""
        purchase = IntentPurchase(self, customer, license_id, amount)
        purchase.succeed()
        return purchase

    def subscribe_by_api(self, customer: str, license_id: str) -> Subscription:
        """A subscription created with the API (`payment_behavior=default_incomplete`), no Checkout:
        it is `incomplete` and its first invoice waits for the customer to authenticate (3-D Secure)."""
        sub = Subscription(self, customer, {"license_id": license_id}, price=PRICE, product=PRODUCT, amount=2000)
        first = sub.new_invoice("subscription_create")
        sub.emit("customer.subscription.created")
        first.require_action(failed_attempt=False)
        return sub

    def buy(
        self,
        customer: str,
        license_id: str | None,
        *,
        bind: Bind = "metadata",
        pending: bool = False,
        amount: int = 4900,
        price: str = LIFETIME_PRICE,
        product: str = PRODUCT,
    ) -> Purchase:
        """A Checkout in mode=payment (a perpetual license, or whatever `price` is). `pending`: an
        asynchronous payment method (SEPA debit, ACH): the session completes `unpaid` and settles
        days later. Its line items are readable from the fake API, never in an event."""
        purchase = Purchase(self, customer, amount, _naming(license_id, bind))
        if self.api is not None:
            item = objects.line_item(price=price, product=product, amount=amount)
            self.api.put_list(f"/v1/checkout/sessions/{purchase.id}/line_items", [item])
        if not pending:
            purchase.payment.succeed()
            purchase.payment_status = "paid"
        purchase.emit("checkout.session.completed")
        return purchase


class IntentPurchase:
    """A one-time purchase by a payment intent alone (the Payment Element, or the API): no Checkout
    Session, no invoice; the seller's server names the license in the intent's metadata."""

    def __init__(self, scenario: Scenario, customer: str, license_id: str, amount: int) -> None:
        self.s = scenario
        self.payment = Payment(scenario, customer, amount)
        self.metadata = {"license_id": license_id}

    def snapshot(self, status: str) -> dict[str, Any]:
        p = self.payment
        return objects.payment_intent(
            id=p.payment_intent,
            customer=p.customer,
            amount=p.amount,
            status=status,
            created=p.created,
            latest_charge=p.charge,
            livemode=self.s.livemode,
            metadata=self.metadata,
        )

    def succeed(self) -> None:
        """charge.succeeded, then payment_intent.succeeded."""
        self.payment.succeed()
        self.s.emit("payment_intent.succeeded", self.snapshot("succeeded"))


def _naming(license_id: str | None, bind: Bind) -> dict[str, Any]:
    if license_id is None or bind == "none":
        return {}
    if bind == "client_reference_id":
        return {"client_reference_id": license_id}
    return {"metadata": {"license_id": license_id}}


class Payment:
    """A payment intent and its charge."""

    def __init__(self, scenario: Scenario, customer: str, amount: int, invoice: str | None = None) -> None:
        self.s = scenario
        self.customer = customer
        self.amount = amount
        self.invoice = invoice
        self.charge = new_id("ch")
        self.payment_intent = new_id("pi")
        self.created = scenario.clock.now
        self.refunds: list[dict[str, Any]] = []
        self.refunded_at: int | None = None

    def snapshot(self) -> dict[str, Any]:
        return objects.charge(
            self.s.shape,
            id=self.charge,
            customer=self.customer,
            payment_intent=self.payment_intent,
            amount=self.amount,
            created=self.created,
            livemode=self.s.livemode,
            amount_refunded=sum(r["amount"] for r in self.refunds if r["status"] == "succeeded"),
            invoice=self.invoice,
            refunds=self.refunds,
        )

    def succeed(self) -> None:
        self.created = self.s.clock.now
        self.s.emit("charge.succeeded", self.snapshot())

    def refund(self, amount: int | None = None, *, same_second: bool = False) -> None:
        """A refund of `amount` (all of it by default): charge.refunded, then refund.created.
        `same_second`: in the second of the previous event (two refunds issued together)."""
        refund = objects.refund(
            id=new_id("re"),
            charge=self.charge,
            payment_intent=self.payment_intent,
            amount=self.amount if amount is None else amount,
            status="succeeded",
            created=self.s.clock.now,
        )
        before = self.snapshot()
        self.refunds.append(refund)
        after = self.snapshot()
        previous = {k: before[k] for k in ("amount_refunded", "refunded", "refunds") if before[k] != after[k]}
        # Two refunds issued together: their charge.refunded events share one second.
        at = self.refunded_at if same_second else None
        self.refunded_at = self.s.emit("charge.refunded", after, previous, at=at)["created"]
        self.s.emit("refund.created", refund)

    def dispute(
        self, status: str = "needs_response", *, reason: str = "fraudulent", case_type: str | None = None
    ) -> Dispute:
        return Dispute(self, status, reason, case_type)


class Dispute:
    def __init__(self, payment: Payment, status: str, reason: str, case_type: str | None) -> None:
        self.payment = payment
        self.id = new_id("du")
        self.status = status
        self.reason = reason
        self.case_type = case_type
        self.created = payment.s.clock.now
        self.emit("charge.dispute.created")
        # A chargeback withdraws the funds at once; an inquiry or a prevented dispute does not.
        if status not in objects.INQUIRY_STATUSES and status != "prevented":
            self.emit("charge.dispute.funds_withdrawn")

    def snapshot(self) -> dict[str, Any]:
        p = self.payment
        return objects.dispute(
            id=self.id,
            charge=p.charge,
            payment_intent=p.payment_intent,
            amount=p.amount,
            status=self.status,
            created=self.created,
            livemode=p.s.livemode,
            reason=self.reason,
            case_type=self.case_type,
        )

    def emit(self, kind: str, previous: dict[str, Any] | None = None) -> None:
        self.payment.s.emit(kind, self.snapshot(), previous)

    def update(self, status: str) -> None:
        previous, self.status = {"status": self.status}, status
        self.emit("charge.dispute.updated", previous)

    def close(self, status: str) -> None:
        """won, lost, or warning_closed (an inquiry that went no further)."""
        withdrawn = self.status not in objects.INQUIRY_STATUSES
        previous, self.status = {"status": self.status}, status
        self.emit("charge.dispute.closed", previous)
        if withdrawn and status == "won":
            self.emit("charge.dispute.funds_reinstated")


class Purchase:
    """A Checkout Session in mode=payment."""

    def __init__(self, scenario: Scenario, customer: str, amount: int, naming: dict[str, Any]) -> None:
        self.s = scenario
        self.id = scenario.session_id()
        self.customer = customer
        self.amount = amount
        self.naming = naming
        self.created = scenario.clock.now
        self.payment = Payment(scenario, customer, amount)
        self.payment_status = "unpaid"
        self.status = "complete"

    def snapshot(self) -> dict[str, Any]:
        return objects.checkout_session(
            id=self.id,
            mode="payment",
            customer=self.customer,
            payment_status=self.payment_status,
            status=self.status,
            created=self.created,
            amount=self.amount,
            livemode=self.s.livemode,
            payment_intent=self.payment.payment_intent,
            **self.naming,
        )

    def emit(self, kind: str) -> None:
        self.s.emit(kind, self.snapshot())

    def async_succeeded(self) -> None:
        self.payment.succeed()
        self.payment_status = "paid"
        self.emit("checkout.session.async_payment_succeeded")

    def async_failed(self) -> None:
        self.emit("checkout.session.async_payment_failed")


class Invoice:
    def __init__(
        self, sub: Subscription, billing_reason: str, *, amount: int | None = None, proration: bool = False
    ) -> None:
        self.sub = sub
        self.id = new_id("in")
        self.billing_reason = billing_reason
        self.amount = sub.amount if amount is None else amount
        self.proration = proration
        self.created = sub.s.clock.now
        self.period_start, self.period_end = sub.period_start, sub.period_end
        self.status = "open"
        self.payment: Payment | None = None

    def snapshot(self) -> dict[str, Any]:
        sub, s = self.sub, self.sub.s
        return objects.invoice(
            s.shape,
            id=self.id,
            customer=sub.customer,
            subscription=sub.id,
            status=self.status,
            created=self.created,
            amount=self.amount,
            billing_reason=self.billing_reason,
            period_start=self.period_start,
            period_end=self.period_end,
            price=sub.price,
            product=sub.product,
            item=sub.item,
            livemode=s.livemode,
            subscription_metadata=sub.metadata,
            charge=self.payment.charge if self.payment else None,
            payment_intent=self.payment.payment_intent if self.payment else None,
            proration=self.proration,
            collection_method=sub.collection_method,
            due_date=self.created + 30 * 86400 if sub.collection_method == "send_invoice" else None,
        )

    def pay(self) -> Payment:
        """charge.succeeded, invoice.paid and, since 2025-03-31, invoice_payment.paid."""
        s = self.sub.s
        self.payment = Payment(s, self.sub.customer, self.amount, invoice=self.id)
        self.payment.succeed()
        self.status = "paid"
        s.emit("invoice.paid", self.snapshot())
        if s.shape == "current":
            link = objects.invoice_payment(
                id=new_id("inpay"),
                invoice=self.id,
                payment_intent=self.payment.payment_intent,
                amount=self.amount,
                created=s.clock.now,
                livemode=s.livemode,
            )
            if s.api is not None:
                s.api.put_list("/v1/invoice_payments", [link], invoice=self.id)
            if s.api_version != objects.UNLINKED_API_VERSION:
                s.emit("invoice_payment.paid", link)
        return self.payment

    def fail(self) -> None:
        self.sub.s.emit("invoice.payment_failed", self.snapshot())

    def require_action(self, *, failed_attempt: bool = True) -> None:
        """The payment needs the customer to authenticate (3-D Secure) on the hosted invoice page.
        On a renewal Stripe reports the attempt as failed too, in the same second."""
        if failed_attempt:
            self.fail()
        self.sub.s.emit("invoice.payment_action_required", self.snapshot(), same_second=failed_attempt)

    def touch(self) -> None:
        """invoice.updated: something other than its payment changed (a memo, the next attempt)."""
        previous = {"description": None}
        self.sub.s.emit("invoice.updated", {**self.snapshot(), "description": "Thanks for your business"}, previous)

    def void(self) -> None:
        self.status = "void"
        self.sub.s.emit("invoice.voided", self.snapshot())


class Subscription:
    def __init__(
        self, scenario: Scenario, customer: str, metadata: dict[str, str], *, price: str, product: str, amount: int
    ) -> None:
        self.s = scenario
        self.id = new_id("sub")
        self.item = new_id("si")
        self.customer = customer
        self.metadata = metadata
        self.price, self.product, self.amount = price, product, amount
        self.created = scenario.clock.now
        self.status = "incomplete"
        self.period_start, self.period_end = self.created, self.created + MONTH
        self.quantity = 1
        self.collection_method = "charge_automatically"
        self.cancel_at: int | None = None
        self.cancel_at_period_end = False
        self.canceled_at: int | None = None
        self.ended_at: int | None = None
        self.invoices: list[Invoice] = []

    @property
    def latest_invoice(self) -> Invoice:
        return self.invoices[-1]

    def snapshot(self) -> dict[str, Any]:
        return objects.subscription(
            self.s.shape,
            id=self.id,
            customer=self.customer,
            status=self.status,
            created=self.created,
            period_start=self.period_start,
            period_end=self.period_end,
            price=self.price,
            product=self.product,
            item=self.item,
            livemode=self.s.livemode,
            metadata=self.metadata,
            latest_invoice=self.invoices[-1].id if self.invoices else None,
            quantity=self.quantity,
            collection_method=self.collection_method,
            cancel_at=self.cancel_at,
            cancel_at_period_end=self.cancel_at_period_end,
            canceled_at=self.canceled_at,
            ended_at=self.ended_at,
        )

    def emit(self, kind: str, previous: dict[str, Any] | None = None) -> None:
        self.s.emit(kind, self.snapshot(), previous)

    def update(self, **changes: Any) -> None:
        """customer.subscription.updated with `previous_attributes`, as Stripe computes it."""
        before = self.snapshot()
        for name, value in changes.items():
            if not hasattr(self, name):
                raise AttributeError(name)
            setattr(self, name, value)
        self._updated(before)

    def _updated(self, before: dict[str, Any]) -> None:
        after = self.snapshot()
        self.s.emit("customer.subscription.updated", after, {k: v for k, v in before.items() if after.get(k) != v})

    def new_invoice(self, billing_reason: str, *, amount: int | None = None, proration: bool = False) -> Invoice:
        invoice = Invoice(self, billing_reason, amount=amount, proration=proration)
        self.invoices.append(invoice)
        return invoice

    def _next_period(self) -> Invoice:
        self.s.clock.advance_to(self.period_end)
        self.period_start, self.period_end = self.period_end, self.period_end + MONTH
        return self.new_invoice("subscription_cycle")

    def renew(self) -> Invoice:
        """The next period, paid."""
        before = self.snapshot()
        invoice = self._next_period()
        invoice.pay()
        self._updated(before)
        return invoice

    def fail_renewal(self, status: str = "past_due") -> Invoice:
        """The next period, its invoice open after a failed attempt; the subscription `status`
        (past_due while Stripe retries; unpaid once the retries are exhausted)."""
        before = self.snapshot()
        invoice = self._next_period()
        invoice.fail()
        self.status = status
        self._updated(before)
        return invoice

    def change_quantity(self, quantity: int, proration_amount: int) -> Invoice:
        """A mid-period change with `proration_behavior=always_invoice`: the subscription is updated,
        and a proration invoice (`billing_reason=subscription_update`) for the rest of the period,
        now its latest invoice, is paid at once. The period keeps the invoice that paid for it."""
        before = self.snapshot()
        self.quantity = quantity
        invoice = self.new_invoice("subscription_update", amount=proration_amount, proration=True)
        self._updated(before)
        invoice.pay()
        return invoice

    def send_renewal_invoice(self) -> Invoice:
        """send_invoice billing: the next period starts and its invoice is emailed, open until its
        due date; the subscription stays active meanwhile."""
        before = self.snapshot()
        invoice = self._next_period()
        self._updated(before)
        return invoice

    def renewal_needs_action(self) -> Invoice:
        """The next period's payment needs 3-D Secure: the invoice stays open, the subscription
        turns past_due until the customer authenticates."""
        before = self.snapshot()
        invoice = self._next_period()
        invoice.require_action()
        self.status = "past_due"
        self._updated(before)
        return invoice

    def expire_incomplete(self) -> None:
        """The first invoice was not paid within 23 hours: `incomplete_expired`, its invoice voided."""
        self.s.clock.tick(23 * 3600)
        self.update(status="incomplete_expired")
        self.latest_invoice.void()

    def schedule_cancel(self) -> None:
        """Cancel at the end of the period (classic billing, the Customer Portal's old default)."""
        self.update(cancel_at_period_end=True, cancel_at=self.period_end, canceled_at=self.s.clock.now)

    def cancel_on(self, moment: int) -> None:
        """Flexible billing: `cancel_at` a moment of its own, `cancel_at_period_end` stays false."""
        self.update(cancel_at=moment, cancel_at_period_end=False, canceled_at=self.s.clock.now)

    def end(self) -> None:
        now = self.s.clock.now + 1
        self.status, self.ended_at = "canceled", now
        self.canceled_at = self.canceled_at or now
        self.emit("customer.subscription.deleted")


def disputes_won_lost_and_prevented(s: Scenario, license_id: str) -> None:
    """A life both the ledger's properties and the ingest's differential test replay: a renewed
    subscription whose first payment is disputed (won, after review), whose second is blocked as a
    prevented dispute, and whose first is disputed again and lost."""
    sub = s.subscribe(s.customer(), license_id)
    first = sub.latest_invoice.payment
    sub.renew()
    second = sub.latest_invoice.payment
    assert first is not None and second is not None
    dispute = first.dispute("needs_response")
    second.dispute("prevented", case_type="block")
    dispute.update("under_review")
    dispute.close("won")
    first.dispute("needs_response", reason="product_unacceptable").close("lost")
