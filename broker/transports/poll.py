"""Database polling: the baseline the project is compared with, and the zero-infrastructure
transport for several processes without Redis. Latency is up to BROKER_POLL_INTERVAL."""

from __future__ import annotations

from broker.transports.base import GapHandler, MessageHandler, Transport, ignore_gap
from broker.transports.sweep import DatabaseSweep


class PollTransport(Transport):
    """The database sweep alone: nothing is published, every event is found in the database."""

    name = "poll"
    # The database is the message: nothing is published, so nothing can be lost.
    reliable = True

    def __init__(self, sweep: DatabaseSweep) -> None:
        self.sweep = sweep

    async def start(self, on_message: MessageHandler, on_gap: GapHandler = ignore_gap) -> None:
        self.sweep.start(on_message)

    async def publish(self, license_id: str, payload: bytes) -> None:
        pass

    async def listen(self, license_id: str) -> None:
        await self.sweep.follow(license_id)

    async def unlisten(self, license_id: str) -> None:
        self.sweep.unfollow(license_id)

    async def close(self) -> None:
        await self.sweep.stop()
