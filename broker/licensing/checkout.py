"""Buying from the app (POST /api/checkout): the broker makes the Checkout Session, the app opens
its URL in the browser and follows its license's stream with the machine token it got, and the
payment's webhooks unlock it there. No key is typed and no account is needed.

Two callers. Without a token (a first purchase) the broker creates a *pending* license and the
asking machine on it: the license exists so that the app can follow it at once, and is removed,
machine and all, when nobody pays (broker.licensing.pending). With a machine token (a trial, a
lapsed license) the checkout is for that license and that machine: buying from a trial keeps both.

Order, so that a refusal leaves nothing behind: the price and the per-address bound are checked,
then Stripe makes the session (unreachable: 503, refusing: 502, nothing written), then one
transaction writes the license, the machine and the `checkouts` row. Should that fail, the session
is expired at Stripe (best effort) and the answer is 503."""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from broker.licensing import keys
from broker.licensing.gateway import (
    SESSION_MAX_LIFETIME,
    SESSION_MIN_LIFETIME,
    CheckoutRequest,
    CheckoutSession,
    Gateway,
)
from broker.licensing.machines import BadRequest
from broker.licensing.store import MachineStore, new_license_id
from broker.settings import Settings
from broker.signing import tokens
from broker.storage.eventlog import EventLog
from broker.storage.licenses import LicenseStore
from broker.storage.schema import checkouts, stripe_objects

log = logging.getLogger("broker.licensing")

# Unpaid checkouts one client address may hold at once (each is a license and a machine until
# CHECKOUT_PENDING_TTL): a buyer who closes the tab and clicks Buy again has room to spare.
MAX_PENDING_PER_ADDRESS = 10


class TooManyPending(Exception):
    """The address holds MAX_PENDING_PER_ADDRESS unpaid checkouts (429)."""


class AlreadyEntitled(Exception):
    """The license of the machine token is entitled by a purchase already (409)."""


@dataclass(frozen=True, slots=True)
class Buyer:
    """Who asks: the client's address (its rate-limit bucket), and the machine. With a machine
    token, its license and machine; without, the fingerprint, name and platform of a new one."""

    address: str
    fingerprint: str
    name: str | None = None
    platform: str | None = None
    license_id: str | None = None
    machine_id: str | None = None


@dataclass(frozen=True, slots=True)
class Started:
    license_id: str
    machine_id: str
    token: str
    checkout_url: str
    expires_at: int  # when the checkout stops taking payment (and an unpaid pending license goes)

    def body(self) -> dict[str, Any]:
        return {
            "license_id": self.license_id,
            "machine_id": self.machine_id,
            "token": self.token,
            "checkout_url": self.checkout_url,
            "expires_at": self.expires_at,
        }


class CheckoutStore:
    """The `checkouts` rows, inside the caller's transaction."""

    @staticmethod
    def unsettled() -> Any:
        """Checkouts whose session no webhook has recorded yet (the ones an address holds open)."""
        o = stripe_objects
        return ~sa.exists().where(o.c.id == checkouts.c.id)

    @staticmethod
    async def pending_of(conn: AsyncConnection, address: str) -> int:
        c = checkouts
        query = sa.select(sa.func.count()).where(c.c.address == address, CheckoutStore.unsettled())
        return int(await conn.scalar(query) or 0)

    @staticmethod
    async def lock_address(conn: AsyncConnection, address: str) -> None:
        """Serialise the checkouts of one address (the count, then the insert). SQLite serialises
        every writer anyway."""
        if conn.dialect.name == "postgresql":
            lock = sa.text("SELECT pg_advisory_xact_lock(hashtextextended(:k, 0))")
            await conn.execute(lock, {"k": f"checkout-address:{address}"})


class Checkouts:
    def __init__(self, engine: AsyncEngine, settings: Settings, gateway: Gateway, events: EventLog) -> None:
        self.engine = engine
        self.settings = settings
        self.gateway = gateway
        self.events = events
        self.prices = settings.stripe_prices
        self.ttl = settings.checkout_pending_ttl
        # Checkouts of each address between the count and their commit in this process: counted
        # with the pending ones, so that a burst does not make sessions at Stripe only to drop them.
        self._in_flight: dict[str, int] = {}

    def price(self, asked: Any) -> str:
        """The price asked for (one of STRIPE_PRICES), or the first."""
        if asked is None:
            return self.prices[0]
        if not isinstance(asked, str) or asked not in self.prices:
            raise BadRequest(f"price: one of {', '.join(self.prices)}")
        return asked

    async def pending(self, address: str) -> int:
        async with self.engine.connect() as conn:
            return await CheckoutStore.pending_of(conn, address)

    async def start(self, buyer: Buyer, price: str, *, success_url: str, origin: str) -> Started:
        """TooManyPending (429), AlreadyEntitled (409), GatewayUnavailable (503), GatewayRefused
        (502); nothing is left behind by any of them."""
        if await self.pending(buyer.address) + self._in_flight.get(buyer.address, 0) >= MAX_PENDING_PER_ADDRESS:
            raise TooManyPending
        self._in_flight[buyer.address] = self._in_flight.get(buyer.address, 0) + 1
        try:
            return await self._start(buyer, price, success_url, origin)
        finally:
            if (left := self._in_flight.pop(buyer.address) - 1) > 0:
                self._in_flight[buyer.address] = left

    async def _start(self, buyer: Buyer, price: str, success_url: str, origin: str) -> Started:
        customer = None
        if buyer.license_id is not None:
            state = (await self.events.current(buyer.license_id)).fields()["state"]
            if state["entitled"] and state["kind"] != "trial":
                raise AlreadyEntitled
            customer = state["customer"]  # a lapsed license buys again as the same Stripe customer
        mode = await self.gateway.mode(price)
        license_id = buyer.license_id or new_license_id()
        now = time.time()
        lifetime = min(max(self.ttl, SESSION_MIN_LIFETIME), SESSION_MAX_LIFETIME)
        request = CheckoutRequest(
            license_id=license_id,
            price=price,
            mode=mode,
            success_url=success_url,
            expires_at=int(now + lifetime),
            customer=customer,
            idempotency_key=f"license-broker-checkout-{secrets.token_hex(16)}",
            origin=origin,
        )
        session = await self.gateway.create_checkout(request)
        try:
            machine_id = await self._record(buyer, license_id, session, price, mode, now)
        except BaseException:
            await self.abandon(session.id)
            raise
        token, _ = tokens.mint_machine(self.settings, license_id, machine_id, buyer.fingerprint)
        expires_at = min(session.expires_at, int(now + self.ttl))
        log.info("license %s: checkout %s (%s, %s) for machine %s", license_id, session.id, price, mode, machine_id)
        return Started(license_id, machine_id, token, session.url, expires_at)

    async def _record(
        self, buyer: Buyer, license_id: str, session: CheckoutSession, price: str, mode: str, now: float
    ) -> str:
        """The license (new ones), the machine and the checkout row, in one transaction; the machine id."""
        created = datetime.fromtimestamp(now, UTC)
        async with self.engine.begin() as conn:
            await CheckoutStore.lock_address(conn, buyer.address)
            # Counted again under the lock: concurrent requests of one address cannot pass it together.
            if await CheckoutStore.pending_of(conn, buyer.address) >= MAX_PENDING_PER_ADDRESS:
                raise TooManyPending
            if buyer.machine_id is not None:
                machine_id = buyer.machine_id
            else:
                await LicenseStore.lock(conn, license_id)
                digest = keys.fingerprint_digest(buyer.fingerprint)
                machine_id = (await MachineStore.add(conn, license_id, digest, buyer.name, buyer.platform)).id
            await conn.execute(
                checkouts.insert().values(
                    id=session.id,
                    license_id=license_id,
                    machine_id=machine_id,
                    # A checkout asked for with the token of a license still pending (made by
                    # an earlier, unpaid checkout) is pending too: the license goes with the last.
                    pending_license=buyer.license_id is None or await _pending(conn, license_id),
                    address=buyer.address,
                    price=price,
                    mode=mode,
                    created_at=created,
                    expires_at=datetime.fromtimestamp(now + self.ttl, UTC),
                    closes_at=datetime.fromtimestamp(session.expires_at, UTC),
                )
            )
        return machine_id

    async def abandon(self, session_id: str) -> None:
        """Best effort: a session whose rows could not be written is closed at Stripe."""
        try:
            await self.gateway.expire_checkout(session_id)
        except Exception as exc:
            log.warning("checkout %s: not expired at Stripe (%s); it expires there by itself", session_id, exc)


async def _pending(conn: AsyncConnection, license_id: str) -> bool:
    """Whether the license was made by a checkout that is still open (it is not the buyer's yet)."""
    query = sa.select(checkouts.c.id).where(checkouts.c.license_id == license_id, checkouts.c.pending_license)
    return (await conn.execute(query.limit(1))).first() is not None
