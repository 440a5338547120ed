"""Database polling: the baseline the project is compared with, and the zero-infrastructure
transport for several processes without Redis. Latency is up to BROKER_POLL_INTERVAL."""

from __future__ import annotations

import asyncio

from broker import background
from broker.eventlog import EventLog
from broker.sweep import DatabaseSweep
from broker.transports.base import GapHandler, MessageHandler, Transport


class PollTransport(Transport):
    name = "poll"
    # The database is the message: nothing is published, so nothing can be lost.
    reliable = True

    def __init__(self, events: EventLog, interval: float) -> None:
        self.events = events
        self.interval = interval
        self._sweep: DatabaseSweep | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self, on_message: MessageHandler, on_gap: GapHandler) -> None:
        self._sweep = DatabaseSweep(self.events, self.interval, on_message)
        self._task = asyncio.create_task(self._sweep.run(), name="poll-transport")

    async def publish(self, license_id: str, payload: bytes) -> None:
        pass

    async def listen(self, license_id: str) -> None:
        assert self._sweep is not None, "start() first"
        await self._sweep.follow(license_id)

    async def unlisten(self, license_id: str) -> None:
        if self._sweep is not None:
            self._sweep.unfollow(license_id)

    async def close(self) -> None:
        await background.stop(self._task)
        self._task = None
