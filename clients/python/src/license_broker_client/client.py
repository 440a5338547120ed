"""Follow one license from a Python desktop app.

    verifier = LeaseVerifier(PINNED_PEM)                  # shipped with the app
    client = LicenseClient(URL, "lic_123", get_token, verifier=verifier, cache="~/.myapp/lease")
    client.on_entitlement = lambda entitled: set_locked(not entitled)
    set_locked(not client.is_entitled())      # at once, offline too: from the cached lease
    async for event in client:                # reconnects for ever, resuming where it left off
        show_status(event["status"])

or, with a callback: `await client.run(on_event)`. `client.state` is the last state received;
`client.lease` the newest valid lease (received, or read from the cache); `client.status` the
connection's ("connecting", "live", "reconnecting", "unauthorized", "stopped").
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import os
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Literal

import httpx
from httpx_sse import aconnect_sse

from license_broker_client.cache import LeaseCache
from license_broker_client.holder import LeaseHolder
from license_broker_client.leases import InvalidLease, Lease, LeaseVerifier
from license_broker_client.watermark import Watermark

log = logging.getLogger("license_broker_client")

Status = Literal["connecting", "live", "reconnecting", "unauthorized", "stopped"]
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


class Unauthorized(Exception):
    """401/403: a new token is needed; reconnecting with this one would never succeed."""


class LicenseClient:
    def __init__(
        self,
        base_url: str,
        license_id: str,
        token: TokenSource,
        *,
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
        self.license_id = license_id
        self.url = f"{base_url.rstrip('/')}/api/licenses/{license_id}/events"
        self.token = token
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
        pinned = verifier is not None and bool(verifier.kids)
        self.trust: Trust = "pinned" if pinned else "unverified"
        self._holder = LeaseHolder(license_id, verifier, self.cache, self.watermark) if pinned and verifier else None
        self._entitled = False  # the app starts locked; on_entitlement reports each change from there
        self._new_lease = asyncio.Event()
        self._http = http
        self._retry: float | None = None
        # The Retry-After of a 429 or 503 (a server or a license at its stream limit).
        self._retry_after: float | None = None
        if self._holder is None:
            log.warning(UNVERIFIED, base_url)

    # --- leases -----------------------------------------------------------------------------

    @property
    def lease(self) -> Lease | None:
        """The newest valid lease: received on the stream, or else the cached one (read, and
        verified with the pinned keys, on first use: no I/O in the constructor)."""
        return None if self._holder is None else self._holder.lease

    def is_entitled(self) -> bool:
        """Whether the app may unlock now. With a pinned key: only on a valid, unexpired lease for
        this license (online or off), with a clock that was not turned back. Without one: the
        last state received, unsigned, online only."""
        if self._holder is None:
            return bool(self.state and self.state.get("entitled") is True)
        return self._holder.is_entitled()

    async def accept_lease(self, token: str) -> Lease | None:
        """Verify a lease (from the stream, or from GET /api/licenses/{id}'s `lease`) and hold
        it, and cache it, if it supersedes the one held. None if it does not verify."""
        if self._holder is None:
            return None
        try:
            lease = self._holder.accept(token)
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
            left = self._holder.seconds_left() if self._holder is not None else None
            delay = EXPIRY_CHECK_INTERVAL if left is None else min(max(left, 0.0) + 0.05, EXPIRY_CHECK_INTERVAL)
            # A new lease re-arms the timer at once.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._new_lease.wait(), delay)
            self._new_lease.clear()
            try:
                if self._holder is not None:
                    self._holder.tick()
                self._check_entitlement()
            except Exception:  # the app's callback: reported, and the timer keeps running
                log.exception("license_broker_client: on_entitlement failed")

    # --- the stream -------------------------------------------------------------------------

    def _set_status(self, status: Status) -> None:
        if status != self.status:
            self.status = status
            if self.on_status is not None:
                self.on_status(status)

    async def _headers(self) -> dict[str, str]:
        token = self.token() if callable(self.token) else self.token
        if inspect.isawaitable(token):
            token = await token
        headers = {"authorization": f"Bearer {token}", "accept": "text/event-stream"}
        if self.last_event_id is not None:
            headers["last-event-id"] = str(self.last_event_id)
        return headers

    async def connect_once(self) -> AsyncIterator[dict[str, Any]]:
        """One connection: the states it carries, until the server or the network ends it."""
        self._set_status("connecting" if self.connections == 0 else "reconnecting")
        http = self._http or httpx.AsyncClient(timeout=httpx.Timeout(10, read=self.read_timeout))
        try:
            async with aconnect_sse(http, "GET", self.url, headers=await self._headers()) as source:
                if source.response.status_code in (401, 403):
                    raise Unauthorized(f"{source.response.status_code} from {self.url}")
                if source.response.status_code in (429, 503):
                    # A server or a license at its stream limit: not sooner than it asks.
                    self._retry_after = _seconds(source.response.headers.get("retry-after"))
                source.response.raise_for_status()
                self.connections += 1
                self._set_status("live")
                async for sse in source.aiter_sse():
                    if sse.retry is not None:
                        self._retry = sse.retry / 1000
                    if not sse.data:
                        continue
                    if sse.event == "lease":
                        # No id: it leaves the resume point alone. It follows the state it signs.
                        await self.accept_lease(str(json.loads(sse.data)["lease"]))
                        continue
                    if sse.event != "message":
                        continue  # a kind of event this version does not know
                    event: dict[str, Any] = json.loads(sse.data)
                    if sse.id:
                        self.last_event_id = int(sse.id)
                    self.state = event
                    if self._holder is None:
                        self._check_entitlement()
                    yield event
        finally:
            if self._http is None:
                await http.aclose()

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
        """Reconnects for ever; raises Unauthorized on 401/403. The lease-expiry timer runs for
        as long as this does."""
        self._check_entitlement()  # the cached lease, if it unlocks
        timer = asyncio.create_task(self._watch_expiry())
        failures = 0
        try:
            while True:
                started = time.monotonic()
                try:
                    async for event in self.connect_once():
                        failures = 0
                        yield event
                except Unauthorized:
                    self._set_status("unauthorized")
                    raise
                except (httpx.HTTPError, OSError) as exc:
                    log.info("license stream interrupted: %s", exc)
                # A connection that stayed up a while was healthy, events or not (a resumed stream
                # may carry none): its end starts the backoff afresh.
                failures = 1 if time.monotonic() - started > self.max_backoff else failures + 1
                self._set_status("reconnecting")
                await asyncio.sleep(self.reconnect_delay(failures))
        finally:
            timer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await timer
            if self.status != "unauthorized":
                self._set_status("stopped")

    async def run(self, on_event: Callable[[dict[str, Any]], Awaitable[None] | None]) -> None:
        async for event in self:
            result = on_event(event)
            if result is not None:
                await result


def _seconds(retry_after: str | None) -> float | None:
    """Retry-After in seconds (the broker never sends the HTTP-date form), capped at an hour."""
    try:
        value = float(retry_after) if retry_after else -1.0
    except ValueError:
        return None
    return min(value, 3600.0) if value >= 0 else None
