"""Follow one license from a Python desktop app.

    verifier = LeaseVerifier(PINNED_PEM)                  # shipped with the app
    client = LicenseClient(URL, "lic_123", get_token, verifier=verifier, cache="~/.myapp/lease")
    client.on_entitlement = lambda entitled: set_locked(not entitled)
    set_locked(not client.is_entitled())      # at once, offline too: from the cached lease
    async for event in client:                # reconnects for ever, resuming where it left off
        show_status(event["status"])

or, with a callback: `await client.run(on_event)`. `client.state` is the last state received;
`client.lease` the newest valid lease (received, or read from the cache); `client.status` the
connection's ("inactive", "connecting", "live", "reconnecting", "unauthorized", "stopped").

With a license key instead of a token from the seller's web app (docs/protocol.md):

    client = LicenseClient(URL, app_id="com.example.draw", verifier=verifier, cache="~/.myapp/lease")
    if not client.activated:
        await client.activate(ask_the_user_for_the_key())   # MachineLimitReached: client.release(...)
    async for event in client:                # follows the stream with the machine token
        ...

The activation (license id, machine id, machine token) is kept beside the cache
(`<cache>.machine`, 0600); the token is renewed on the stream and before it is half spent; only
leases issued to this machine (its id and fingerprint) count.

Or with nothing typed at all (docs/protocol.md, "Buying, trying and managing from the app"):

    purchase = await client.buy()             # a checkout for this machine
    webbrowser.open(purchase.checkout_url)
    await purchase                            # paid: unlocked; CheckoutExpired if it ended unpaid
    trial = await client.start_trial()        # TrialUsed: this machine has had one
    webbrowser.open(await client.portal())    # NoCustomer: nothing bought yet
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import os
import random
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Literal

import httpx
from httpx_sse import ServerSentEvent, aconnect_sse

from license_broker_client.cache import LeaseCache
from license_broker_client.errors import (
    BrokerError,
    CheckoutExpired,
    MachineNotFound,
    MachineReleased,
    NotActivated,
    Unauthorized,
    error_of,
    retry_after_seconds,
)
from license_broker_client.fingerprint import MachineIdUnavailable
from license_broker_client.holder import LeaseHolder
from license_broker_client.leases import InvalidLease, Lease, LeaseVerifier
from license_broker_client.license_keys import normalize_license_key
from license_broker_client.machine_routes import MachineRoutes, bearer, license_auth
from license_broker_client.machines import Activation, Credentials, MachineFile, MachineList
from license_broker_client.purchases import Purchase, Trial
from license_broker_client.this_machine import ThisMachine, default_name
from license_broker_client.watermark import Watermark

log = logging.getLogger("license_broker_client")

# "inactive": a client created with app_id that has no machine activated yet waits for activate().
Status = Literal["inactive", "connecting", "live", "reconnecting", "unauthorized", "stopped"]
Trust = Literal["pinned", "unverified"]
TokenSource = str | Callable[[], str | Awaitable[str]]

# The expiry timer wakes at least this often (seconds): a machine that slept, or a clock that was
# moved, is noticed within it (timers run on the monotonic clock, leases expire on the wall clock).
EXPIRY_CHECK_INTERVAL = 60.0

UNVERIFIED = (
    "license_broker_client: no pinned lease key: leases are not verified, the app "
    "follows the live state only, which anything answering at %s can fake, and it never unlocks "
    "offline. Pin the broker's public key: LeaseVerifier(<what `license-broker keys public` prints>)."
)

__all__ = ["LicenseClient", "Status", "TokenSource", "Trust", "Unauthorized"]


class LicenseClient:
    def __init__(
        self,
        base_url: str,
        license_id: str | None = None,
        token: TokenSource | None = None,
        *,
        app_id: str | None = None,
        machine_id: str | None = None,
        machine_file: MachineFile | str | os.PathLike[str] | None = None,
        verifier: LeaseVerifier | None = None,
        cache: LeaseCache | str | os.PathLike[str] | None = None,
        watermark: Watermark | str | os.PathLike[str] | None = None,
        on_lease: Callable[[Lease], None] | None = None,
        on_entitlement: Callable[[bool], None] | None = None,
        on_status: Callable[[Status], None] | None = None,
        on_rejected: Callable[[InvalidLease], None] | None = None,
        last_event_id: int | None = None,
        min_backoff: float = 0.5,
        max_backoff: float = 30.0,
        read_timeout: float = 45.0,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        """Either `license_id` and `token` (a subscriber token from the seller's web app), or
        `app_id` (your app's own salt for the machine fingerprint): the license then comes from
        `activate(key)`. `machine_id` replaces the OS machine id (a system the client does not
        know); `machine_file` where the activation is kept (default `<cache>.machine`)."""
        if app_id is None and (license_id is None or token is None):
            raise TypeError("LicenseClient: give license_id and token (from your web app), or app_id= (license keys)")
        if app_id is not None and (license_id is not None or token is not None):
            raise TypeError("LicenseClient: with app_id= the license and its token come from activate(key)")
        self.base_url = base_url.rstrip("/")
        self._license_id = license_id
        self._url: str | None = None
        self.token = token
        self.app_id = app_id
        self.verifier = verifier
        self.cache = cache if isinstance(cache, LeaseCache) or cache is None else LeaseCache(cache)
        if watermark is None and self.cache is not None:
            # Its own file beside the cache, unless the app puts it elsewhere.
            watermark = self.cache.path.with_name(self.cache.path.name + ".watermark")
        self.watermark = watermark if isinstance(watermark, Watermark) or watermark is None else Watermark(watermark)
        # Callbacks (plain functions, called on the event loop):
        self.on_lease = on_lease  # each lease that verifies and replaces the one held
        self.on_entitlement = on_entitlement  # is_entitled() changed: lock or unlock now
        self.on_status = on_status  # the connection's status changed
        self.on_rejected = on_rejected  # a lease that did not verify
        self.last_event_id = last_event_id
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        # Longer than the server's heartbeat (15 s): silence beyond it means a dead connection.
        self.read_timeout = read_timeout
        self.state: dict[str, Any] | None = None
        self.status: Status = "stopped"
        self.connections = 0
        self.rejected_leases = 0
        # Without a pinned key (no verifier, or one given no key) leases prove nothing: the client
        # follows the live state only, and says so.
        self._pinned = verifier is not None and bool(verifier.kids)
        self.trust: Trust = "pinned" if self._pinned else "unverified"
        self._http = http
        self._routes = MachineRoutes(self.base_url, http)
        self._machine: ThisMachine | None = None
        if app_id is not None:
            if machine_file is None and self.cache is not None:
                machine_file = self.cache.path.with_name(self.cache.path.name + ".machine")
            if machine_file is not None and not isinstance(machine_file, MachineFile):
                machine_file = MachineFile(machine_file)
            self._machine = ThisMachine(app_id, self._routes, machine_file, machine_id)
        self._holder: LeaseHolder | None = None
        if self._pinned and verifier is not None and license_id is not None:
            self._holder = LeaseHolder(license_id, verifier, self.cache, self.watermark)
        self._entitled = False  # the app starts locked; on_entitlement reports each change from there
        self._new_lease = asyncio.Event()
        self._activation_changed = asyncio.Event()  # activate() or a release: (re)connect as it says
        self._retry: float | None = None
        # The Retry-After of a 429 or 503 (a server or a license at its stream limit).
        self._retry_after: float | None = None
        # Buying from the app: the checkouts waiting for their payment; the license a checkout
        # made in this run while it is unpaid (removed by the broker if nobody pays), and whether
        # it was (so that its stream's 401 returns the client to "inactive" instead of raising).
        self._purchases: list[Purchase] = []
        self._pending_license: str | None = None
        self._unpaid_checkout_ended = False
        self._iterating = 0  # iterations of this client running (a purchase waits on theirs)
        if not self._pinned:
            log.warning(UNVERIFIED, base_url)

    # --- which license ----------------------------------------------------------------------

    @property
    def license_id(self) -> str:
        """The license followed. With app_id, the activated one: NotActivated before activate()."""
        if self._machine is None:
            assert self._license_id is not None
            return self._license_id
        credentials = self._machine.credentials
        if credentials is None:
            raise NotActivated("no machine is activated here: activate(key) first")
        return credentials.license_id

    @license_id.setter
    def license_id(self, value: str) -> None:
        if self._machine is not None:
            raise AttributeError("license_id: with app_id the license comes from activate(key)")
        self._license_id = value

    @property
    def url(self) -> str:
        """The license's stream (settable, as in 0.2: another stream process, say)."""
        return self._url or f"{self.base_url}/api/licenses/{self.license_id}/events"

    @url.setter
    def url(self, value: str) -> None:
        if self._machine is not None:
            raise AttributeError("url: with app_id the license's stream follows the activation")
        self._url = value

    @property
    def activated(self) -> bool:
        """A machine is activated here (with app_id): the client has a license to follow."""
        return self._machine is not None and self._machine.credentials is not None

    @property
    def machine_id(self) -> str | None:
        credentials = self._machine.credentials if self._machine is not None else None
        return None if credentials is None else credentials.machine_id

    @property
    def fingerprint(self) -> str | None:
        """This machine's fingerprint (with app_id): what activations send and leases name."""
        return None if self._machine is None else self._machine.fingerprint

    def _current_holder(self) -> LeaseHolder | None:
        """The holder of the license followed now: with app_id, one per activation (license and
        machine), bound to this machine."""
        if self._machine is None or not self._pinned or self.verifier is None:
            return self._holder
        credentials = self._machine.credentials
        if credentials is None:
            return None
        holder = self._holder
        machine = holder.machine if holder is not None else None
        if (
            holder is None
            or holder.license_id != credentials.license_id
            or machine is None
            or (machine.machine_id != credentials.machine_id)
        ):
            try:
                binding = self._machine.binding()
            except MachineIdUnavailable as exc:
                log.warning("no machine fingerprint, so no lease counts: %s", exc)
                return None
            holder = LeaseHolder(credentials.license_id, self.verifier, self.cache, self.watermark, binding)
            self._holder = holder
        return holder

    # --- leases -----------------------------------------------------------------------------

    @property
    def lease(self) -> Lease | None:
        """The newest valid lease: received on the stream, or else the cached one (read, and
        verified with the pinned keys, on first use: no I/O in the constructor)."""
        holder = self._current_holder()
        return None if holder is None else holder.lease

    def is_entitled(self) -> bool:
        """Whether the app may unlock now. With a pinned key: only on a valid, unexpired lease for
        this license (and, activated with a key, issued to this machine), online or off, with a
        clock that was not turned back. Without one: the last state received, unsigned, online
        only."""
        if not self._pinned:
            return bool(self.state and self.state.get("entitled") is True)
        holder = self._current_holder()
        return holder is not None and holder.is_entitled()

    async def accept_lease(self, token: str) -> Lease | None:
        """Verify a lease (from the stream, or from GET /api/licenses/{id}'s `lease`) and hold
        it, and cache it, if it supersedes the one held. None if it does not verify."""
        holder = self._current_holder()
        if holder is None:
            return None
        try:
            lease = holder.accept(token)
        except InvalidLease as exc:
            self.rejected_leases += 1
            log.warning("lease rejected: %s", exc)
            if self.on_rejected is not None:
                self.on_rejected(exc)
            return None
        if lease is not None:
            self._new_lease.set()
            if self.on_lease is not None:
                self.on_lease(lease)
        self._check_entitlement()
        self._settle_purchases()
        return lease

    def _check_entitlement(self) -> None:
        entitled = self.is_entitled()
        if entitled != self._entitled:
            self._entitled = entitled
            if self.on_entitlement is not None:
                self.on_entitlement(entitled)

    async def _watch_expiry(self) -> None:
        """The lease-expiry timer: the app is told when its lease runs out (offline that long)."""
        while True:
            holder = self._current_holder()
            left = holder.seconds_left() if holder is not None else None
            delay = EXPIRY_CHECK_INTERVAL if left is None else min(max(left, 0.0) + 0.05, EXPIRY_CHECK_INTERVAL)
            # A new lease re-arms the timer at once.
            with contextlib.suppress(TimeoutError):
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for returns when the event is
                # set in the tick the task is cancelled, and the loop never ends (cpython#86296).
                async with asyncio.timeout(delay):
                    await self._new_lease.wait()
            self._new_lease.clear()
            try:
                holder = self._current_holder()
                if holder is not None:
                    holder.tick()
                self._check_entitlement()
            except Exception:  # the app's callback: reported, and the timer keeps running
                log.exception("license_broker_client: on_entitlement failed")

    # --- keys and machines (docs/protocol.md) -----------------------------------------------

    def _this_machine(self) -> ThisMachine:
        if self._machine is None:
            raise TypeError("this client follows a token from your web app: create it with app_id= to use keys")
        return self._machine

    async def activate(self, key: str, *, name: str | None = None, platform: str | None = None) -> Activation:
        """Bind this machine to the license of `key` (the same machine again after a reinstall),
        keep its token beside the cache and hold the lease the broker issued to it; a client
        iterated already follows the license from here. MalformedLicenseKey (before sending),
        InvalidLicenseKey, MachineLimitReached (`.machines`: release one with `release(id,
        key=key)`, then activate again), RateLimited (`.retry_after`), BrokerUnavailable,
        MachineIdUnavailable. `name` defaults to the computer's name, `platform` to sys.platform."""
        machine = self._this_machine()
        activation, credentials = await machine.activate(key, name, platform)
        previous = machine.credentials
        machine.store(credentials)
        if previous is None or previous.license_id != credentials.license_id:
            self.state, self.last_event_id = None, None  # another license: its own seqs
        if previous != credentials:
            self._activation_changed.set()  # a stream of the old activation reconnects
        self._switched(credentials)
        if activation.lease is not None:
            await self.accept_lease(activation.lease)
        self._check_entitlement()
        return activation

    async def _authorization(self, key: str | None) -> str:
        if key is not None:
            return license_auth(normalize_license_key(key))
        if self._machine is None:
            assert self.token is not None
            token = self.token() if callable(self.token) else self.token
            return bearer(await token if inspect.isawaitable(token) else token)
        credentials = self._machine.credentials
        if credentials is None:
            raise NotActivated("no machine is activated here: activate(key) first, or give key=")
        return bearer(credentials.token)

    async def machines(self, *, key: str | None = None) -> MachineList:
        """The license's machines (oldest first; `current` is this one). With `key=`: for an app
        whose activation met the limit, which has no token yet."""
        try:
            return await self._routes.machines(await self._authorization(key))
        except MachineReleased:
            self._forget_machine()
            raise

    async def release(self, machine_id: str, *, key: str | None = None) -> None:
        """Release (deactivate) a machine of the license: its token is refused at once and its
        streams end. This machine's own id: the client forgets its activation and its lease."""
        own = machine_id == self.machine_id
        try:
            await self._routes.release(machine_id, await self._authorization(key))
        except MachineReleased:
            self._forget_machine()
            raise
        except MachineNotFound:
            if own:
                self._forget_machine()  # released already, elsewhere
            raise
        if own:
            self._forget_machine()

    async def deactivate(self) -> None:
        """Release this machine (its place is free for another) and forget the activation."""
        machine_id = self.machine_id
        if machine_id is None:
            raise NotActivated("no machine is activated here")
        with contextlib.suppress(MachineNotFound):
            await self.release(machine_id)

    async def renew_token(self) -> None:
        """A fresh machine token now (POST /api/machines/{id}/token), and the lease with it. The
        client renews by itself: on the stream, and before connecting once half of it is spent."""
        credentials = self._this_machine().credentials
        if credentials is None:
            raise NotActivated("no machine is activated here")
        try:
            renewed, lease = await self._routes.renew(credentials)
        except MachineReleased:
            self._forget_machine()
            raise
        self._store_token(renewed)
        if lease is not None:
            await self.accept_lease(lease)

    async def license_key(self) -> str:
        """The license's key, to show for the user's next computer."""
        try:
            return await self._routes.license_key(self.license_id, await self._authorization(None))
        except MachineReleased:
            self._forget_machine()
            raise

    def _store_token(self, renewed: Credentials) -> None:
        machine = self._machine
        if machine is not None and machine.credentials is not None:
            current = machine.credentials
            if (current.license_id, current.machine_id) == (renewed.license_id, renewed.machine_id):
                machine.store(renewed)

    def _forget_machine(self) -> None:
        """This machine was released: its activation, its lease and the cached one go (the
        watermark stays); the app is locked and asks for the key again."""
        if self._machine is None:
            return
        credentials = self._machine.credentials
        if credentials is not None and (
            credentials.license_id == self._pending_license or self._never_paid(credentials)
        ):
            # Not a machine released by its user: the broker removed the license an unpaid
            # checkout made for it (CHECKOUT_PENDING_TTL). The app is back to where it started.
            self._pending_license = None
            self._unpaid_checkout_ended = True
        for purchase in self._purchases:
            if purchase.pending:
                purchase._fail(CheckoutExpired("the checkout ended unpaid: the broker removed the license it made",
                                                expires_at=purchase.expires_at))  # fmt: skip
            else:
                purchase._fail(MachineReleased("this machine was released (deactivated) before the purchase was paid"))
        self._purchases.clear()
        holder = self._current_holder()
        if holder is not None:
            holder.forget()
        self._machine.forget()
        self._holder = None
        self.state, self.last_event_id = None, None
        self._activation_changed.set()
        self._check_entitlement()

    # --- buying, trying and managing from the app (docs/protocol.md) --------------------------

    async def buy(self, price: str | None = None, *, name: str | None = None, platform: str | None = None) -> Purchase:
        """A checkout for this machine (POST /api/checkout): open `purchase.checkout_url` in the
        browser, then `await purchase` (see Purchase). Without an activation the broker makes a
        license for it (unpaid, it is removed at `expires_at`); with one (a trial, a lapsed
        license) the checkout is for that license and this machine, which stay. Another click on
        Buy while an earlier checkout is unpaid makes a checkout (and a license) of its own: the
        earlier purchase ends (BrokerError), its license is removed when it expires. The machine token
        is kept as after `activate()`, so an iterated client follows the license at once, and so
        does the client after a restart. `price`: one of the seller's STRIPE_PRICES (default the
        first). UnknownPrice, AlreadyPaid (offer `portal()`), NotOffered, RateLimited
        (`.retry_after`), BrokerUnavailable (StripeRefused: the seller's Stripe configuration),
        MachineReleased, MachineIdUnavailable."""
        machine = self._this_machine()
        if price is not None and not isinstance(price, str):
            raise TypeError("price: a Stripe price id (str), or None for the seller's default")
        previous = machine.credentials
        # The license of an unpaid checkout is not bought for again: the broker removes it, with
        # every checkout of it, when the first one expires.
        unpaid = previous is not None and (previous.license_id == self._pending_license or self._never_paid(previous))
        auth = None if previous is None or unpaid else bearer(await self._token())
        try:
            credentials, url, expires_at = await self._routes.checkout(
                machine.fingerprint, default_name() if name is None else name, platform or sys.platform, price, auth
            )
        except MachineReleased:
            self._forget_machine()
            raise
        pending = auth is None
        if pending:
            self._pending_license = credentials.license_id
        self._take(credentials)
        purchase = Purchase(credentials.license_id, credentials.machine_id, url, expires_at, pending=pending,
                            follow=self._follow_purchase)  # fmt: skip
        self._purchases.append(purchase)
        self._settle_purchases()
        return purchase

    async def start_trial(self, *, name: str | None = None, platform: str | None = None) -> Trial:
        """A trial without a card (POST /api/trials): a license of its own with this machine on
        it, entitled until `trial.trial_end`; the client holds its lease and follows it from here
        (it locks at the end, online or off). Buy from it with `buy()`: the license and the
        machine stay. TrialUsed (one per machine, ever), NotOffered (trials are off), RateLimited,
        BrokerUnavailable, MachineIdUnavailable."""
        machine = self._this_machine()
        credentials, lease, trial_end = await self._routes.start_trial(
            machine.fingerprint, default_name() if name is None else name, platform or sys.platform
        )
        self._take(credentials)
        if lease is not None:
            await self.accept_lease(lease)
        self._check_entitlement()
        return Trial(credentials.license_id, credentials.machine_id, trial_end, self.is_entitled())

    async def portal(self) -> str:
        """The Stripe Billing Portal for the license's customer (POST /api/portal): a URL to open
        in the browser at once (it is a session of its own). What the buyer changes there reaches
        the app on the stream. NoCustomer (nothing bought yet: offer `buy()`), NotOffered,
        RateLimited, StripeRefused, BrokerUnavailable, NotActivated, MachineReleased."""
        try:
            return await self._routes.portal(await self._authorization(None))
        except MachineReleased:
            self._forget_machine()
            raise

    def _take(self, credentials: Credentials) -> None:
        """Keep the credentials a checkout or a trial gave, as an activation's: the same machine
        gets a new token (its stream goes on), another one is followed from here."""
        machine = self._this_machine()
        previous = machine.credentials
        machine.store(credentials)
        if previous is not None and (previous.license_id, previous.machine_id) == (
            credentials.license_id,
            credentials.machine_id,
        ):
            return
        if previous is None or previous.license_id != credentials.license_id:
            self.state, self.last_event_id = None, None
        self._activation_changed.set()
        self._switched(credentials)

    def _switched(self, credentials: Credentials) -> None:
        """This machine follows `credentials` now: purchases of another license or machine end."""
        self._unpaid_checkout_ended = False
        if self._pending_license is not None and self._pending_license != credentials.license_id:
            self._pending_license = None
        for purchase in self._purchases:
            if (purchase.license_id, purchase.machine_id) != (credentials.license_id, credentials.machine_id):
                replaced = f"this machine follows license {credentials.license_id} now: the checkout was replaced"
                purchase._fail(BrokerError(replaced))
        self._purchases = [p for p in self._purchases if not p.done()]

    def _never_paid(self, credentials: Credentials) -> bool:
        """The license followed has had no purchase and is no trial (`status: "none"`): the one
        an unpaid checkout made (known from the stream, also after a restart)."""
        state = self.state or {}
        return state.get("license_id") == credentials.license_id and state.get("status") == "none"

    def _bought(self, credentials: Credentials) -> bool:
        """The license followed is paid for (not a trial's entitlement): with a pinned key, on a
        lease that verifies and is this machine's; without one, on the live state."""
        if self._pinned:
            lease = self.lease
            return (
                lease is not None
                and lease.license_id == credentials.license_id
                and lease.machine_id == credentials.machine_id
                and lease.entitled
                and lease.trial_end is None
                and self.is_entitled()
            )
        state = self.state or {}
        kind = (state.get("state") or {}).get("kind")
        return state.get("license_id") == credentials.license_id and state.get("entitled") is True and kind != "trial"

    def _settle_purchases(self) -> None:
        credentials = self._machine.credentials if self._machine is not None else None
        if not self._purchases or credentials is None or not self._bought(credentials):
            return
        lease = self.lease if self._pinned else None
        for purchase in self._purchases:
            if (purchase.license_id, purchase.machine_id) == (credentials.license_id, credentials.machine_id):
                purchase._resolve(lease)
        self._purchases = [p for p in self._purchases if not p.done()]
        if self._pending_license == credentials.license_id:
            self._pending_license = None  # paid: the broker keeps it

    async def _follow_purchase(self, purchase: Purchase) -> None:
        """Wait for the purchase's outcome; follow the stream meanwhile unless the app does (a
        cancelled wait stops following; the purchase goes on)."""
        driver = asyncio.create_task(self._drive()) if self._iterating == 0 else None
        try:
            waiting: set[asyncio.Future[Any]] = {purchase._outcome}
            if driver is not None:
                waiting.add(driver)
            left = max(purchase.deadline - time.time(), 0.0)
            await asyncio.wait(waiting, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            if purchase.done():
                return
            if driver is not None and driver.done():
                error = None if driver.cancelled() else driver.exception()
                purchase._fail(error if isinstance(error, BrokerError) else
                               BrokerError(f"the license's stream ended: {error!r}"))  # fmt: skip
                return
            # The deadline (the loop's clock may run a little ahead of the wall clock's).
            ended = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(purchase.expires_at))
            purchase._fail(CheckoutExpired(f"the checkout ended unpaid at {ended} (its expires_at)",
                                           expires_at=purchase.expires_at))  # fmt: skip
            self._purchases = [p for p in self._purchases if not p.done()]
        finally:
            if driver is not None:
                await _cancel(driver)

    async def _drive(self) -> None:
        async for _ in self:
            pass

    # --- the stream -------------------------------------------------------------------------

    def _set_status(self, status: Status) -> None:
        if status != self.status:
            self.status = status
            if self.on_status is not None:
                self.on_status(status)

    async def _token(self) -> str:
        if self._machine is None:
            assert self.token is not None
            token = self.token() if callable(self.token) else self.token
            return await token if inspect.isawaitable(token) else token
        if self._machine.token_wants_renewal():
            try:
                await self.renew_token()
            except MachineReleased:
                raise
            except BrokerError as exc:  # the stream renews it too, and the token still works
                log.info("machine token not renewed now: %s", exc)
        credentials = self._machine.credentials
        if credentials is None:
            raise NotActivated("no machine is activated here")
        return credentials.token

    async def _headers(self) -> dict[str, str]:
        headers = {"authorization": f"Bearer {await self._token()}", "accept": "text/event-stream"}
        if self.last_event_id is not None:
            headers["last-event-id"] = str(self.last_event_id)
        return headers

    async def connect_once(self) -> AsyncIterator[dict[str, Any]]:
        """One connection: the states it carries, until the server or the network ends it (or,
        with app_id, an activation or a release changes what to follow)."""
        self._set_status("connecting" if self.connections == 0 else "reconnecting")
        self._activation_changed.clear()
        url = self.url
        http = self._http or httpx.AsyncClient(timeout=httpx.Timeout(10, read=self.read_timeout))
        try:
            async with aconnect_sse(http, "GET", url, headers=await self._headers()) as source:
                if source.response.status_code in (401, 403):
                    await source.response.aread()
                    refusal = error_of(source.response, _json(source.response))
                    if isinstance(refusal, MachineReleased):
                        self._forget_machine()
                        raise refusal
                    raise Unauthorized(f"{source.response.status_code} from {url}: {refusal}",
                                       status=source.response.status_code, body=refusal.body)  # fmt: skip
                if source.response.status_code in (429, 503):
                    # A server or a license at its stream limit: not sooner than it asks.
                    self._retry_after = retry_after_seconds(source.response.headers.get("retry-after"))
                source.response.raise_for_status()
                self.connections += 1
                self._set_status("live")
                async for sse in _until(source.aiter_sse(), self._activation_changed):
                    if sse.retry is not None:
                        self._retry = sse.retry / 1000
                    if not sse.data:
                        continue
                    if sse.event == "lease":
                        # No id: it leaves the resume point alone. It follows the state it signs.
                        await self.accept_lease(str(json.loads(sse.data)["lease"]))
                        continue
                    if sse.event == "token":
                        self._token_event(json.loads(sse.data))
                        continue
                    if sse.event != "message":
                        continue  # a kind of event this version does not know
                    event: dict[str, Any] = json.loads(sse.data)
                    if sse.id:
                        self.last_event_id = int(sse.id)
                    self.state = event
                    if not self._pinned:
                        self._check_entitlement()
                        self._settle_purchases()
                    yield event
        finally:
            if self._http is None:
                await http.aclose()

    def _token_event(self, data: dict[str, Any]) -> None:
        """The stream's renewal of the machine token (no id: Last-Event-ID is unaffected)."""
        credentials = self._machine.credentials if self._machine is not None else None
        token = data.get("token")
        if credentials is not None and isinstance(token, str) and data.get("machine_id") == credentials.machine_id:
            self._store_token(Credentials(credentials.license_id, credentials.machine_id, token))

    def reconnect_delay(self, failures: int) -> float:
        """Seconds to wait after `failures` connections in a row ended without an event.

        The server's `retry:` hint (else `min_backoff`) doubles with each failure up to
        `max_backoff`, then "equal jitter" takes between half and all of it: never sooner than
        half the hint, and a fleet of clients cut off together does not return in one burst.
        After a 429 or 503, never sooner than its Retry-After."""
        base = self._retry if self._retry is not None else self.min_backoff
        ceiling = min(base * 2.0 ** (failures - 1), self.max_backoff)
        return max(ceiling * random.uniform(0.5, 1.0), self._retry_after or 0.0)

    async def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        """Reconnects for ever; raises Unauthorized on 401/403 (MachineReleased when this machine
        was released: the client has forgotten it). With app_id and no machine activated, waits
        for activate() ("inactive"). The lease-expiry timer runs for as long as this does."""
        self._check_entitlement()  # the cached lease, if it unlocks
        timer = asyncio.create_task(self._watch_expiry())
        failures = 0
        self._iterating += 1
        try:
            while True:
                if self._machine is not None and self._machine.credentials is None:
                    self._set_status("inactive")
                    self._activation_changed.clear()
                    await self._activation_changed.wait()
                    failures = 0
                    continue
                started = time.monotonic()
                try:
                    async for event in self.connect_once():
                        failures = 0
                        yield event
                except Unauthorized as exc:
                    if isinstance(exc, MachineReleased) and self._unpaid_checkout_ended:
                        continue  # an unpaid checkout's license was removed: "inactive" again
                    self._set_status("unauthorized")
                    raise
                except (httpx.HTTPError, OSError, BrokerError) as exc:
                    log.info("license stream interrupted: %s", exc)
                if self._activation_changed.is_set():
                    continue  # activated again, or released: at once
                # A connection that stayed up a while was healthy, events or not (a resumed stream
                # may carry none): its end starts the backoff afresh.
                failures = 1 if time.monotonic() - started > self.max_backoff else failures + 1
                self._set_status("reconnecting")
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.reconnect_delay(failures)):
                        await self._activation_changed.wait()
        finally:
            self._iterating -= 1
            await _cancel(timer)
            if self.status != "unauthorized":
                self._set_status("stopped")

    async def run(self, on_event: Callable[[dict[str, Any]], Awaitable[None] | None]) -> None:
        async for event in self:
            result = on_event(event)
            if result is not None:
                await result


async def _cancel(task: asyncio.Task[Any]) -> None:
    """Cancel `task` and wait for it to end, whatever it ended with. Not `await task` under
    `suppress(CancelledError)`: that would swallow a cancellation of the caller as well."""
    task.cancel()
    await asyncio.wait({task})
    if not task.cancelled():
        task.exception()  # retrieved: asyncio does not log it as never retrieved


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


async def _until(events: AsyncIterator[ServerSentEvent], stop: asyncio.Event) -> AsyncIterator[ServerSentEvent]:
    """`events` until `stop` is set: the read in progress is cancelled (httpx then closes the
    connection), so an activation or a release switches at once, not at the next event."""
    stopping = asyncio.ensure_future(stop.wait())
    following: asyncio.Future[ServerSentEvent] | None = None
    try:
        while True:
            following = asyncio.ensure_future(anext(events))
            await asyncio.wait({following, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not following.done():
                return
            try:
                event = following.result()
            except StopAsyncIteration:
                return
            following = None
            yield event
    finally:
        stopping.cancel()
        if following is not None and not following.done():
            following.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                await following
