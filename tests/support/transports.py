"""The transport suite's harness (one per transport, tests/test_transports.py), and a transport
that shows which licenses the hub follows."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from broker.settings import Settings
from broker.storage.db import create_engine
from broker.storage.eventlog import EventLog, LicenseEvent
from broker.transports import Transport
from broker.transports.memory import MemoryTransport
from broker.transports.poll import PollTransport
from broker.transports.redis import RedisTransport
from broker.transports.redis_cluster import RedisClusterTransport
from broker.transports.sweep import DatabaseSweep
from tests.support.licenses import append


class RecordingTransport(MemoryTransport):
    """The in-process transport, remembering which licenses it is asked to listen to."""

    def __init__(self) -> None:
        super().__init__()
        self.listened: set[str] = set()

    async def listen(self, license_id: str) -> None:
        await super().listen(license_id)
        self.listened.add(license_id)

    async def unlisten(self, license_id: str) -> None:
        await super().unlisten(license_id)
        self.listened.discard(license_id)


class Received:
    """The handlers given to a transport's start(): what it delivered, and how many gaps."""

    def __init__(self) -> None:
        self.received: asyncio.Queue[LicenseEvent] = asyncio.Queue()
        self.gaps = 0

    def on_message(self, event: LicenseEvent) -> None:
        self.received.put_nowait(event)

    def on_gap(self) -> None:
        self.gaps += 1

    async def next(self, within: float = 5.0) -> LicenseEvent:
        return await asyncio.wait_for(self.received.get(), within)


class Harness(Received):
    """A transport, a database, and what the transport delivered."""

    def __init__(self, transport: Transport, engine: AsyncEngine) -> None:
        super().__init__()
        self.transport = transport
        self.engine = engine

    async def commit_and_publish(self, license_id: str, status: str = "active") -> LicenseEvent:
        event = await append(self.engine, license_id, status)
        await self.transport.publish(license_id, event.data)
        return event


@pytest.fixture(params=["memory", "poll", "redis", "redis-cluster"])
async def harness(request: pytest.FixtureRequest, pg_url: str) -> AsyncIterator[Harness]:
    engine = create_engine(Settings(database_url=pg_url))
    transport: Transport
    if request.param == "memory":
        transport = MemoryTransport()
    elif request.param == "poll":
        transport = PollTransport(DatabaseSweep(EventLog(engine), interval=0.05))
    elif request.param == "redis":
        transport = RedisTransport(request.getfixturevalue("redis_url"))
    else:
        transport = RedisClusterTransport(request.getfixturevalue("shared_cluster").url)
    h = Harness(transport, engine)
    await transport.connect()
    await transport.start(h.on_message, h.on_gap)
    try:
        yield h
    finally:
        await transport.close()
        await engine.dispose()
