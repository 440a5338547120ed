"""Where a checkout or a Billing Portal session is made: Stripe's API (`StripeGateway` in
broker.licensing.stripe_gateway, `stripe.StripeClient` with STRIPE_API_KEY; STRIPE_API_BASE points
it elsewhere in the tests), or, in development mode without
a key, pages of this broker (license_broker.dev) that post the signed events Stripe would. One small
interface; the use cases (broker.licensing.checkout, .portal) never know which.

Failures, as the routes answer them: Stripe not reachable (connection refused, timeout) is
`GatewayUnavailable` (503, try again); Stripe answering with an error (a bad key, an unknown price,
its own failure) is `GatewayRefused` (502, the message says what Stripe said)."""

from __future__ import annotations

import logging
import secrets
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Literal, TypeVar

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
