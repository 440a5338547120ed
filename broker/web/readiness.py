"""What /readyz answers: the database and the transport, checked at most once per `max_age`
however many probes ask (load balancers, orchestrators, anyone on the public port)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

from sqlalchemy.ext.asyncio import AsyncEngine

from broker.storage.db import ping
from broker.transports import Transport

Status = Literal["ok", "degraded", "unavailable"]


@dataclass(frozen=True, slots=True)
class Readiness:
    database: bool
    transport: bool
    transport_name: str

    @property
    def status(self) -> Status:
        """Unavailable without the database (nothing works); degraded without the transport,
        because the database sweep still delivers (within BROKER_POLL_INTERVAL)."""
        if not self.database:
            return "unavailable"
        return "ok" if self.transport else "degraded"


class ReadinessProbe:
    def __init__(
        self,
        engine: AsyncEngine,
        transport: Transport,
        *,
        max_age: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.engine = engine
        self.transport = transport
        self.max_age = max_age
        self.clock = clock
        self._last: tuple[float, Readiness] | None = None
        # One check at a time: the callers that arrive during it wait for its result.
        self._checking = asyncio.Lock()

    def _fresh(self) -> Readiness | None:
        if self._last is not None and self.clock() - self._last[0] <= self.max_age:
            return self._last[1]
        return None

    async def check(self) -> Readiness:
        if (fresh := self._fresh()) is not None:
            return fresh
        async with self._checking:
            if (fresh := self._fresh()) is not None:
                return fresh  # checked by another caller while this one waited
            started = self.clock()
            result = Readiness(
                database=await _succeeds(lambda: ping(self.engine)),
                transport=await self.transport.check(),
                transport_name=self.transport.name,
            )
            # Its age counts from when the check started: never older than max_age when served.
            self._last = (started, result)
            return result


async def _succeeds(check: Callable[[], Awaitable[None]]) -> bool:
    try:
        async with asyncio.timeout(5):
            await check()
        return True
    except Exception:
        return False
