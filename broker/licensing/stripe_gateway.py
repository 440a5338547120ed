"""The gateway to Stripe's API (`stripe.StripeClient`), for a broker with STRIPE_API_KEY.

A module of its own so that the `stripe` package (with the HTTP libraries it loads, ~0.1-0.3 s) is
imported only by a stream process that makes checkouts through Stripe (stream.desktop.open_gateway);
the interface, its errors and the development gateway stay in broker.licensing.gateway."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import TypeVar

import stripe

from broker.licensing.gateway import (
    API_TIMEOUT,
    CheckoutRequest,
    CheckoutSession,
    Gateway,
    GatewayRefused,
    GatewayUnavailable,
    Mode,
    PortalRequest,
    SessionStatus,
)

log = logging.getLogger("broker.licensing")

T = TypeVar("T")


class StripeGateway(Gateway):
    def __init__(self, api_key: str, api_base: str | None = None) -> None:
        self.http = stripe.HTTPXClient(timeout=API_TIMEOUT)
        # No retries here: the buyer's click waits on this, and the app can click again.
        self.client = stripe.StripeClient(
            api_key, base_addresses={"api": api_base} if api_base else None, http_client=self.http,
            max_network_retries=0,
        )  # fmt: skip
        # A price's type never changes at Stripe (a new price is a new id): read once per process.
        self._modes: dict[str, Mode] = {}

    async def _call(self, what: str, request: Awaitable[T]) -> T:
        try:
            async with asyncio.timeout(API_TIMEOUT):
                return await request
        except (stripe.APIConnectionError, TimeoutError) as exc:
            log.warning("Stripe's API did not answer (%s): %s", what, exc)
            raise GatewayUnavailable("Stripe is not reachable, try again later") from None
        except stripe.StripeError as exc:
            message = exc.user_message or str(exc) or type(exc).__name__
            log.warning("Stripe's API refused (%s): %s", what, message)
            raise GatewayRefused(f"Stripe refused: {message}") from None

    async def mode(self, price: str) -> Mode:
        if (known := self._modes.get(price)) is None:
            found = await self._call(f"price {price}", self.client.v1.prices.retrieve_async(price))
            known = self._modes[price] = "subscription" if found.recurring else "payment"
        return known

    async def create_checkout(self, request: CheckoutRequest) -> CheckoutSession:
        ours = {"license_id": request.license_id}
        params: stripe.params.checkout.SessionCreateParams = {
            "mode": request.mode,
            "line_items": [{"price": request.price, "quantity": 1}],
            "success_url": request.success_url,
            "client_reference_id": request.license_id,
            # How the webhooks bind the session and what it makes to the license (docs/stripe.md).
            "metadata": ours,
            "expires_at": request.expires_at,
        }
        if request.mode == "subscription":
            params["subscription_data"] = {"metadata": ours}
        else:
            # Stripe refuses subscription_data in payment mode; the payment carries the id instead.
            params["payment_intent_data"] = {"metadata": ours}
        if request.customer is not None:
            params["customer"] = request.customer
        elif request.mode == "payment":
            # A customer of its own, so that the Billing Portal can show the buyer's receipts.
            params["customer_creation"] = "always"
        options: stripe.RequestOptions = {"idempotency_key": request.idempotency_key}
        session = await self._call(
            f"checkout for {request.license_id}", self.client.v1.checkout.sessions.create_async(params, options=options)
        )
        if not session.url:
            raise GatewayRefused("Stripe refused: the Checkout Session has no URL")
        return CheckoutSession(session.id, session.url, int(session.expires_at))

    async def expire_checkout(self, session_id: str) -> SessionStatus:
        sessions = self.client.v1.checkout.sessions
        try:
            await self._call(f"expire {session_id}", sessions.expire_async(session_id))
            return "expired"
        except GatewayRefused:
            # Only open sessions can be expired: read what it is instead.
            found = await self._call(f"read {session_id}", sessions.retrieve_async(session_id))
            if found.status == "open":
                raise
            return "complete" if found.status == "complete" else "expired"

    async def create_portal(self, request: PortalRequest) -> str:
        params: stripe.params.billing_portal.SessionCreateParams = {"customer": request.customer}
        if request.return_url is not None:
            params["return_url"] = request.return_url
        portal = await self._call(
            f"portal for {request.license_id}", self.client.v1.billing_portal.sessions.create_async(params)
        )
        return str(portal.url)

    async def close(self) -> None:
        await self.http.close_async()  # type: ignore[no-untyped-call]  # stripe leaves it unannotated
