"""Where a checkout or a Billing Portal session is made: Stripe's API (`stripe.StripeClient` with
STRIPE_API_KEY; STRIPE_API_BASE points it elsewhere in the tests), or, in development mode without
a key, pages of this broker (license_broker.dev) that post the signed events Stripe would. One small
interface; the use cases (broker.licensing.checkout, .portal) never know which.

Failures, as the routes answer them: Stripe not reachable (connection refused, timeout) is
`GatewayUnavailable` (503, try again); Stripe answering with an error (a bad key, an unknown price,
its own failure) is `GatewayRefused` (502, the message says what Stripe said)."""

from __future__ import annotations

import asyncio
import logging
import secrets
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import stripe

log = logging.getLogger("broker.licensing")

Mode = Literal["subscription", "payment"]
SessionStatus = Literal["expired", "complete"]
# A request to Stripe's API never holds a buyer (or the cleanup) longer than this.
API_TIMEOUT = 10.0
# What Stripe allows for a Checkout Session's expires_at: 30 minutes to 24 hours from its creation.
SESSION_MIN_LIFETIME = 30 * 60
SESSION_MAX_LIFETIME = 24 * 3600

T = TypeVar("T")


class GatewayUnavailable(Exception):
    """Stripe did not answer (503)."""


class GatewayRefused(Exception):
    """Stripe answered with an error (502); the message is Stripe's."""


@dataclass(frozen=True, slots=True)
class CheckoutRequest:
    license_id: str
    price: str
    mode: Mode
    success_url: str
    expires_at: int  # epoch seconds, within Stripe's 30 min to 24 h
    customer: str | None  # the license's Stripe customer, when it has one (a lapsed license)
    idempotency_key: str
    origin: str  # where this broker is reached (PUBLIC_URL or the served origin): the local pages


@dataclass(frozen=True, slots=True)
class CheckoutSession:
    id: str
    url: str
    expires_at: int  # when Stripe stops taking payment for it


@dataclass(frozen=True, slots=True)
class PortalRequest:
    license_id: str
    customer: str
    return_url: str | None
    origin: str


class Gateway(ABC):
    @abstractmethod
    async def mode(self, price: str) -> Mode:
        """A recurring price is bought by subscription, any other by one payment."""

    @abstractmethod
    async def create_checkout(self, request: CheckoutRequest) -> CheckoutSession: ...

    @abstractmethod
    async def expire_checkout(self, session_id: str) -> SessionStatus:
        """Close a session nobody paid: `expired` (now, or before), or `complete` when it was
        paid after all (its webhooks settle it)."""

    @abstractmethod
    async def create_portal(self, request: PortalRequest) -> str:
        """The URL of a Billing Portal session for the customer."""

    async def close(self) -> None:
        """Release connections; idempotent."""


class _FormBodyHTTPXClient(stripe.HTTPXClient):
    """stripe's httpx client hands a POST's encoded form to httpx as `data=<str>`, which httpx
    deprecates (a DeprecationWarning per request, an error under the suite's warnings policy);
    `content=` is the same bytes on the wire. GETs carry no body and are left as they are."""

    def _get_request_args_kwargs(self, method: str, url: str, headers: Mapping[str, str], post_data: Any) -> list[Any]:
        args: list[Any] = super()._get_request_args_kwargs(method, url, headers, post_data)
        if isinstance(post_data, str | bytes) and post_data:
            kwargs = args[1]
            kwargs["content"] = kwargs.pop("data")
        return args


class StripeGateway(Gateway):
    def __init__(self, api_key: str, api_base: str | None = None) -> None:
        self.http = _FormBodyHTTPXClient(timeout=API_TIMEOUT)
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


# Development mode offers these (DEV_PRICES in broker.settings); any other listed price is a subscription.
LOCAL_MODES: dict[str, Mode] = {"price_dev_monthly": "subscription", "price_dev_lifetime": "payment"}


class LocalGateway(Gateway):
    """Development mode without STRIPE_API_KEY: the checkout and the portal are pages of this broker
    (license_broker.dev), whose buttons post the signed events Stripe would. Nothing leaves it."""

    async def mode(self, price: str) -> Mode:
        return LOCAL_MODES.get(price, "subscription")

    async def create_checkout(self, request: CheckoutRequest) -> CheckoutSession:
        session_id = "cs_test_dev_" + secrets.token_hex(16)
        return CheckoutSession(session_id, f"{request.origin}/dev/checkout/{session_id}", request.expires_at)

    async def expire_checkout(self, session_id: str) -> SessionStatus:
        return "expired"  # nothing to close: the page's own buttons post what happens

    async def create_portal(self, request: PortalRequest) -> str:
        return f"{request.origin}/dev/portal/{request.license_id}"
