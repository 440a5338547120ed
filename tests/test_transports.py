"""Every transport through the same suite: what the hub relies on (base.Transport's contract)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
import redis
from redis.asyncio.cluster import RedisCluster
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.crc import key_slot
from redis.exceptions import RedisClusterException
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from broker import metrics
from broker.settings import Settings
from broker.storage.db import create_engine, migrate
from broker.storage.eventlog import EventLog, LicenseEvent
from broker.storage.licenses import LicenseStore
from broker.transports import create_transport
from broker.transports.base import GapHandler, MessageHandler, channel, ignore_gap
from broker.transports.memory import MemoryTransport
from broker.transports.poll import PollTransport
from broker.transports.redis import RedisTransport
from broker.transports.redis_cluster import RedisClusterTransport
from broker.transports.subscriber import subscriber_options
from broker.transports.sweep import DatabaseSweep
from broker.transports.swept import SweptTransport
from broker.wire import NOTICE_SEQ, notice
from localcluster import ClusterUnavailable, LocalCluster
from tests.support.fakecluster import FakeCluster
from tests.support.faults import TcpProxy
from tests.support.licenses import append, make_settings, new_license
from tests.support.services import unavailable
from tests.support.stopping import Running, stops_when_woken_as_closed
from tests.support.transports import Harness, Received
from tests.support.waiting import async_wait_until, free_port


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


async def test_concurrent_publishes_each_arrive_once(harness: Harness) -> None:
    # Many webhooks publishing at once (the Redis transport sends them as one batch). Their order
    # is not promised (the stream orders by seq): Redis Cluster's publishes may overtake.
    licenses = [new_license() for _ in range(3)]
    for license_id in licenses:
        await harness.transport.listen(license_id)
    events = [await append(harness.engine, lid, status) for status in ("active", "past_due") for lid in licenses]
    await asyncio.gather(*(harness.transport.publish(e.license_id, e.data) for e in events))
    received = [await harness.next() for _ in events]
    assert sorted((e.license_id, e.seq) for e in received) == sorted((e.license_id, e.seq) for e in events)


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
    background = ("redis", "database-sweep")  # the subscriber, the shards' readers, the sweep
    running = [task for task in asyncio.all_tasks() if task.get_name().startswith(background)]
    assert running or harness.transport.name == "memory"
    await harness.transport.close()
    await harness.transport.close()
    # Closed: nothing of it left running, and no longer reported up.
    assert [task.get_name() for task in running if not task.done()] == []
    assert metrics.TRANSPORT_UP.labels(harness.transport.name)._value.get() == 0


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
        # Publishes sent together (one batch) fail together, each to its own caller.
        batched = RedisTransport(redis_server.url, publish_backoff=0)
        try:
            publishes = (batched.publish(license_id, b"{}") for _ in range(3))
            failed = await asyncio.gather(*publishes, return_exceptions=True)
            assert all(isinstance(f, redis.ConnectionError) for f in failed), failed
        finally:
            await batched.close()
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


class LossyTransport(MemoryTransport):
    """Delivers only while `up`, as Redis pub/sub does; `reconnect` reports the gap."""

    reliable = False

    def __init__(self) -> None:
        super().__init__()
        self.up = True
        self._on_gap: GapHandler = ignore_gap

    async def start(self, on_message: MessageHandler, on_gap: GapHandler = ignore_gap) -> None:
        await super().start(on_message)
        self._on_gap = on_gap

    async def publish(self, license_id: str, payload: bytes) -> None:
        if self.up:
            await super().publish(license_id, payload)

    def reconnect(self) -> None:
        self.up = True
        self._on_gap()


@pytest.fixture
async def swept(pg_url: str) -> AsyncIterator[tuple[SweptTransport, LossyTransport, Harness]]:
    """A lossy transport with the sweep under it; the sweep's interval longer than any test, so
    that what it delivers it delivers because it was woken or called."""
    engine = create_engine(Settings(database_url=pg_url))
    inner = LossyTransport()
    transport = SweptTransport(inner, DatabaseSweep(EventLog(engine), interval=60))
    h = Harness(transport, engine)
    await transport.start(h.on_message)
    try:
        yield transport, inner, h
    finally:
        await transport.close()
        await engine.dispose()


async def test_what_a_lossy_transport_loses_the_sweep_delivers_at_once_after_the_gap(
    swept: tuple[SweptTransport, LossyTransport, Harness],
) -> None:
    transport, inner, h = swept
    license_id = new_license()
    await transport.listen(license_id)
    assert (await h.commit_and_publish(license_id)).seq == (await h.next()).seq == 1  # live
    inner.up = False
    await h.commit_and_publish(license_id)
    await h.commit_and_publish(license_id, "past_due")  # both lost on the way
    inner.reconnect()
    assert [(await h.next()).seq for _ in range(2)] == [2, 3]  # from the database


async def test_the_sweep_does_not_fetch_again_what_arrived_live(
    swept: tuple[SweptTransport, LossyTransport, Harness],
) -> None:
    transport, _, h = swept
    license_id = new_license()
    await transport.listen(license_id)
    for status in ("active", "past_due"):
        await h.commit_and_publish(license_id, status)
    assert [(await h.next()).seq for _ in range(2)] == [1, 2]
    assert await transport.sweep.sweep_once() == 0
    assert h.received.empty()


async def test_the_sweep_follows_from_the_database_not_from_before_listen(
    swept: tuple[SweptTransport, LossyTransport, Harness],
) -> None:
    """Events committed before listen() are the client's replay, not the sweep's."""
    transport, inner, h = swept
    license_id = new_license()
    await append(h.engine, license_id)
    await transport.listen(license_id)
    assert await transport.sweep.sweep_once() == 0
    inner.up = False
    await h.commit_and_publish(license_id)
    assert await transport.sweep.sweep_once() == 1
    assert (await h.next()).seq == 2


async def test_unlisten_lets_go_of_the_license_in_the_inner_transport_and_in_the_sweep(
    swept: tuple[SweptTransport, LossyTransport, Harness],
) -> None:
    transport, inner, h = swept
    license_id, other = new_license(), new_license()
    await transport.listen(license_id)
    await transport.listen(other)
    assert license_id in transport.sweep.known
    await transport.unlisten(license_id)
    assert license_id not in transport.sweep.known  # no longer swept
    event = await append(h.engine, license_id)
    await inner.publish(license_id, event.data)  # no longer delivered live:
    # live messages are checked and handed on in the order they arrive, so the next one to reach
    # the handler is the other license's, published after it
    assert (await h.commit_and_publish(other)).license_id == (await h.next()).license_id == other
    assert await transport.sweep.sweep_once() == 0
    assert h.received.empty()


async def test_a_live_message_the_check_cannot_read_the_database_for_is_delivered_by_the_sweep_at_once(
    pg_url: str,
) -> None:
    """The live check's own connection is refused: the message is left to the sweep, woken at
    once (its interval is longer than the test), which reads the event itself."""
    engine = create_engine(Settings(database_url=pg_url))
    refused = make_url(pg_url).set(port=free_port()).render_as_string(hide_password=False)
    check_engine = create_engine(Settings(database_url=refused))
    transport = SweptTransport(LossyTransport(), DatabaseSweep(EventLog(engine), interval=60), check_engine)
    h = Harness(transport, engine)
    unchecked = metrics.LIVE_UNCHECKED._value.get()
    await transport.start(h.on_message)
    try:
        license_id = new_license()
        await transport.listen(license_id)
        assert (await h.commit_and_publish(license_id)).seq == (await h.next()).seq == 1
        assert metrics.LIVE_UNCHECKED._value.get() - unchecked == 1
    finally:
        await transport.close()
        await engine.dispose()


async def test_a_notice_goes_straight_to_the_handler_unchecked_and_unnoted_by_the_sweep(
    swept: tuple[SweptTransport, LossyTransport, Harness],
) -> None:
    """A notice is no stored event: the live check would drop it, and noting its seq would be
    noting nothing."""
    transport, _, h = swept
    license_id = new_license()
    await transport.listen(license_id)
    await transport.publish(license_id, notice(license_id))
    got = await h.next()
    assert (got.license_id, got.seq, got.data) == (license_id, NOTICE_SEQ, notice(license_id))
    assert transport.sweep.known[license_id] == 0


def test_a_swept_transport_goes_by_the_name_of_the_one_inside(
    swept: tuple[SweptTransport, LossyTransport, Harness],
) -> None:
    transport, inner, _ = swept
    assert transport.name == inner.name == "memory"  # what /readyz and the metrics call it


class CountingEventLog(EventLog):
    """The event log, counting the sweep's event reads and the licenses each one asks for."""

    def __init__(self, engine: AsyncEngine) -> None:
        super().__init__(engine)
        self.reads = 0
        self.licenses_per_read: list[int] = []

    async def read_many(self, after: dict[str, int], limit: int = 1000) -> list[LicenseEvent]:
        self.reads += 1
        self.licenses_per_read.append(len(after))
        return await super().read_many(after, limit)


async def test_the_sweep_counts_what_it_finds_and_reads_no_event_while_nothing_moved(pg_url: str) -> None:
    engine = create_engine(Settings(database_url=pg_url))
    events = CountingEventLog(engine)
    sweep = DatabaseSweep(events, interval=60)
    found: list[LicenseEvent] = []
    sweep.start(found.append)
    license_id = new_license()
    try:
        await append(engine, license_id)  # before the sweep follows it: the client's replay
        await sweep.follow(license_id)
        assert await sweep.sweep_once() == 0
        assert events.reads == 0  # one query for the seqs, none for events
        lost = [await append(engine, license_id), await append(engine, license_id, "past_due")]
        assert await sweep.sweep_once() == 2
        assert [e.seq for e in found] == [e.seq for e in lost] == [2, 3]
        sweep.note(license_id, 4)  # live, before the database has it
        assert sweep.known[license_id] == 4
        sweep.note(license_id, 2)  # late: the sweep never goes back
        assert sweep.known[license_id] == 4
        sweep.note("lic_not_followed", 5)  # a live message of a license given up meanwhile
        assert "lic_not_followed" not in sweep.known  # is not followed again
        sweep.unfollow("lic_not_followed")  # nor is giving up what is not followed an error
        assert "lic_not_followed" not in sweep.known
    finally:
        await sweep.stop()
        await engine.dispose()


async def test_the_sweep_asks_the_database_only_for_the_licenses_that_moved(db_url: str) -> None:
    """`moved`: the followed licenses past the seq the sweep knows, with their seq; none of those
    at or behind it, nor of licenses that do not exist (yet). Ids that JSON must escape included.
    Postgres compares in one query: the seqs of the licenses that did not move are not read back
    (no `latest_seqs`, which returns every one of them to compare here)."""
    engine = create_engine(Settings(database_url=db_url))
    if db_url.startswith("sqlite"):
        await migrate(engine)

    class SeqCountingEventLog(EventLog):
        seq_reads = 0

        async def latest_seqs(self, license_ids: list[str]) -> dict[str, int]:
            self.seq_reads += 1
            return await super().latest_seqs(license_ids)

    events = SeqCountingEventLog(engine)
    sweep = DatabaseSweep(events, interval=60)
    ahead, level, behind_us, quoted = new_license(), new_license(), new_license(), new_license() + '"\\é'
    try:
        for license_id in (ahead, level, quoted):
            await append(engine, license_id)
        await append(engine, ahead)
        known = {ahead: 1, level: 1, behind_us: 0, quoted: 0, new_license(): 5}
        await append(engine, behind_us)
        known[behind_us] = 3  # a live message noted before the database has it
        assert await sweep.moved(known) == {ahead: 2, quoted: 1}
        assert await sweep.moved({}) == {}
        assert events.seq_reads == (1 if db_url.startswith("sqlite") else 0)
    finally:
        await engine.dispose()


async def test_licenses_given_up_while_the_sweep_reads_are_skipped(pg_url: str) -> None:
    """A client leaves (the hub unfollows its license) while the sweep awaits the database; the
    event of another arrives live meanwhile: neither is read."""
    engine = create_engine(Settings(database_url=pg_url))
    kept, left_early, left_late, live = new_license(), new_license(), new_license(), new_license()

    class LeavingEventLog(EventLog):
        reads = 0
        asked: list[set[str]] = []

        async def read_many(self, after: dict[str, int], limit: int = 1000) -> list[LicenseEvent]:
            self.reads += 1
            self.asked.append(set(after))
            events = await super().read_many(after, limit)
            sweep.unfollow(left_late)
            return events

    class LeavingSweep(DatabaseSweep):
        async def moved(self, known: dict[str, int]) -> dict[str, int]:
            latest = await super().moved(known)
            sweep.unfollow(left_early)
            sweep.note(live, 1)
            return latest

    events = LeavingEventLog(engine)
    sweep = LeavingSweep(events, interval=60)
    found: list[LicenseEvent] = []
    sweep.start(found.append)
    try:
        for license_id in (kept, left_early, left_late, live):
            await sweep.follow(license_id)
            await append(engine, license_id)
        assert await sweep.sweep_once() == 1
        assert [(e.license_id, e.seq) for e in found] == [(kept, 1)]
        assert events.asked == [{kept, left_late}]  # one read for the licenses still behind, none for the rest
        # Every license of the read given up meanwhile: nothing is read at all (a read of no
        # license would be a query without a condition: every license's events).
        sweep.unfollow(kept)
        await sweep.follow(left_early)
        await append(engine, left_early)
        assert await sweep.sweep_once() == 0
        assert events.reads == 1
    finally:
        await sweep.stop()
        await engine.dispose()


async def commit_events(engine: AsyncEngine, counts: dict[str, int]) -> None:
    """`counts[license]` events of each license, in one transaction."""
    async with engine.begin() as conn:
        for license_id, count in counts.items():
            row = await LicenseStore.lock(conn, license_id)
            for seq in range(row.seq + 1, row.seq + count + 1):
                await EventLog.append(conn, license_id, seq, row.state, stripe_event_id=None,
                                      stripe_event_type="t", occurred_at=datetime.now(UTC))  # fmt: skip
            row.seq += count
            await LicenseStore.save(conn, row)


async def test_a_sweep_finds_every_event_when_more_moved_than_one_read_takes(pg_url: str) -> None:
    """600 licenses moved (a read takes 500), one of them by 1,100 events (a read returns 1,000)."""
    engine = create_engine(Settings(database_url=pg_url))
    events = CountingEventLog(engine)
    sweep = DatabaseSweep(events, interval=60)
    found: list[LicenseEvent] = []
    sweep.start(found.append)
    licenses = [new_license() for _ in range(600)]
    try:
        for license_id in licenses:
            await sweep.follow(license_id)
        await commit_events(engine, {lid: 1100 if n == 300 else 1 for n, lid in enumerate(licenses)})
        assert await sweep.sweep_once() == 599 + 1100
        assert max(events.licenses_per_read) == events.licenses_per_read[0] == 500
        by_license: dict[str, list[int]] = {}
        for event in found:
            by_license.setdefault(event.license_id, []).append(event.seq)
        assert by_license == {lid: list(range(1, (1100 if n == 300 else 1) + 1)) for n, lid in enumerate(licenses)}
    finally:
        await sweep.stop()
        await engine.dispose()


async def test_licenses_left_for_the_next_read_and_given_up_meanwhile_are_not_read_at_all(pg_url: str) -> None:
    """501 licenses moved (a read takes 500); the one left for a second read is given up while
    the first reads. No second read: one of no license would be a query without a condition."""
    engine = create_engine(Settings(database_url=pg_url))

    class LeavingEventLog(CountingEventLog):
        async def read_many(self, after: dict[str, int], limit: int = 1000) -> list[LicenseEvent]:
            events = await super().read_many(after, limit)
            for license_id in set(sweep.known) - set(after):
                sweep.unfollow(license_id)
            return events

    events = LeavingEventLog(engine)
    sweep = DatabaseSweep(events, interval=60)
    found: list[LicenseEvent] = []
    sweep.start(found.append)
    licenses = [new_license() for _ in range(501)]
    try:
        for license_id in licenses:
            await sweep.follow(license_id)
        await commit_events(engine, dict.fromkeys(licenses, 1))
        assert await sweep.sweep_once() == 500
        assert events.licenses_per_read == [500]
        assert len(sweep.known) == 500 and {e.license_id for e in found} == set(sweep.known)
    finally:
        await sweep.stop()
        await engine.dispose()


async def test_the_sweep_and_live_check_tasks_end_when_closed_and_closing_again_is_fine(pg_url: str) -> None:
    engine = create_engine(Settings(database_url=pg_url))

    def running() -> list[str]:
        return sorted(t.get_name() for t in asyncio.all_tasks() if not t.done() and t is not asyncio.current_task())

    try:
        publisher = SweptTransport(LossyTransport(), DatabaseSweep(EventLog(engine), interval=60))
        await publisher.close()  # the webhook's: it publishes only, never starts
        await publisher.close()
        transport = SweptTransport(LossyTransport(), DatabaseSweep(EventLog(engine), interval=60))
        await transport.start(lambda event: None)
        assert running() == ["database-sweep", "live-check"]
        await transport.close()
        assert running() == []
        await transport.close()  # closing twice is fine too
    finally:
        await engine.dispose()


async def test_sweep_failures_are_counted_logged_first_and_every_thirtieth_and_each_recovery_noted(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Two outages: 31 failed sweeps, one that succeeds, two more failed. The second outage is
    counted from one again, and the sweep outlives both."""
    engine = create_engine(Settings(database_url=pg_url))
    failing = {*range(1, 32), 33, 34}

    class FailingSweep(DatabaseSweep):
        calls = 0

        async def moved(self, known: dict[str, int]) -> dict[str, int]:
            self.calls += 1
            if self.calls in failing:
                raise OSError("database unavailable")
            return await super().moved(known)

    sweep = FailingSweep(EventLog(engine), interval=0.001)
    caplog.set_level(logging.INFO, logger="broker.sweep")
    before = metrics.SWEEP_FAILURES._value.get()
    sweep.start(lambda event: None)

    def recoveries() -> int:
        return sum("recovered" in r.getMessage() for r in caplog.records)

    try:
        await async_wait_until(lambda: recoveries() == 2, what="two recoveries")
        await async_wait_until(lambda: sweep.calls > 36, what="sweeps after the second recovery")
    finally:
        await sweep.stop()
        await engine.dispose()
    assert metrics.SWEEP_FAILURES._value.get() - before == len(failing)
    messages = [r.getMessage() for r in caplog.records if r.name == "broker.sweep"]
    assert messages == [
        "database sweep failed (1 in a row): database unavailable",
        "database sweep failed (30 in a row): database unavailable",
        "database sweep recovered after 31 failures",
        "database sweep failed (1 in a row): database unavailable",
        "database sweep recovered after 2 failures",
    ]


async def test_the_memory_transport_delivers_only_between_start_and_close_to_licenses_listened_to() -> None:
    """Before `start` and after `close` a publish is dropped without a word, whatever is listened
    to; between them, a license's events reach the handler while it is listened to."""
    transport = MemoryTransport()
    received: list[LicenseEvent] = []
    payload = notice("lic_m")
    await transport.listen("lic_m")
    await transport.publish("lic_m", payload)  # not started: nobody to hand it to
    await transport.start(received.append)
    await transport.publish("lic_m", payload)
    await transport.unlisten("lic_m")
    await transport.publish("lic_m", payload)
    assert [(e.license_id, e.seq, e.data) for e in received] == [("lic_m", NOTICE_SEQ, payload)]
    await transport.close()
    await transport.listen("lic_m")
    await transport.publish("lic_m", payload)  # closed: its handler is gone
    assert len(received) == 1


async def test_the_transport_is_the_one_the_settings_name_with_the_sweep_at_their_interval(pg_url: str) -> None:
    engine = create_engine(Settings(database_url=pg_url))
    events = EventLog(engine)
    base = make_settings(pg_url, poll_interval=0.7)
    try:
        memory = create_transport(dataclasses.replace(base, transport="memory"), events)
        assert isinstance(memory, MemoryTransport)
        poll = create_transport(dataclasses.replace(base, transport="poll"), events)
        assert isinstance(poll, PollTransport)
        assert (poll.sweep.events, poll.sweep.interval) == (events, 0.7)
        url = "redis://127.0.0.1:6379/0"
        redis_ = create_transport(dataclasses.replace(base, transport="redis", redis_url=url), events)
        assert isinstance(redis_, SweptTransport) and isinstance(redis_.inner, RedisTransport)
        assert redis_.inner.url == url
        # Production's timings: a listen waits 2 s for Redis's confirmation, reconnects back off
        # up to 5 s, and publishes fail fast for 1 s after one fails.
        timings = (redis_.inner.subscribe_timeout, redis_.inner.max_backoff, redis_.inner.publish_backoff)
        assert timings == (2.0, 5.0, 1.0)
        assert (redis_.sweep.events, redis_.sweep.interval) == (events, 0.7)
        own_check_engine(redis_, engine)
        cluster_url = "redis+cluster://127.0.0.1:7000"
        cluster = create_transport(dataclasses.replace(base, transport="redis", redis_url=cluster_url), events)
        assert isinstance(cluster, SweptTransport) and isinstance(cluster.inner, RedisClusterTransport)
        assert cluster.inner.address.nodes == (("127.0.0.1", 7000),)
        # The same, and the slot map read again every 30 s for what nothing else reports.
        timings = (cluster.inner.subscribe_timeout, cluster.inner.max_backoff, cluster.inner.refresh_interval)
        assert timings == (2.0, 5.0, 30.0)
        own_check_engine(cluster, engine)
    finally:
        await engine.dispose()


def own_check_engine(transport: SweptTransport, engine: AsyncEngine) -> None:
    """The live check reads on an engine of its own (not the sweep's, which serves catch-ups): one
    connection to the same database."""
    check = transport._check_engine
    assert check is not None and check is not engine
    assert (check.url, check.pool.size()) == (engine.url, 1)  # type: ignore[attr-defined]


async def test_closing_the_redis_transport_fails_a_publish_still_waiting_for_its_reply() -> None:
    received, hung_up = asyncio.Event(), asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.read(1)  # takes what the client sends and never answers
            received.set()
            await reader.read()  # until the client hangs up
        finally:
            writer.close()
            hung_up.set()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    transport = RedisTransport(f"redis://127.0.0.1:{port}/0")
    try:
        publish = asyncio.create_task(transport.publish(new_license(), b"{}"))
        async with asyncio.timeout(5):
            await received.wait()
        await transport.close()
        with pytest.raises(ConnectionError, match=r"^redis transport closed$"):
            async with asyncio.timeout(1):  # well before the publish timeout (2 s) could end it
                await publish
        async with asyncio.timeout(5):
            await hung_up.wait()
    finally:
        server.close()
        await server.wait_closed()


async def test_after_a_failed_publish_the_next_ones_fail_at_once_for_the_publish_backoff() -> None:
    """Redis refuses the connection: the publish fails with Redis's error, and those that follow
    within `publish_backoff` fail at once, without trying (a webhook is not held for the connect
    timeout during an outage; the sweep delivers). With no backoff, each one tries again."""
    refused = f"redis://127.0.0.1:{free_port()}/0"
    for backoff, tried_again in ((60.0, False), (0.0, True)):
        transport = RedisTransport(refused, publish_backoff=backoff)
        try:
            with pytest.raises(redis.ConnectionError):
                await transport.publish(new_license(), b"{}")
            with pytest.raises((ConnectionError, redis.ConnectionError)) as raised:
                await transport.publish(new_license(), b"{}")
            assert isinstance(raised.value, redis.ConnectionError) is tried_again
            if not tried_again:
                assert str(raised.value) == "redis unavailable (recent publish failed)"
        finally:
            await transport.close()


async def test_publishes_queued_behind_a_batch_that_fails_fail_with_it_without_trying() -> None:
    """A server that takes the PUBLISH and never answers: the batch on the wire fails at the
    publish timeout, its connection is dropped, and what queued behind it meanwhile fails then
    too, without another try (no second connection), for the publish backoff."""
    connections, received, hung_up = [], asyncio.Event(), asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)
        await reader.read(1)
        received.set()
        await reader.read()
        hung_up.set()
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    transport = RedisTransport(f"redis://127.0.0.1:{server.sockets[0].getsockname()[1]}/0", publish_backoff=60)
    try:
        first = asyncio.create_task(transport.publish(new_license(), b"{}"))
        async with asyncio.timeout(5):
            await received.wait()
        behind = asyncio.create_task(transport.publish(new_license(), b"{}"))
        await asyncio.wait({first}, timeout=10)  # PUBLISH_TIMEOUT (2 s) ends it
        assert first.done() and isinstance(first.exception(), TimeoutError)
        with pytest.raises(ConnectionError, match=r"^redis unavailable \(recent publish failed\)$"):
            await behind
        assert len(connections) == 1
        # The failed batch's connection is dropped (its reply may still come), not kept for the next.
        async with asyncio.timeout(5):
            await hung_up.wait()
    finally:
        await transport.close()
        server.close()
        await server.wait_closed()


async def test_publishes_share_one_sender_task_which_ends_with_the_transport(redis_url: str) -> None:
    transport = RedisTransport(redis_url)

    def senders() -> list[asyncio.Task[object]]:
        return [t for t in asyncio.all_tasks() if t.get_name() == "redis-publisher" and not t.done()]

    try:
        for _ in range(3):
            await transport.publish(new_license(), b"{}")
        await asyncio.gather(*(transport.publish(new_license(), b"{}") for _ in range(3)))
        assert len(senders()) == 1
    finally:
        await transport.close()
    assert senders() == []


async def test_closing_the_redis_transport_fails_a_publish_queued_before_its_sender_ran(redis_url: str) -> None:
    """The transport closes while a publish is queued for a sender task that has not run yet (a
    task cancelled before its first turn runs none of its code, its `finally` included): the
    publish fails at once rather than waiting for ever."""
    transport = RedisTransport(redis_url)
    publish = asyncio.create_task(transport.publish(new_license(), b"{}"))
    await asyncio.sleep(0)  # one turn of the loop: the publish queues its message and makes the sender
    assert transport._queued and transport._sender is not None and not transport._sender.done()
    await transport.close()
    with pytest.raises(ConnectionError, match=r"^redis transport closed$"):
        async with asyncio.timeout(5):
            await publish


@pytest.mark.slow
async def test_the_redis_subscriber_finds_a_silently_dead_connection_and_subscribes_again(
    redis_url: str, pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The connection to Redis stops carrying anything, and nothing closes it (a peer gone without
    a word): the subscriber's health check must find it, connect again, resubscribe and report
    the gap, as after an outage that ends the connection. Its PING is due 10 s after the last
    thing read, and 5 s more without an answer condemn the connection."""
    caplog.set_level(logging.INFO, logger="broker.redis")
    port = redis.Redis.from_url(redis_url).connection_pool.connection_kwargs["port"]
    proxy = TcpProxy(port)
    engine = create_engine(Settings(database_url=pg_url))
    transport = RedisTransport(f"redis://127.0.0.1:{proxy.port}/0", max_backoff=0.2)
    publisher = RedisTransport(redis_url)  # publishes around the relay
    h = Harness(publisher, engine)
    await transport.start(h.on_message, h.on_gap)
    license_id = new_license()
    try:
        await transport.listen(license_id)
        await h.commit_and_publish(license_id)
        assert (await h.next()).seq == 1
        # Idle and healthy for a while (reads time out every 1 s; 6 s is more than PING_GRACE):
        # kept as it is.
        idle = asyncio.get_running_loop().time() + 6
        await async_wait_until(lambda: asyncio.get_running_loop().time() > idle or h.gaps > 0, 10, "idle time")
        assert h.gaps == 0
        proxy.stall()
        await h.commit_and_publish(license_id)  # lost: the connection carries nothing now
        started = time.monotonic()
        await async_wait_until(lambda: h.gaps == 1, 30, "the subscriber to notice its dead connection")
        print(f"\nsilently dead connection found after {time.monotonic() - started:.1f} s")
        lost = [r.getMessage() for r in caplog.records if r.name == "broker.redis" and r.levelno == logging.WARNING]
        assert lost == ["redis subscriber lost: no answer to the health check's PING: the connection is silently dead"]
        assert h.received.empty()
        await h.commit_and_publish(license_id)
        assert (await h.next()).seq == 3  # live again, on a new connection, without a new listen()
    finally:
        await transport.close()
        await publisher.close()
        await engine.dispose()
        proxy.close()


@pytest.mark.slow
async def test_the_cluster_transport_follows_a_slot_that_moves_to_another_master() -> None:
    """A slot moves to another master (CLUSTER SETSLOT, as a resharding does): the old owner ends
    the subscription (a server-side sunsubscribe); the transport must fetch the slot map again,
    subscribe on the new owner and report the gap, without being told by anything else. Nothing
    is published through the transport's own cluster client, whose MOVED answers would correct
    the slot map for it: the messages go straight to the owning master. Each subscription
    (SSUBSCRIBE) returns, and the gap is reported, once the owner confirms it.

    The cluster is the test's own (it moves a slot) and formed in the test's body, not in a
    fixture: `make mutants` bounds a test by the time of its body in the stats run."""
    cluster = LocalCluster(replicas=0)
    try:
        cluster.start()
    except ClusterUnavailable as exc:
        unavailable("redis-server and redis-cli", exc)
    # A subscribe_timeout longer than the test: what returns, or is reported, was confirmed.
    transport = RedisClusterTransport(cluster.url, max_backoff=0.2, subscribe_timeout=60)
    received = Received()
    license_id = new_license()
    name = channel(license_id)

    def spublish(port: int, seq: int) -> None:
        cluster.command(port, "SPUBLISH", name, orjson.dumps({"license_id": license_id, "seq": seq}).decode())

    def subscribed(port: int) -> bool:
        return name.encode() in cluster.command(port, "PUBSUB", "SHARDCHANNELS", name)

    try:
        await asyncio.wait_for(transport.start(received.on_message, received.on_gap), 10)
        await asyncio.wait_for(transport.listen(license_id), 5)
        source = cluster.master_of(name)
        spublish(source, 1)
        assert (await received.next()).seq == 1
        target, third = sorted(cluster.master_ports() - {source})
        slot = str(key_slot(name.encode()))
        ids = {port: cluster.command(port, "CLUSTER", "MYID").decode() for port in cluster.ports}
        cluster.command(target, "CLUSTER", "SETSLOT", slot, "IMPORTING", ids[source])
        cluster.command(source, "CLUSTER", "SETSLOT", slot, "MIGRATING", ids[target])
        # The new owner first and the old one last, so that every node names the new owner by the
        # time the old one unsubscribes the channel.
        for port in (target, third, source):
            cluster.command(port, "CLUSTER", "SETSLOT", slot, "NODE", ids[target])
        await async_wait_until(
            lambda: subscribed(target) and not subscribed(source), 10, "the channel subscribed on its new master"
        )
        await async_wait_until(lambda: received.gaps >= 1, 5, "the gap reported")
        spublish(target, 2)
        assert (await received.next()).seq == 2
        assert received.received.empty()
    finally:
        await transport.close()
        cluster.stop()


# --- The cluster transport's own bookkeeping, against a cluster in memory (tests/support/fakecluster.py):
# its connections and their options, what it subscribes where, and its resync after a broken
# connection, a moved slot, a MOVED answer or a master it cannot reach. Deterministic and fast;
# the real cluster's behaviour (SSUBSCRIBE, a slot that moves, a failover) is tested above and in
# test_cluster.py.


@pytest.fixture
def fake_cluster(monkeypatch: pytest.MonkeyPatch) -> FakeCluster:
    cluster = FakeCluster()
    cluster.install(monkeypatch)
    return cluster


@contextlib.asynccontextmanager
async def cluster_transport(
    fake: FakeCluster, url: str | None = None, **options: Any
) -> AsyncIterator[tuple[RedisClusterTransport, Received]]:
    # A subscribe_timeout longer than any test unless the test sets one: what returns was confirmed.
    options = {"subscribe_timeout": 60, "max_backoff": 0.05, "refresh_interval": 60, **options}
    transport = RedisClusterTransport(url or fake.url, **options)
    received = Received()
    await asyncio.wait_for(transport.start(received.on_message, received.on_gap), 5)
    try:
        yield transport, received
    finally:
        await transport.close()


def cluster_message(license_id: str, seq: int) -> bytes:
    return orjson.dumps({"license_id": license_id, "seq": seq})


async def publish_and_receive(transport: RedisClusterTransport, received: Received, license_id: str, seq: int) -> None:
    await transport.publish(license_id, cluster_message(license_id, seq))
    event = await received.next(2)
    assert (event.license_id, event.seq) == (license_id, seq)


def cluster_log(caplog: pytest.LogCaptureFixture, level: int = logging.WARNING) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("broker.redis") and r.levelno >= level]


async def test_the_cluster_client_and_each_masters_connection_are_made_with_production_options(
    fake_cluster: FakeCluster,
) -> None:
    """The cluster client: every seed node, two retries with jittered backoff from 50 ms to
    500 ms (a publish during a failover fails within about a second), 2 s connect and read
    timeouts, TCP keepalive, the URL's credentials. Each master's subscriber connection: its
    host and port, the subscriber options (no retries, the health check) and the credentials."""
    url = "redis+cluster://reader:s%40cret@10.0.0.1:7001,10.0.0.2:7002"
    async with cluster_transport(fake_cluster, url):
        pass
    (client,) = fake_cluster.clients
    options = dict(client.kwargs)
    assert [(node.host, node.port) for node in options.pop("startup_nodes")] == [
        ("10.0.0.1", 7001),
        ("10.0.0.2", 7002),
    ]
    retry = options.pop("retry")
    assert isinstance(retry._backoff, ExponentialWithJitterBackoff)
    assert (retry._retries, retry._backoff._base, retry._backoff._cap) == (2, 0.05, 0.5)
    assert options == {
        "socket_connect_timeout": 2,
        "socket_timeout": 2,
        "socket_keepalive": True,
        "username": "reader",
        "password": "s@cret",
        "ssl": False,
    }
    wanted = {k: v for k, v in subscriber_options().items() if k != "retry"}
    assert sorted((c.kwargs["host"], c.kwargs["port"]) for c in fake_cluster.connections) == [
        ("10.0.0.1", 7001),
        ("10.0.0.2", 7002),
    ]
    for connection in fake_cluster.connections:
        options = dict(connection.kwargs)
        retry = options.pop("retry")
        assert (retry._retries, type(retry._backoff)) == (0, NoBackoff)
        assert options == {
            "host": connection.kwargs["host"],
            "port": connection.kwargs["port"],
            **wanted,
            "username": "reader",
            "password": "s@cret",
            "ssl": False,
        }
        assert type(options["port"]) is int


async def test_the_cluster_transport_publishes_with_spublish_and_its_check_pings_every_master(
    fake_cluster: FakeCluster,
) -> None:
    """A publish is an SPUBLISH of the license's channel with the payload as given; the health
    check PINGs every primary (not one node chosen at random) and answers True."""
    async with cluster_transport(fake_cluster) as (transport, _):
        await transport.publish("lic_a", b"payload")
        assert fake_cluster.published == [(channel("lic_a"), b"payload")]
        assert await transport.check() is True
        assert fake_cluster.pings == [RedisCluster.PRIMARIES]


async def test_a_publish_that_fails_on_a_master_gone_since_its_slot_map_was_read_goes_to_the_new_owner(
    fake_cluster: FakeCluster,
) -> None:
    """The webhook's client read its slot map before a failover (redis-py reads it again after a
    connection error at most once a second), so its publish fails on the dead master. While the
    failover is not over (the map read again still names that master, or cannot be read) the
    publish fails without another try: the streams resubscribe after the failover and their
    sweep finds the event. Once the replica has taken over, the map read again names it and the
    message goes there, to the streams already resubscribed on it, at once rather than at their
    next periodic sweep."""
    first, second = fake_cluster.name(1), fake_cluster.name(2)
    webhook = RedisClusterTransport(fake_cluster.url)
    try:
        async with cluster_transport(fake_cluster) as (stream, received):
            await asyncio.wait_for(stream.listen("lic_a"), 2)
            await publish_and_receive(webhook, received, "lic_a", 1)  # the webhook's map: the first master
            fake_cluster.unreachable.add(first)
            fake_cluster.pubsub(first).break_(redis.ConnectionError("connection reset"))
            fake_cluster.attempts.clear()
            with pytest.raises(redis.ConnectionError):
                await webhook.publish("lic_a", cluster_message("lic_a", 2))
            # A map that cannot be read again, or one whose slot no master serves: the same.
            for failure in (
                redis.ConnectionError("the node asked for CLUSTER SLOTS went away"),
                RedisClusterException("Redis Cluster cannot be connected. Please provide at least one reachable node"),
            ):
                fake_cluster.fail_refresh = failure
                with pytest.raises(redis.ConnectionError, match="Connection refused"):
                    await webhook.publish("lic_a", cluster_message("lic_a", 2))
            fake_cluster.fail_refresh = None
            fake_cluster.uncovered.add(channel("lic_a"))
            with pytest.raises(redis.ConnectionError, match="Connection refused"):
                await webhook.publish("lic_a", cluster_message("lic_a", 2))
            fake_cluster.uncovered.clear()
            assert fake_cluster.attempts == [first] * 4  # each tried once: no retry on the same master
            # The replica of the first master takes over its slots.
            fake_cluster.masters = fake_cluster.masters[1:]
            fake_cluster.home = second
            await async_wait_until(lambda: received.gaps == 1, 5, "the streams' resubscription")
            assert channel("lic_a") in fake_cluster.pubsub(second).subscribed
            fake_cluster.attempts.clear()
            await publish_and_receive(webhook, received, "lic_a", 3)
            assert fake_cluster.attempts == [first, second]
    finally:
        await webhook.close()


async def test_the_cluster_transports_check_reports_down_when_a_master_never_answers_its_ping(
    fake_cluster: FakeCluster,
) -> None:
    """A master that keeps the connection and never answers (a host gone without a word): the
    health check gives up after its bound (2 s) and reports the transport down; it does not wait
    with the readiness probe for ever."""
    async with cluster_transport(fake_cluster) as (transport, _):
        fake_cluster.silent.add(fake_cluster.name(2))
        async with asyncio.timeout(20):
            assert await transport.check() is False
        fake_cluster.silent.clear()
        assert await transport.check() is True


async def test_a_cluster_listen_subscribes_on_its_owners_connection_at_once_and_returns_once_confirmed(
    fake_cluster: FakeCluster, caplog: pytest.LogCaptureFixture
) -> None:
    """listen() sends the SSUBSCRIBE on the connection to the master that owns the channel (no
    resync), and returns only once that master confirms it: what is published from then on is
    delivered."""
    caplog.set_level(logging.INFO, logger="broker")
    second = fake_cluster.name(2)
    name = channel("lic_b")
    fake_cluster.owner[name] = second
    async with cluster_transport(fake_cluster) as (transport, received):
        syncs = fake_cluster.syncs
        fake_cluster.hold_confirmations = True
        listening = asyncio.create_task(transport.listen("lic_b"))
        await async_wait_until(lambda: fake_cluster.pubsub(second).ssubscribed() == [name], 2, "the SSUBSCRIBE")
        await asyncio.sleep(0.05)
        assert not listening.done()  # waits for the confirmation
        fake_cluster.pubsub(second).release()
        await asyncio.wait_for(listening, 2)
        assert fake_cluster.syncs == syncs  # no resync
        assert fake_cluster.pubsub(fake_cluster.name(1)).ssubscribed() == []
        await publish_and_receive(transport, received, "lic_b", 1)
        assert received.gaps == 0
    assert cluster_log(caplog) == []


async def test_a_cluster_listen_not_confirmed_within_subscribe_timeout_is_logged_and_returns(
    fake_cluster: FakeCluster, caplog: pytest.LogCaptureFixture
) -> None:
    """No confirmation within subscribe_timeout: listen() logs it, naming the channel, and returns
    (the sweep covers the license meanwhile)."""
    caplog.set_level(logging.WARNING, logger="broker")
    async with cluster_transport(fake_cluster, subscribe_timeout=0.1) as (transport, _):
        fake_cluster.hold_confirmations = True
        await asyncio.wait_for(transport.listen("lic_a"), 2)
    assert cluster_log(caplog) == [f"subscription to {channel('lic_a')} not confirmed: "]


async def test_a_cluster_listen_whose_ssubscribe_fails_marks_the_shard_failed_and_the_resync_replaces_it(
    fake_cluster: FakeCluster, caplog: pytest.LogCaptureFixture
) -> None:
    """An SSUBSCRIBE that fails (the connection broke under it): listen() logs it and returns,
    and the resync drops that connection (closed), opens a new one to the same master, subscribes
    the channel there and reports the gap."""
    caplog.set_level(logging.WARNING, logger="broker")
    first = fake_cluster.name(1)
    async with cluster_transport(fake_cluster) as (transport, received):
        old = fake_cluster.pubsub(first)
        old.fail_ssubscribe = redis.ConnectionError("boom")
        await asyncio.wait_for(transport.listen("lic_a"), 2)
        assert cluster_log(caplog) == [f"ssubscribe {channel('lic_a')} on {first} failed: boom"]
        await async_wait_until(lambda: received.gaps == 1, 2, "the resync")
        assert len(fake_cluster.pubsubs(first)) == 2 and old.closed
        assert fake_cluster.connections[0].closed
        assert fake_cluster.pubsub(first).ssubscribed() == [channel("lic_a")]
        await publish_and_receive(transport, received, "lic_a", 1)
        assert transport._shards[first].channels == {channel("lic_a")}


async def test_a_cluster_listen_before_start_or_while_the_owner_is_unreachable_is_subscribed_by_the_resync(
    fake_cluster: FakeCluster,
) -> None:
    """listen() before start() only notes the license; so does a listen whose owner has no
    connection (its master unreachable): the resync subscribes each once it can, and reports
    the gap once it has."""
    second = fake_cluster.name(2)
    fake_cluster.owner[channel("lic_b")] = second
    transport = RedisClusterTransport(fake_cluster.url, max_backoff=0.05, subscribe_timeout=60)
    received = Received()
    try:
        await asyncio.wait_for(transport.listen("lic_a"), 1)
        await asyncio.wait_for(transport.start(received.on_message, received.on_gap), 5)
        fake_cluster.unreachable.add(second)
        fake_cluster.pubsub(second).break_(redis.ConnectionError("gone"))
        await async_wait_until(lambda: second not in transport._shards, 2, "the connection dropped")
        await asyncio.wait_for(transport.listen("lic_b"), 1)  # its master unreachable
        await publish_and_receive(transport, received, "lic_a", 1)
        assert all(pubsub.ssubscribed() == [] for pubsub in fake_cluster.pubsubs(second))
        fake_cluster.unreachable.clear()
        await async_wait_until(lambda: received.gaps == 1, 2, "the resync")
        assert fake_cluster.pubsub(second).ssubscribed() == [channel("lic_b")]
        await publish_and_receive(transport, received, "lic_b", 1)
    finally:
        await transport.close()


async def test_unlisten_on_the_cluster_unsubscribes_on_the_owner_and_forgets_the_channel(
    fake_cluster: FakeCluster,
) -> None:
    """unlisten() sends the SUNSUBSCRIBE on the owner's connection and forgets the channel: nothing
    of it is delivered, it is not subscribed again by a resync, and a listen still waiting for its
    confirmation is ended. An SUNSUBSCRIBE that fails, or the unlisten of a license never
    subscribed, raises nothing."""
    second = fake_cluster.name(2)
    for license_id in ("lic_a", "lic_b", "lic_c"):
        fake_cluster.owner[channel(license_id)] = second
    async with cluster_transport(fake_cluster) as (transport, received):
        for license_id in ("lic_a", "lic_b"):
            await asyncio.wait_for(transport.listen(license_id), 2)
        pubsub = fake_cluster.pubsub(second)
        await asyncio.wait_for(transport.unlisten("lic_a"), 1)
        assert pubsub.sunsubscribed() == [channel("lic_a")]
        assert transport._shards[second].channels == {channel("lic_b")}
        assert channel("lic_a") not in transport._owner
        await transport.publish("lic_a", cluster_message("lic_a", 1))
        await publish_and_receive(transport, received, "lic_b", 1)  # the marker: lic_a's would be here first
        assert received.received.empty()
        # Not confirmed yet: the unlisten ends the wait.
        fake_cluster.hold_confirmations = True
        listening = asyncio.create_task(transport.listen("lic_c"))
        await async_wait_until(lambda: channel("lic_c") in pubsub.subscribed, 2, "the SSUBSCRIBE")
        await asyncio.wait_for(transport.unlisten("lic_c"), 1)
        await asyncio.wait({listening}, timeout=1)
        assert listening.done() and transport._pending == {}
        pubsub.fail_sunsubscribe = redis.ConnectionError("broken")
        await asyncio.wait_for(transport.unlisten("lic_b"), 1)
        await asyncio.wait_for(transport.unlisten("lic_never"), 1)
        assert transport._shards[second].channels == set() and transport._owner == {}
        # A resync (the connection breaks) subscribes none of them again.
        pubsub.break_(redis.ConnectionError("connection reset"))
        await async_wait_until(lambda: received.gaps == 1, 2, "the resync")
        assert len(fake_cluster.pubsubs(second)) == 2 and fake_cluster.pubsub(second).ssubscribed() == []


async def test_a_cluster_resync_reports_the_gap_once_the_new_owner_confirms_or_subscribe_timeout_ends_the_wait(
    fake_cluster: FakeCluster,
) -> None:
    """A channel moved to another master is subscribed there, and the gap reported only once the
    new owner confirms it, so that the sweep the gap wakes overlaps the live messages; a
    confirmation that never comes holds the gap back for subscribe_timeout, not for ever."""
    name = channel("lic_a")
    async with cluster_transport(fake_cluster, subscribe_timeout=1) as (transport, received):
        await asyncio.wait_for(transport.listen("lic_a"), 2)
        fake_cluster.hold_confirmations = True
        fake_cluster.owner[name] = fake_cluster.name(2)
        fake_cluster.pubsub(fake_cluster.name(1)).server_sunsubscribe(name)  # the slot migrated
        target = fake_cluster.pubsub(fake_cluster.name(2))
        await async_wait_until(lambda: target.ssubscribed() == [name], 2, "the SSUBSCRIBE on the new owner")
        await asyncio.sleep(0.2)
        assert received.gaps == 0  # not confirmed yet
        await async_wait_until(lambda: received.gaps == 1, 3, "the gap, at the subscribe timeout")


@pytest.mark.parametrize("unsubscribe_fails", [False, True], ids=["unsubscribed", "unsubscribe-fails"])
async def test_a_slot_moved_without_notice_is_found_by_the_periodic_refresh_and_its_channel_moved(
    fake_cluster: FakeCluster, caplog: pytest.LogCaptureFixture, unsubscribe_fails: bool
) -> None:
    """A slot moved and nothing said so: the periodic refresh reads the slot map again, the
    channel is unsubscribed on the old master (an SUNSUBSCRIBE that fails there does not stop the
    move), subscribed on the new one, and the gap reported, once: later refreshes find nothing to
    do, and the old master's answer to the SUNSUBSCRIBE is not taken for a server-side one."""
    caplog.set_level(logging.WARNING, logger="broker")
    first, second = fake_cluster.name(1), fake_cluster.name(2)
    name = channel("lic_a")
    async with cluster_transport(fake_cluster, refresh_interval=0.05) as (transport, received):
        await asyncio.wait_for(transport.listen("lic_a"), 2)
        old, new = fake_cluster.pubsub(first), fake_cluster.pubsub(second)
        if unsubscribe_fails:
            old.fail_sunsubscribe = redis.ConnectionError("broken")
        fake_cluster.owner[name] = second
        await async_wait_until(lambda: received.gaps == 1, 2, "the move")
        assert new.ssubscribed() == [name] and old.sunsubscribed() == [name]
        assert (transport._shards[first].channels, transport._shards[second].channels) == (set(), {name})
        assert transport._owner == {name: second}
        await publish_and_receive(transport, received, "lic_a", 1)
        refreshes = fake_cluster.refreshes
        await async_wait_until(lambda: fake_cluster.refreshes >= refreshes + 3, 2, "three more refreshes")
        assert new.ssubscribed() == [name] and received.gaps == 1
        assert len(fake_cluster.connections) == 2
    assert cluster_log(caplog) == []


async def test_a_quiet_cluster_transport_keeps_its_connections_and_reports_no_gap_at_its_refreshes(
    fake_cluster: FakeCluster, caplog: pytest.LogCaptureFixture
) -> None:
    """Nothing changes in the cluster: each refresh of the slot map subscribes nothing again,
    opens no connection, reports no gap and logs nothing; the readers wait at most 1 s a read
    (so that the health check's deadline is checked every second) and deliver every message."""
    caplog.set_level(logging.INFO, logger="broker")
    fake_cluster.owner[channel("lic_b")] = fake_cluster.name(2)
    async with cluster_transport(fake_cluster, refresh_interval=0.02) as (transport, received):
        for license_id in ("lic_a", "lic_b"):
            await asyncio.wait_for(transport.listen(license_id), 2)
        refreshes = fake_cluster.refreshes
        await async_wait_until(lambda: fake_cluster.refreshes >= refreshes + 5, 2, "five refreshes")
        assert len(fake_cluster.connections) == 2
        for n, license_id in ((1, "lic_a"), (2, "lic_b")):
            pubsub = fake_cluster.pubsub(fake_cluster.name(n))
            assert pubsub.ssubscribed() == [channel(license_id)]
            assert set(pubsub.read_timeouts[1:]) == {1.0}  # the first: the PING's answer at _open
        for seq in (1, 2):
            await publish_and_receive(transport, received, "lic_a", seq)
        await publish_and_receive(transport, received, "lic_b", 1)
        assert received.gaps == 0
        assert metrics.TRANSPORT_UP.labels("redis-cluster")._value.get() == 1
    assert cluster_log(caplog, logging.INFO) == []


async def test_a_cluster_shard_whose_connection_breaks_fails_its_waiting_listens_and_is_replaced(
    fake_cluster: FakeCluster, caplog: pytest.LogCaptureFixture
) -> None:
    """A master's connection breaks: its listens still waiting for a confirmation return at once
    with its error (the other masters' keep waiting), the shard is logged lost, and the resync
    opens a new connection to the master, subscribes its channels there and reports the gap once
    they are confirmed."""
    caplog.set_level(logging.WARNING, logger="broker")
    first, second = fake_cluster.name(1), fake_cluster.name(2)
    fake_cluster.owner[channel("lic_b")] = second
    async with cluster_transport(fake_cluster) as (transport, received):
        fake_cluster.hold_confirmations = True
        waiting = {i: asyncio.create_task(transport.listen(i)) for i in ("lic_a", "lic_b")}
        await async_wait_until(lambda: channel("lic_b") in fake_cluster.pubsub(second).subscribed, 2, "SSUBSCRIBE")
        await async_wait_until(lambda: channel("lic_a") in fake_cluster.pubsub(first).subscribed, 2, "SSUBSCRIBE")
        fake_cluster.pubsub(first).break_(redis.ConnectionError("connection reset"))
        await asyncio.wait_for(waiting["lic_a"], 1)
        assert cluster_log(caplog) == [
            f"redis cluster shard {first} lost: connection reset",
            f"subscription to {channel('lic_a')} not confirmed: connection reset",
        ]
        await async_wait_until(lambda: len(fake_cluster.pubsubs(first)) == 2, 2, "a new connection")
        replaced = fake_cluster.pubsub(first)
        await async_wait_until(lambda: replaced.ssubscribed() == [channel("lic_a")], 2, "the resubscription")
        assert not waiting["lic_b"].done() and received.gaps == 0
        replaced.release()
        await async_wait_until(lambda: received.gaps == 1, 2, "the gap")
        fake_cluster.pubsub(second).release()
        await asyncio.wait_for(waiting["lic_b"], 1)
        await publish_and_receive(transport, received, "lic_a", 1)
        await publish_and_receive(transport, received, "lic_b", 1)
        assert transport._shards[first].channels == {channel("lic_a")}


async def test_a_server_side_sunsubscribe_moves_the_channel_to_its_new_owner_and_keeps_the_others(
    fake_cluster: FakeCluster, caplog: pytest.LogCaptureFixture
) -> None:
    """The master ends one channel's subscription (its slot migrated): the transport reads the
    slot map again and subscribes that channel on the new owner, whichever place it has among
    the channels the resync goes through, reports the gap, and keeps the old master's connection
    and its other channels as they are."""
    caplog.set_level(logging.WARNING, logger="broker")
    first, second = fake_cluster.name(1), fake_cluster.name(2)
    ids = [f"lic_{n}" for n in range(5)]
    async with cluster_transport(fake_cluster) as (transport, received):
        for license_id in ids:
            await asyncio.wait_for(transport.listen(license_id), 2)
        moving = list(transport._channels)[-1]  # the last the resync looks at
        fake_cluster.owner[moving] = second
        fake_cluster.pubsub(first).server_sunsubscribe(moving)
        await async_wait_until(lambda: received.gaps == 1, 2, "the move")
        assert fake_cluster.pubsub(second).ssubscribed() == [moving]
        assert transport._shards[first].channels == {channel(i) for i in ids} - {moving}
        assert transport._owner[moving] == second
        assert len(fake_cluster.connections) == 2
        await publish_and_receive(transport, received, moving.removeprefix("license:"), 1)
    assert cluster_log(caplog) == []


async def test_a_moved_answer_to_an_ssubscribe_makes_the_resync_read_the_slot_map_again(
    fake_cluster: FakeCluster, caplog: pytest.LogCaptureFixture
) -> None:
    """The transport's slot map is out of date: listen() sends the SSUBSCRIBE to the old owner,
    which answers MOVED. The answer is logged, the connection kept (its other channels still
    delivered), and the resync reads the slot map again and subscribes the channel on its owner,
    whose confirmation ends the listen."""
    caplog.set_level(logging.INFO, logger="broker")
    first, second = fake_cluster.name(1), fake_cluster.name(2)
    name = channel("lic_b")
    async with cluster_transport(fake_cluster) as (transport, received):
        await asyncio.wait_for(transport.listen("lic_a"), 2)
        fake_cluster.owner[name] = second
        await asyncio.wait_for(transport.listen("lic_b"), 2)
        assert fake_cluster.pubsub(first).ssubscribed() == [channel("lic_a"), name]
        assert fake_cluster.pubsub(second).ssubscribed() == [name]
        await async_wait_until(lambda: received.gaps == 1, 2, "the gap")
        await publish_and_receive(transport, received, "lic_b", 1)
        await publish_and_receive(transport, received, "lic_a", 1)
        assert len(fake_cluster.connections) == 2
    assert cluster_log(caplog, logging.INFO) == [
        f"shard {first}: MOVED {key_slot(name.encode())} {second}",
        "redis-cluster subscriber reconnected (2 channels)",
    ]


@pytest.mark.parametrize(
    ("added", "silent", "problems"),
    [
        (1, False, "10.0.0.3:7003: Error connecting to 10.0.0.3:7003"),
        (1, True, "10.0.0.3:7003: no answer to PING"),
        (3, False, "; ".join(f"10.0.0.{n}:700{n}: Error connecting to 10.0.0.{n}:700{n}" for n in (3, 4, 5))),
        (4, False, "; ".join(f"10.0.0.{n}:700{n}: Error connecting to 10.0.0.{n}:700{n}" for n in (3, 4, 5)) + " ..."),
    ],
    ids=["one", "silent", "three", "four"],
)
async def test_masters_the_cluster_transport_cannot_reach_are_named_and_the_others_still_served(
    fake_cluster: FakeCluster, caplog: pytest.LogCaptureFixture, added: int, silent: bool, problems: str
) -> None:
    """New masters that refuse the connection, or take it and never answer its PING: the resync
    serves the masters it reaches and fails naming the others, the first three and " ..." if
    there are more, tried again with the backoff."""
    caplog.set_level(logging.WARNING, logger="broker")
    # The PING's answer is awaited for subscribe_timeout (60 s), which the cluster in memory cuts to 10 ms.
    async with cluster_transport(fake_cluster, refresh_interval=0.05) as (transport, received):
        await asyncio.wait_for(transport.listen("lic_a"), 2)
        new = [fake_cluster.node(n) for n in range(3, 3 + added)]
        (fake_cluster.silent if silent else fake_cluster.unreachable).update(node.name for node in new)
        fake_cluster.masters += new
        await async_wait_until(lambda: cluster_log(caplog) != [], 2, "the resync to fail")
        assert cluster_log(caplog) == [f"redis-cluster subscriber lost: {problems}"]
        await publish_and_receive(transport, received, "lic_a", 1)
        assert set(transport._shards) == {fake_cluster.name(1), fake_cluster.name(2)}
        # Each attempt's connection closed (the newest may be an attempt still under way).
        assert all(pubsub.closed for node in new for pubsub in fake_cluster.pubsubs(node.name)[:-1])


async def test_a_cluster_resync_subscribes_what_it_can_past_a_channel_without_an_owner_or_with_an_unreachable_one(
    fake_cluster: FakeCluster, caplog: pytest.LogCaptureFixture
) -> None:
    """After a connection breaks, the resync goes through every channel: one whose slot no master
    serves, or whose master cannot be reached, is named in the failure, and the channels after
    it are still subscribed on their masters."""
    caplog.set_level(logging.WARNING, logger="broker")
    first = fake_cluster.name(1)
    ids = [f"lic_{n}" for n in range(4)]
    async with cluster_transport(fake_cluster) as (transport, _):
        for license_id in ids:
            await asyncio.wait_for(transport.listen(license_id), 2)
        order = list(transport._channels)  # the order the resync goes through them
        third = fake_cluster.node(3)
        fake_cluster.masters.append(third)
        fake_cluster.unreachable.add(third.name)
        fake_cluster.owner[order[0]] = third.name
        fake_cluster.uncovered.add(order[1])
        fake_cluster.pubsub(first).break_(redis.ConnectionError("connection reset"))
        await async_wait_until(lambda: len(fake_cluster.pubsubs(first)) == 2, 2, "a new connection")
        replaced = fake_cluster.pubsub(first)
        await async_wait_until(lambda: sorted(replaced.ssubscribed()) == sorted(order[2:]), 2, "the others subscribed")
        slot = key_slot(order[1].encode())
        assert cluster_log(caplog)[1] == (
            f"redis-cluster subscriber lost: {third.name}: Error connecting to {third.name}; "
            f'{order[1]}: Slot "{slot}" is not covered by the cluster.'
        )


async def test_closing_the_cluster_transport_closes_every_connection_even_when_closes_fail_and_it_can_start_again(
    fake_cluster: FakeCluster,
) -> None:
    """close() stops each master's reader task (named for its master), closes each subscriber
    connection and the cluster client, each close tried even when another raises, and reports the
    transport down; started again, it makes a new cluster client and serves."""
    fake_cluster.fail_connection_close = redis.TimeoutError("Timed out closing connection after 2")
    fake_cluster.owner[channel("lic_b")] = fake_cluster.name(2)
    transport = RedisClusterTransport(fake_cluster.url, max_backoff=0.05, subscribe_timeout=60)
    received = Received()
    await asyncio.wait_for(transport.start(received.on_message, received.on_gap), 5)
    try:
        for license_id in ("lic_a", "lic_b"):
            await asyncio.wait_for(transport.listen(license_id), 2)
        readers = [t for t in asyncio.all_tasks() if t.get_name().startswith("redis-cluster-shard-")]
        assert sorted(t.get_name() for t in readers) == [f"redis-cluster-shard-{fake_cluster.name(n)}" for n in (1, 2)]
        fake_cluster.pubsub(fake_cluster.name(1)).fail_close = redis.TimeoutError("Timed out closing connection")
        fake_cluster.fail_client_close = redis.ConnectionError("already closed")
        await asyncio.wait_for(transport.close(), 2)
        assert all(task.done() for task in readers)
        assert all(c.closed and c.pubsub().closed for c in fake_cluster.connections)
        assert fake_cluster.clients[0].closed
        assert metrics.TRANSPORT_UP.labels("redis-cluster")._value.get() == 0
        fake_cluster.fail_connection_close = fake_cluster.fail_client_close = None
        await asyncio.wait_for(transport.start(received.on_message, received.on_gap), 5)
        assert len(fake_cluster.clients) == 2
        await asyncio.wait_for(transport.listen("lic_a"), 2)
        await publish_and_receive(transport, received, "lic_a", 1)
    finally:
        await transport.close()


async def test_a_cluster_listen_while_its_masters_connection_is_failed_and_not_yet_replaced_is_left_to_the_resync(
    fake_cluster: FakeCluster,
) -> None:
    """The owner's connection broke and the resync has not replaced it yet (it is reading the slot
    map): listen() sends nothing on the broken connection and returns at once; the resync
    subscribes the channel on the new connection."""
    first = fake_cluster.name(1)
    async with cluster_transport(fake_cluster) as (transport, received):
        await asyncio.wait_for(transport.listen("lic_a"), 2)
        old = fake_cluster.pubsub(first)
        fake_cluster.refresh_gate = gate = asyncio.Event()
        old.break_(redis.ConnectionError("connection reset"))
        await async_wait_until(lambda: transport._shards[first].failed, 2, "the shard marked failed")
        await asyncio.wait_for(transport.listen("lic_b"), 1)
        assert old.ssubscribed() == [channel("lic_a")]
        gate.set()
        await async_wait_until(lambda: received.gaps == 1, 2, "the resync")
        assert sorted(fake_cluster.pubsub(first).ssubscribed()) == [channel("lic_a"), channel("lic_b")]
        await publish_and_receive(transport, received, "lic_b", 1)


async def test_a_channel_moved_by_a_cluster_resync_that_then_fails_is_reported_as_a_gap_at_the_next_success(
    fake_cluster: FakeCluster, caplog: pytest.LogCaptureFixture
) -> None:
    """A slot migrates while a new master cannot be reached: the resync moves the channel to its
    new owner, then fails on that master. The gap of the move is not forgotten: the resync that
    succeeds once the master answers reports it, though it moves nothing itself."""
    caplog.set_level(logging.WARNING, logger="broker")
    name = channel("lic_a")
    async with cluster_transport(fake_cluster) as (transport, received):
        await asyncio.wait_for(transport.listen("lic_a"), 2)
        third = fake_cluster.node(3)
        fake_cluster.unreachable.add(third.name)
        fake_cluster.masters.append(third)
        fake_cluster.owner[name] = fake_cluster.name(2)
        fake_cluster.pubsub(fake_cluster.name(1)).server_sunsubscribe(name)
        await async_wait_until(lambda: cluster_log(caplog) != [], 2, "the resync to fail")
        assert fake_cluster.pubsub(fake_cluster.name(2)).ssubscribed() == [name]
        assert received.gaps == 0
        fake_cluster.unreachable.clear()
        await async_wait_until(lambda: received.gaps == 1, 2, "the gap")
        await publish_and_receive(transport, received, "lic_a", 1)


async def test_an_ssubscribe_that_fails_in_a_cluster_resync_is_named_and_its_connection_replaced(
    fake_cluster: FakeCluster, caplog: pytest.LogCaptureFixture
) -> None:
    """The resync's SSUBSCRIBE on the new owner fails: the resync fails naming that master and its
    error, and the next one drops that connection (closed), opens another, subscribes the
    channel there and reports the gap."""
    caplog.set_level(logging.WARNING, logger="broker")
    first, second = fake_cluster.name(1), fake_cluster.name(2)
    name = channel("lic_a")
    async with cluster_transport(fake_cluster) as (transport, received):
        await asyncio.wait_for(transport.listen("lic_a"), 2)
        broken = fake_cluster.pubsub(second)
        broken.fail_ssubscribe = redis.ConnectionError("boom")
        fake_cluster.owner[name] = second
        fake_cluster.pubsub(first).server_sunsubscribe(name)
        await async_wait_until(lambda: received.gaps == 1, 2, "the move")
        assert cluster_log(caplog) == [f"redis-cluster subscriber lost: {second}: boom"]
        assert broken.ssubscribed() == [name] and broken.closed
        assert len(fake_cluster.pubsubs(second)) == 2 and fake_cluster.pubsub(second).ssubscribed() == [name]
        await publish_and_receive(transport, received, "lic_a", 1)


async def test_a_cluster_transport_asked_to_resync_as_it_is_closed_stops(fake_cluster: FakeCluster) -> None:
    """A resync asked for (a shard's reader saw a MOVED or a server-side SUNSUBSCRIBE) in the turn
    the transport is closed: the close still ends its loop (on Python 3.11 `asyncio.wait_for`
    lost the cancellation there, cpython#86296, and the loop resynced and waited again for ever;
    tests/test_stopping.py has the other loops)."""

    async def started() -> Running:
        transport = RedisClusterTransport(fake_cluster.url, max_backoff=0.05, refresh_interval=60)
        await asyncio.wait_for(transport.start(Received().on_message), 5)
        return transport._resync.set, transport.close

    await stops_when_woken_as_closed(started)


async def test_a_listen_waiting_on_a_shard_that_another_listens_ssubscribe_broke_is_told_so(
    fake_cluster: FakeCluster, caplog: pytest.LogCaptureFixture
) -> None:
    """Two listens on one master: the first waits for its confirmation when the second's
    SSUBSCRIBE fails there. The shard is marked failed, and the first stops waiting at once with
    the shard named (the resync replaces the connection and subscribes both)."""
    caplog.set_level(logging.WARNING, logger="broker")
    first = fake_cluster.name(1)
    async with cluster_transport(fake_cluster) as (transport, received):
        fake_cluster.hold_confirmations = True
        waiting = asyncio.create_task(transport.listen("lic_a"))
        shard = fake_cluster.pubsub(first)
        await async_wait_until(lambda: shard.ssubscribed() == [channel("lic_a")], 2, "the first SSUBSCRIBE")
        shard.fail_ssubscribe = redis.ConnectionError("reset by peer")
        await asyncio.wait_for(transport.listen("lic_b"), 2)
        await asyncio.wait_for(waiting, 2)  # not the 60 s subscribe_timeout
        assert cluster_log(caplog)[:2] == [
            f"ssubscribe {channel('lic_b')} on {first} failed: reset by peer",
            f"subscription to {channel('lic_a')} not confirmed: shard {first} failed",
        ]
        fake_cluster.hold_confirmations = False
        await async_wait_until(lambda: received.gaps == 1, 2, "the resync")
        assert sorted(fake_cluster.pubsub(first).ssubscribed()) == [channel("lic_a"), channel("lic_b")]
