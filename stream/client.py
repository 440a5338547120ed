"""A reference client for Python desktop apps.

    client = LicenseClient("https://licenses.example.com", "lic_123", token)
    async for event in client:          # reconnects for ever, resuming where it left off
        unlock() if event["entitled"] else lock()

or, with a callback: `await client.run(on_event)`. `client.state` is the last state received.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import orjson
from httpx_sse import aconnect_sse

log = logging.getLogger("license_broker.client")


class Unauthorized(Exception):
    """401/403: a new token is needed; reconnecting with this one would never succeed."""


class LicenseClient:
    def __init__(
        self,
        base_url: str,
        license_id: str,
        token: str | Callable[[], str],
        *,
        last_event_id: int | None = None,
        min_backoff: float = 0.5,
        max_backoff: float = 30.0,
        read_timeout: float = 45.0,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self.url = f"{base_url.rstrip('/')}/api/licenses/{license_id}/events"
        self.token = token
        self.last_event_id = last_event_id
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        # Longer than the server's heartbeat (15 s): silence beyond it means a dead connection.
        self.read_timeout = read_timeout
        self.state: dict[str, Any] | None = None
        self.connections = 0
        self._http = http
        self._retry: float | None = None

    def _headers(self) -> dict[str, str]:
        token = self.token() if callable(self.token) else self.token
        headers = {"authorization": f"Bearer {token}", "accept": "text/event-stream"}
        if self.last_event_id is not None:
            headers["last-event-id"] = str(self.last_event_id)
        return headers

    async def connect_once(self) -> AsyncGenerator[dict[str, Any], None]:
        """One connection: the events it carries, until the server or the network ends it."""
        http = self._http or httpx.AsyncClient(timeout=httpx.Timeout(10, read=self.read_timeout))
        try:
            async with aconnect_sse(http, "GET", self.url, headers=self._headers()) as source:
                if source.response.status_code in (401, 403):
                    raise Unauthorized(f"{source.response.status_code} from {self.url}")
                source.response.raise_for_status()
                self.connections += 1
                async for sse in source.aiter_sse():
                    if sse.retry is not None:
                        self._retry = sse.retry / 1000
                    if not sse.data:
                        continue
                    event: dict[str, Any] = orjson.loads(sse.data)
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
        half the hint, and a fleet of clients cut off together does not return in one burst."""
        base = self._retry if self._retry is not None else self.min_backoff
        ceiling = min(base * 2.0 ** (failures - 1), self.max_backoff)
        return ceiling * random.uniform(0.5, 1.0)

    async def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        failures = 0
        while True:
            started = time.monotonic()
            try:
                # aclosing: when this generator is closed, the connection is closed with it, in
                # this task, not later by the garbage collector in another one.
                async with contextlib.aclosing(self.connect_once()) as events:
                    async for event in events:
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
