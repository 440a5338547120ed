"""Every transport through the same suite: what the hub relies on (base.Transport's contract)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
import redis
from sqlalchemy.ext.asyncio import AsyncEngine

from broker.db import create_engine
from broker.eventlog import EventLog, LicenseEvent
from broker.licenses import LicenseStore
from broker.settings import Settings
from broker.transports import Transport
from broker.transports.memory import MemoryTransport
from broker.transports.poll import PollTransport
from broker.transports.redis import RedisTransport
from tests.conftest import new_license


async def append(engine: AsyncEngine, license_id: str, status: str = "active") -> LicenseEvent:
    """What the webhook's transaction does, without Stripe."""
    async with engine.begin() as conn:
        row = await LicenseStore.lock(conn, license_id)
        row.seq += 1
        row.state = {**row.state, "status": status, "entitled": status == "active"}
        await LicenseStore.save(conn, row)
        return await EventLog.append(
            conn,
            license_id,
            row.seq,
            row.state,
            stripe_event_id=None,
            stripe_event_type="test",
            occurred_at=datetime.now(UTC),
        )


class Harness:
    def __init__(self, transport: Transport, engine: AsyncEngine) -> None:
        self.transport = transport
        self.engine = engine
        self.received: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
        self.gaps = 0

    def on_message(self, license_id: str, payload: bytes) -> None:
        self.received.put_nowait((license_id, payload))

    def on_gap(self) -> None:
        self.gaps += 1

    async def commit_and_publish(self, license_id: str, status: str = "active") -> LicenseEvent:
        event = await append(self.engine, license_id, status)
        await self.transport.publish(license_id, event.data)
        return event

    async def next(self, within: float = 5.0) -> LicenseEvent:
        license_id, payload = await asyncio.wait_for(self.received.get(), within)
        event = LicenseEvent.from_json(payload)
        assert event.license_id == license_id
        return event


@pytest.fixture(params=["memory", "poll", "redis"])
async def harness(request: pytest.FixtureRequest, pg_url: str) -> AsyncIterator[Harness]:
    engine = create_engine(Settings(database_url=pg_url))
    transport: Transport
    if request.param == "memory":
        transport = MemoryTransport()
    elif request.param == "poll":
        transport = PollTransport(EventLog(engine), interval=0.05)
    else:
        transport = RedisTransport(request.getfixturevalue("redis_url"))
    h = Harness(transport, engine)
    await transport.connect()
    await transport.start(h.on_message, h.on_gap)
    try:
        yield h
    finally:
        await transport.close()
        await engine.dispose()


async def test_a_message_published_after_listen_reaches_the_handler(harness: Harness) -> None:
    license_id = new_license()
    await harness.transport.listen(license_id)
    sent = await harness.commit_and_publish(license_id)
    received = await harness.next()
    assert (received.license_id, received.seq, received.data) == (license_id, sent.seq, sent.data)


async def test_messages_of_one_license_arrive_in_publish_order(harness: Harness) -> None:
    license_id = new_license()
    await harness.transport.listen(license_id)
    for status in ["active", "past_due", "active", "canceled", "active"]:
        await harness.commit_and_publish(license_id, status)
    assert [(await harness.next()).seq for _ in range(5)] == [1, 2, 3, 4, 5]


async def test_only_listened_licenses_are_delivered(harness: Harness) -> None:
    followed, other = new_license(), new_license()
    await harness.transport.listen(followed)
    await harness.commit_and_publish(other)
    await harness.commit_and_publish(followed)
    assert (await harness.next()).license_id == followed
    assert harness.received.empty()


async def test_nothing_arrives_after_unlisten(harness: Harness) -> None:
    license_id, marker = new_license(), new_license()
    await harness.transport.listen(license_id)
    await harness.transport.listen(marker)
    await harness.transport.unlisten(license_id)
    await harness.commit_and_publish(license_id)
    await harness.commit_and_publish(marker)
    # The marker was published last: once it is here, the unlistened one would have been too.
    assert (await harness.next()).license_id == marker
    assert harness.received.empty()


async def test_many_licenses_share_the_transport(harness: Harness) -> None:
    ids = [new_license() for _ in range(20)]
    for license_id in ids:
        await harness.transport.listen(license_id)
    for license_id in ids:
        await harness.commit_and_publish(license_id)
    got = {(await harness.next()).license_id for _ in ids}
    assert got == set(ids)


async def test_close_is_safe_twice_and_check_reports_health(harness: Harness) -> None:
    assert await harness.transport.check() is True
    await harness.transport.close()
    await harness.transport.close()


async def test_redis_reconnects_resubscribes_and_reports_the_gap(redis_server, pg_url: str) -> None:  # type: ignore[no-untyped-def]
    engine = create_engine(Settings(database_url=pg_url))
    transport = RedisTransport(redis_server.url, max_backoff=0.2)
    h = Harness(transport, engine)
    await transport.start(h.on_message, h.on_gap)
    license_id = new_license()
    try:
        await transport.listen(license_id)
        await h.commit_and_publish(license_id)
        assert (await h.next()).seq == 1
        redis_server.stop()
        assert await transport.check() is False
        with pytest.raises(redis.ConnectionError):
            await h.commit_and_publish(license_id)  # committed; the publish fails (seq 2 is lost)
        redis_server.start()
        deadline = asyncio.get_running_loop().time() + 10
        while h.gaps == 0:
            assert asyncio.get_running_loop().time() < deadline, "no reconnect"
            await asyncio.sleep(0.02)
        await h.commit_and_publish(license_id)
        assert (await h.next()).seq == 3  # resubscribed without a new listen()
    finally:
        await transport.close()
        await engine.dispose()
