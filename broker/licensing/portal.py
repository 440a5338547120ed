"""Managing a subscription from the app (POST /api/portal): a Stripe Billing Portal session for the
license's customer. What the buyer changes there (cancel, resume, a new card) reaches the app
through the webhooks like any other change."""

from __future__ import annotations

from broker.licensing.gateway import Gateway, PortalRequest
from broker.settings import Settings
from broker.storage.eventlog import EventLog


class NoCustomer(Exception):
    """The license has no Stripe customer yet (a trial, an unpaid checkout): nothing to manage (409)."""


class Portal:
    def __init__(self, settings: Settings, gateway: Gateway, events: EventLog) -> None:
        self.settings = settings
        self.gateway = gateway
        self.events = events

    def return_url(self, origin: str | None) -> str | None:
        """PORTAL_RETURN_URL, else PUBLIC_URL/activate (else the served origin's, in development
        mode), else none: the portal's own default."""
        if self.settings.portal_return_url:
            return self.settings.portal_return_url
        base = self.settings.public_url or origin
        return f"{base}/activate" if base else None

    async def open(self, license_id: str, origin: str) -> str:
        """The portal session's URL; NoCustomer, GatewayUnavailable (503), GatewayRefused (502)."""
        state = (await self.events.current(license_id)).fields()["state"]
        customer = state.get("customer")
        if not customer:
            raise NoCustomer
        request = PortalRequest(license_id, customer, self.return_url(origin if self.settings.dev else None), origin)
        return await self.gateway.create_portal(request)
