"""Checkout Sessions as the buyer's proof of purchase: the /activate page and its JSON give the
license (and its key) of a recorded Checkout Session. The session id is the secret here, as in
Stripe's own fulfilment guide; lookups that find nothing are rate-limited by client address.

The buyer's browser may arrive before Stripe's webhook: `SessionWatch` lets any number of pages
wait for their sessions to be recorded with one query per interval per process, whoever waits."""

from __future__ import annotations

import asyncio
import logging
import re

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from broker import background
from broker.storage.schema import stripe_bindings, stripe_objects

log = logging.getLogger("broker.licensing")

# Stripe's Checkout Session ids: cs_test_... / cs_live_..., letters and digits.
_SESSION_ID = re.compile(r"cs_[A-Za-z0-9_]{1,250}")


def valid_session_id(value: str) -> bool:
    return _SESSION_ID.fullmatch(value) is not None


async def license_of_sessions(engine: AsyncEngine, session_ids: list[str]) -> dict[str, str]:
    """The licenses of the recorded (bound) Checkout Sessions among these ids."""
    if not session_ids:
        return {}
    b, o = stripe_bindings, stripe_objects
    query = (
        sa.select(b.c.stripe_id, b.c.license_id)
        .join(o, o.c.id == b.c.stripe_id)
        .where(b.c.stripe_id.in_(session_ids), o.c.kind == "checkout")
    )
    async with engine.connect() as conn:
        return {str(row.stripe_id): str(row.license_id) for row in await conn.execute(query)}


class TooManyWaiting(Exception):
    """More pages wait in this process than it allows (503)."""


class SessionWatch:
    def __init__(self, engine: AsyncEngine, *, interval: float = 0.5, max_waiting: int = 2000) -> None:
        self.engine = engine
        self.interval = interval
        self.max_waiting = max_waiting
        self._waiting: dict[str, list[asyncio.Future[str]]] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="checkout-session-watch")

    async def close(self) -> None:
        await background.stop(self._task)
        self._task = None
        for futures in self._waiting.values():
            for future in futures:
                future.cancel()
        self._waiting.clear()

    @property
    def waiting(self) -> int:
        return sum(map(len, self._waiting.values()))

    def wait(self, session_id: str) -> asyncio.Future[str]:
        """A future that the session's license resolves once the session is recorded. The caller
        gives it back with `forget` however it ends."""
        if self.waiting >= self.max_waiting:
            raise TooManyWaiting
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(session_id, []).append(future)
        self._wake.set()
        return future

    def forget(self, session_id: str, future: asyncio.Future[str]) -> None:
        futures = self._waiting.get(session_id)
        if futures is not None and future in futures:
            futures.remove(future)
            if not futures:
                del self._waiting[session_id]

    async def _run(self) -> None:
        failures = 0
        while True:
            if not self._waiting:
                await self._wake.wait()
            self._wake.clear()
            try:
                found: dict[str, str] = {}
                waiting = sorted(self._waiting)
                for start in range(0, len(waiting), 1000):
                    found |= await license_of_sessions(self.engine, waiting[start : start + 1000])
                failures = 0
            except Exception as exc:
                failures += 1
                if failures == 1 or failures % 30 == 0:
                    log.warning("checkout session watch failed (%d in a row): %s", failures, exc)
                found = {}
            for session_id, license_id in found.items():
                for future in self._waiting.pop(session_id, []):
                    if not future.done():
                        future.set_result(license_id)
            await asyncio.sleep(self.interval)
