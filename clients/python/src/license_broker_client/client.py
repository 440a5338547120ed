"""Follow one license from a Python desktop app.

    verifier = LeaseVerifier(public_keys=[PINNED_PEM])          # shipped with the app
    client = LicenseClient(URL, "lic_123", get_token, verifier=verifier, cache="~/.myapp/lease")
    set_locked(not client.is_entitled())      # at once, offline too: from the cached lease
    client.on_lease = lambda lease: set_locked(not client.is_entitled())
    async for event in client:                # reconnects for ever, resuming where it left off
        show_status(event["status"])

or, with a callback: `await client.run(on_event)`. `client.state` is the last state received;
`client.lease` the newest valid lease (received, or read from the cache).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
from httpx_sse import aconnect_sse

from license_broker_client.cache import LeaseCache
from license_broker_client.leases import InvalidLease, Lease, LeaseVerifier

log = logging.getLogger("license_broker_client")


class Unauthorized(Exception):
    """401/403: a new token is needed; reconnecting with this one would never succeed."""


class LicenseClient:
    def __init__(
        self,
        base_url: str,
        license_id: str,
        token: str | Callable[[], str],
        *,
        verifier: LeaseVerifier | None = None,
        cache: LeaseCache | str | os.PathLike[str] | None = None,
        on_lease: Callable[[Lease], None] | None = None,
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
        # Called after each lease that verifies and replaces the one held: the moment to lock or unlock.
        self.on_lease = on_lease
        self.last_event_id = last_event_id
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        # Longer than the server's heartbeat (15 s): silence beyond it means a dead connection.
        self.read_timeout = read_timeout
        self.state: dict[str, Any] | None = None
        self.connections = 0
        self.rejected_leases = 0
        self._lease: Lease | None = None
        self._cache_read = False
        self._http = http
        self._retry: float | None = None
        # The Retry-After of a 429 or 503 (a server or a license at its stream limit).
        self._retry_after: float | None = None

    # --- leases -----------------------------------------------------------------------------

    @property
    def lease(self) -> Lease | None:
        """The newest valid lease: received on the stream, or else the cached one (read, and
        verified with the keys known now, on first use: no I/O in the constructor)."""
        if not self._cache_read:
            self._cache_read = True
            self._adopt_cached()
        return self._lease

    def _adopt_cached(self) -> None:
        if self.cache is None or self.verifier is None:
            return
        token = self.cache.load()
        if token is None:
            return
        try:
            cached = self.verifier.verify(token, self.license_id)
        except InvalidLease as exc:
            log.info("cached lease ignored: %s", exc)
            return
        if cached.supersedes(self._lease, self.verifier.clock()):
            self._lease = cached

    def is_entitled(self) -> bool:
        """Whether the app may unlock now. With a verifier: only on a valid, unexpired lease for
        this license (online or off). Without one: the last state received, unsigned, online only."""
        if self.verifier is None:
            return bool(self.state and self.state.get("entitled") is True)
        lease = self.lease
        return lease is not None and lease.entitled and lease.valid_at(self.verifier.clock())

    async def accept_lease(self, token: str) -> Lease | None:
        """Verify a lease (from the stream, or from GET /api/licenses/{id}'s `lease`) and hold
        it, and cache it, if it supersedes the one held. None if it does not verify."""
        if self.verifier is None:
            return None
        try:
            lease = await self.verifier.averify(token, self.license_id)
        except InvalidLease as exc:
            self.rejected_leases += 1
            log.warning("lease rejected: %s", exc)
            return None
        if not lease.supersedes(self.lease, self.verifier.clock()):
            return None
        # Cached first: once the app is told, a restart finds the same answer on disk.
        if self.cache is not None:
            try:
                self.cache.save(token)
            except OSError as exc:
                log.warning("lease not cached: %s", exc)
        self._lease = lease
        if self.on_lease is not None:
            self.on_lease(lease)
        return lease

    # --- the stream -------------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        token = self.token() if callable(self.token) else self.token
        headers = {"authorization": f"Bearer {token}", "accept": "text/event-stream"}
        if self.last_event_id is not None:
            headers["last-event-id"] = str(self.last_event_id)
        return headers

    async def connect_once(self) -> AsyncIterator[dict[str, Any]]:
        """One connection: the states it carries, until the server or the network ends it."""
        http = self._http or httpx.AsyncClient(timeout=httpx.Timeout(10, read=self.read_timeout))
        try:
            async with aconnect_sse(http, "GET", self.url, headers=self._headers()) as source:
                if source.response.status_code in (401, 403):
                    raise Unauthorized(f"{source.response.status_code} from {self.url}")
                if source.response.status_code in (429, 503):
                    # A server or a license at its stream limit: not sooner than it asks.
                    self._retry_after = _seconds(source.response.headers.get("retry-after"))
                source.response.raise_for_status()
                self.connections += 1
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
        failures = 0
        while True:
            started = time.monotonic()
            try:
                async for event in self.connect_once():
                    failures = 0
                    yield event
            except Unauthorized:
                raise
            except (httpx.HTTPError, OSError) as exc:
                log.info("license stream interrupted: %s", exc)
            # A connection that stayed up a while was healthy, events or not (a resumed stream
            # may carry none): its end starts the backoff afresh.
            failures = 1 if time.monotonic() - started > self.max_backoff else failures + 1
            await asyncio.sleep(self.reconnect_delay(failures))

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
