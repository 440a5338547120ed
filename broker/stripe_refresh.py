"""Authoritative refresh (STRIPE_API_KEY): an event that is not newer than the ledger's snapshot of
its object (same second, or older) is replaced by the object as Stripe's API reads it now, as
Stripe recommends when order matters (docs.stripe.com/webhooks#event-ordering). Newer events never
get here, so the common path makes no request.

Without a key the refresher does nothing (`NoRefresh`). A failed read (HTTP error, timeout,
refused connection, content the ledger cannot use) is logged and counted, and the event's own
snapshot applies as if no key were set.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any, Protocol

import stripe

from broker import metrics
from broker.ledger import StripeObject
from broker.settings import Settings
from broker.stripe_objects import CHECKOUT_EVENTS, Reported, Unprocessable, report

log = logging.getLogger("broker.stripe_refresh")

# A settled invoice read from the API, as the event that settles it.
SETTLED_INVOICE_EVENTS: Mapping[str, str] = {
    "paid": "invoice.paid",
    "void": "invoice.voided",
    "uncollectible": "invoice.marked_uncollectible",
}

# The read happens inside the event's transaction, under the advisory locks of its ids (see
# webhook.ingest): a short bound keeps a slow API from holding them and a pooled connection. No
# retries: Stripe retries the webhook itself, and a retry storm against a struggling API helps nobody.
REFRESH_TIMEOUT = 3.0

Retrieve = Callable[[stripe.StripeClient, str, stripe.RequestOptions], Awaitable[stripe.StripeObject]]
# Ledger kind -> how to read one object of it. Customer-level kinds (entitlement summaries, deleted
# customers) and trial notices have no single object to read: their events apply as they come.
RETRIEVE: Mapping[str, Retrieve] = {
    "subscription": lambda c, i, o: c.v1.subscriptions.retrieve_async(i, options=o),
    "checkout": lambda c, i, o: c.v1.checkout.sessions.retrieve_async(i, options=o),
    "invoice": lambda c, i, o: c.v1.invoices.retrieve_async(i, options=o),
    "invoice_payment": lambda c, i, o: c.v1.invoice_payments.retrieve_async(i, options=o),
    "charge": lambda c, i, o: c.v1.charges.retrieve_async(i, options=o),
    "refund": lambda c, i, o: c.v1.refunds.retrieve_async(i, options=o),
    "dispute": lambda c, i, o: c.v1.disputes.retrieve_async(i, options=o),
    "payment_intent": lambda c, i, o: c.v1.payment_intents.retrieve_async(i, options=o),
}


class Refresher(Protocol):
    async def refresh(self, event: Mapping[str, Any], obj: StripeObject, held_version: int) -> Reported | None:
        """What the event reports, with its own object read from Stripe now; None to apply the
        event as it is (no key, a kind with nothing to read, or the read failed)."""
        ...


class NoRefresh:
    async def refresh(self, event: Mapping[str, Any], obj: StripeObject, held_version: int) -> Reported | None:
        return None


class StripeRefresher:
    def __init__(self, api_key: str, api_base: str | None = None) -> None:
        self.http = stripe.HTTPXClient(timeout=REFRESH_TIMEOUT)
        self.client = stripe.StripeClient(
            api_key,
            base_addresses={"api": api_base} if api_base else None,
            http_client=self.http,
            max_network_retries=0,
        )
        # A live key cannot read test-mode objects and a test key cannot read live ones.
        self.livemode = api_key.startswith(("sk_live_", "rk_live_"))

    async def refresh(self, event: Mapping[str, Any], obj: StripeObject, held_version: int) -> Reported | None:
        retrieve = RETRIEVE.get(obj.kind)
        if retrieve is None or (event.get("livemode") is True) != self.livemode:
            return None
        options: stripe.RequestOptions = {}
        if isinstance(event.get("account"), str):  # a Connect account listed in STRIPE_ACCOUNTS
            options["stripe_account"] = event["account"]
        try:
            async with asyncio.timeout(REFRESH_TIMEOUT):
                fetched = (await retrieve(self.client, obj.id, options)).to_dict()
            reported = report(refreshed_event(event, fetched, held_version), fetched=True)
        except (stripe.StripeError, TimeoutError, Unprocessable) as exc:
            metrics.REFRESHES.labels("failed").inc()
            log.warning(
                "reading %s %s from the Stripe API failed, applying the event's snapshot: %s", obj.kind, obj.id, exc
            )
            return None
        if reported is None or reported.primary.id != obj.id:
            metrics.REFRESHES.labels("failed").inc()
            log.warning("the Stripe API answered for %s %s with an object the ledger cannot use", obj.kind, obj.id)
            return None
        metrics.REFRESHES.labels("ok").inc()
        return reported

    async def aclose(self) -> None:
        await self.http.close_async()  # type: ignore[no-untyped-call]  # stripe leaves it unannotated


def refreshed_event(event: Mapping[str, Any], fetched: dict[str, Any], held_version: int) -> dict[str, Any]:
    """The event as if it carried the object read just now.

    Its version is the ledger's (or the event's, if newer): the read is at least as new as every
    snapshot the ledger holds, and with the fetched rank it wins their tie; an event created in a
    later second still replaces it. The type is kept where it tells more than the object (an open
    invoice's failed attempt, a session whose async payment failed); a settled invoice or session
    is read by its own status, whatever the stale event said."""
    kind = str(event["type"])
    if kind.startswith("invoice.") and fetched.get("status") in SETTLED_INVOICE_EVENTS:
        kind = SETTLED_INVOICE_EVENTS[fetched["status"]]
    elif kind in CHECKOUT_EVENTS:
        if fetched.get("status") == "expired":
            kind = "checkout.session.expired"
        elif fetched.get("payment_status") in ("paid", "no_payment_required"):
            kind = "checkout.session.completed"
    created = max(int(event["created"]), held_version)
    return {**event, "type": kind, "created": created, "data": {**event["data"], "object": fetched}}


@asynccontextmanager
async def open_refresher(settings: Settings) -> AsyncIterator[Refresher]:
    if settings.stripe_api_key is None:
        yield NoRefresh()
        return
    refresher = StripeRefresher(settings.stripe_api_key, settings.stripe_api_base)
    try:
        yield refresher
    finally:
        await refresher.aclose()
