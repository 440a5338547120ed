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
from broker.settings import Settings, require_https_or_loopback
from broker.stripe_ledger.kinds import BY_EVENT, KINDS
from broker.stripe_ledger.ledger import SETTLED_INVOICES, StripeObject
from broker.stripe_ledger.objects import Reported, Unprocessable, products_of, report

log = logging.getLogger("broker.stripe_ledger.refresh")

# A settled invoice read from the API, as the event that settles it (the first of its invoice events
# that says so: invoice.paid rather than invoice.payment_succeeded).
SETTLED_INVOICE_EVENTS: Mapping[str, str] = {
    str(outcome): event_type
    for event_type, outcome in reversed(list(KINDS["invoice"].events.items()))
    if outcome in SETTLED_INVOICES
}

# The read happens inside the event's transaction, under the advisory locks of its ids (see
# webhook.ingest): a short bound keeps a slow API from holding them and a pooled connection. No
# retries: Stripe retries the webhook itself, and a retry storm against a struggling API helps nobody.
REFRESH_TIMEOUT = 3.0

ListPage = Callable[[str | None], Awaitable[stripe.ListObject[Any]]]  # the page after this id
# A list read (line items, entitlements, invoice payments) follows at most this many pages of 100.
MAX_PAGES = 10


class StripeUnavailable(Exception):
    """A read the event cannot be judged without failed (HTTP error, timeout, refused connection):
    nothing is recorded and the webhook answers 503, so that Stripe delivers the event again."""


class Refresher(Protocol):
    async def refresh(self, event: Mapping[str, Any], obj: StripeObject, held_version: int) -> Reported | None:
        """What the event reports, with its own object read from Stripe now; None to apply the
        event as it is (no key, a kind with nothing to read, or the read failed)."""
        ...

    async def line_items(self, event: Mapping[str, Any], session_id: str) -> list[str] | None:
        """The price and product ids of a Checkout Session's line items; None when they cannot be
        read (no key, or a key of the other mode). Raises StripeUnavailable when the read fails."""
        ...

    async def entitlements(self, event: Mapping[str, Any], customer: str) -> list[str] | None:
        """The lookup keys of every active entitlement of the customer; None when they cannot be
        read. Raises StripeUnavailable when the read fails."""
        ...

    async def invoice_payments(self, event: Mapping[str, Any], invoice_id: str) -> list[dict[str, Any]] | None:
        """The invoice's payments (invoice_payment objects); None when they cannot be read. Raises
        StripeUnavailable when the read fails."""
        ...


class NoRefresh:
    async def refresh(self, event: Mapping[str, Any], obj: StripeObject, held_version: int) -> Reported | None:
        return None

    async def line_items(self, event: Mapping[str, Any], session_id: str) -> list[str] | None:
        return None

    async def entitlements(self, event: Mapping[str, Any], customer: str) -> list[str] | None:
        return None

    async def invoice_payments(self, event: Mapping[str, Any], invoice_id: str) -> list[dict[str, Any]] | None:
        return None


class StripeRefresher:
    def __init__(self, api_key: str, api_base: str | None = None) -> None:
        if api_base is not None:
            # The key goes in every request, and the answer is taken as Stripe's truth.
            require_https_or_loopback("STRIPE_API_BASE", api_base)
        self.http = stripe.HTTPXClient(timeout=REFRESH_TIMEOUT)
        self.client = stripe.StripeClient(
            api_key,
            base_addresses={"api": api_base} if api_base else None,
            http_client=self.http,
            max_network_retries=0,
        )
        # A live key cannot read test-mode objects and a test key cannot read live ones.
        self.livemode = api_key.startswith(("sk_live_", "rk_live_"))

    def _options(self, event: Mapping[str, Any]) -> stripe.RequestOptions | None:
        """How to read for this event; None when the key cannot (the other mode)."""
        if (event.get("livemode") is True) != self.livemode:
            return None
        options: stripe.RequestOptions = {}
        if isinstance(event.get("account"), str):  # a Connect account listed in STRIPE_ACCOUNTS
            options["stripe_account"] = event["account"]
        return options

    async def _list(self, what: str, read: Callable[[], Awaitable[list[dict[str, Any]]]]) -> list[dict[str, Any]]:
        """What `read` lists, within REFRESH_TIMEOUT; counted, and a failure raised as StripeUnavailable."""
        try:
            async with asyncio.timeout(REFRESH_TIMEOUT):
                items = await read()
        except (stripe.StripeError, TimeoutError) as exc:
            metrics.REFRESHES.labels("failed").inc()
            log.warning("reading %s from the Stripe API failed: %s", what, exc)
            raise StripeUnavailable(f"reading {what} from the Stripe API failed") from exc
        metrics.REFRESHES.labels("ok").inc()
        return items

    @staticmethod
    async def _pages(page: ListPage) -> list[dict[str, Any]]:
        """Every item of a list, page after page (at most MAX_PAGES)."""
        items: list[dict[str, Any]] = []
        after: str | None = None
        for _ in range(MAX_PAGES):
            listed = (await page(after)).to_dict()
            data = [i for i in listed.get("data") or [] if isinstance(i, dict)]
            items += data
            if not listed.get("has_more") or not data:
                break
            after = str(data[-1].get("id"))
        return items

    async def line_items(self, event: Mapping[str, Any], session_id: str) -> list[str] | None:
        options = self._options(event)
        if options is None:
            return None
        sessions = self.client.v1.checkout.sessions

        async def read() -> list[dict[str, Any]]:
            try:
                return await self._pages(
                    lambda after: sessions.line_items.list_async(
                        session_id,
                        params={"limit": 100, **({"starting_after": after} if after else {})},
                        options=options,
                    )
                )
            except stripe.InvalidRequestError:
                # An API (a proxy, a fake) without the list endpoint: the session with them expanded.
                session = await sessions.retrieve_async(session_id, params={"expand": ["line_items"]}, options=options)
                listed = session.to_dict().get("line_items")
                if not isinstance(listed, dict):
                    raise
                return [i for i in listed.get("data") or [] if isinstance(i, dict)]

        return products_of({"data": await self._list(f"the line items of {session_id}", read)})

    async def entitlements(self, event: Mapping[str, Any], customer: str) -> list[str] | None:
        options = self._options(event)
        if options is None:
            return None
        entitlements = self.client.v1.entitlements.active_entitlements
        items = await self._list(
            f"the active entitlements of {customer}",
            lambda: self._pages(
                lambda after: entitlements.list_async(
                    params={"customer": customer, "limit": 100, "starting_after": after}
                    if after
                    else {"customer": customer, "limit": 100},
                    options=options,
                )
            ),
        )
        return sorted({i["lookup_key"] for i in items if isinstance(i.get("lookup_key"), str)})

    async def invoice_payments(self, event: Mapping[str, Any], invoice_id: str) -> list[dict[str, Any]] | None:
        options = self._options(event)
        if options is None:
            return None
        payments = self.client.v1.invoice_payments

        async def read() -> list[dict[str, Any]]:
            try:
                return await self._pages(
                    lambda after: payments.list_async(
                        params={"invoice": invoice_id, "limit": 100, **({"starting_after": after} if after else {})},
                        options=options,
                    )
                )
            except stripe.InvalidRequestError:
                # An API without the list endpoint: the invoice with its payments expanded.
                invoice = await self.client.v1.invoices.retrieve_async(
                    invoice_id, params={"expand": ["payments"]}, options=options
                )
                listed = invoice.to_dict().get("payments")
                if not isinstance(listed, dict):
                    raise
                return [{"invoice": invoice_id, **i} for i in listed.get("data") or [] if isinstance(i, dict)]

        return await self._list(f"the payments of {invoice_id}", read)

    async def refresh(self, event: Mapping[str, Any], obj: StripeObject, held_version: int) -> Reported | None:
        retrieve = KINDS[obj.kind].retrieve  # None for a kind with no single object to read
        options = self._options(event)
        if retrieve is None or options is None:
            return None
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
    event_type = str(event["type"])
    spec = BY_EVENT.get(event_type)
    reports = spec.kind if spec is not None else None
    if reports == "invoice" and fetched.get("status") in SETTLED_INVOICE_EVENTS:
        event_type = SETTLED_INVOICE_EVENTS[fetched["status"]]
    elif reports == "checkout":
        if fetched.get("status") == "expired":
            event_type = "checkout.session.expired"
        elif fetched.get("payment_status") in ("paid", "no_payment_required"):
            event_type = "checkout.session.completed"
    created = max(int(event["created"]), held_version)
    return {**event, "type": event_type, "created": created, "data": {**event["data"], "object": fetched}}


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
