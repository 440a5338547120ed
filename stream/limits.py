"""What one stream process lets its clients take: how many streams (per process and per license)
and how many database connections their reads may hold at once."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterable
from typing import Literal

from sqlalchemy.ext.asyncio import AsyncEngine

from broker.storage.eventlog import EventLog, LicenseEvent


class StreamRefused(Exception):
    """No room for another stream: 503 for a full process, 429 for a license over its limit.
    `retry_after` is jittered, so that a fleet of refused clients does not come back in the same
    second (and the load balancer may send the retry to a process with room)."""

    def __init__(self, limit: Literal["capacity", "license"]) -> None:
        super().__init__(limit)
        self.limit = limit
        self.status = 503 if limit == "capacity" else 429
        self.reason = "too many streams on this server" if limit == "capacity" else "too many streams for this license"
        self.retry_after = random.randint(5, 30)


class StreamSlot:
    """One admitted stream; `release` is safe to call twice."""

    __slots__ = ("_admission", "license_id")

    def __init__(self, admission: StreamAdmission, license_id: str) -> None:
        self._admission: StreamAdmission | None = admission
        self.license_id = license_id

    def release(self) -> None:
        if self._admission is not None:
            self._admission._release(self.license_id)
            self._admission = None


class StreamAdmission:
    """Counts this process's open streams. Decided before the response starts, so that a refusal
    is a status code the client can act on, not a stream that ends at once."""

    def __init__(self, per_process: int, per_license: int) -> None:
        self.per_process = per_process
        self.per_license = per_license
        self.open = 0
        self._by_license: dict[str, int] = {}

    def admit(self, license_id: str) -> StreamSlot:
        # No await between the checks and the counts: two requests cannot both take the last slot.
        if self.open >= self.per_process:
            raise StreamRefused("capacity")
        held = self._by_license.get(license_id, 0)
        if held >= self.per_license:
            raise StreamRefused("license")
        self._by_license[license_id] = held + 1
        self.open += 1
        return StreamSlot(self, license_id)

    def _release(self, license_id: str) -> None:
        self.open -= 1
        held = self._by_license.pop(license_id) - 1
        if held:
            self._by_license[license_id] = held


class ThrottledEventLog(EventLog):
    """The event log as the stream side reads it: at most `slots` reads at a time, waiting in
    arrival order. A reconnect storm then queues here, holding no database connection, and
    never takes more of the shared pool than `slots` (Settings.stream_db_slots): under `serve`
    the webhook's transactions still find a free connection at once."""

    def __init__(self, engine: AsyncEngine, slots: int) -> None:
        super().__init__(engine)
        self._slots = asyncio.Semaphore(slots)

    @property
    def slots(self) -> asyncio.Semaphore:
        """For the stream side's other reads (a machine token's check at stream open)."""
        return self._slots

    async def current(self, license_id: str) -> LicenseEvent:
        async with self._slots:
            return await super().current(license_id)

    async def read(
        self, license_id: str, after: int, before: int | None = None, limit: int = 500
    ) -> list[LicenseEvent]:
        # One batch per slot: a long replay does not hold its slot while its client reads.
        async with self._slots:
            return await super().read(license_id, after, before, limit)

    async def read_many(self, after: dict[str, int], limit: int = 1000) -> list[LicenseEvent]:
        async with self._slots:
            return await super().read_many(after, limit)

    async def latest_seqs(self, license_ids: Iterable[str]) -> dict[str, int]:
        async with self._slots:
            return await super().latest_seqs(license_ids)
