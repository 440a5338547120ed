"""Live (Redis) messages are checked against the database before anything trusts them: a forged
PUBLISH on a license's channel reaches no client and no lease, is counted, and does not blind the
sweep; genuine events still arrive; the check costs one query per batch per process, not per client."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import httpx
import jwt
import orjson
import pytest
import redis.asyncio as aioredis
import sqlalchemy as sa
from httpx_sse import ServerSentEvent, aconnect_sse
from prometheus_client import REGISTRY
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection

from broker.settings import Settings
from broker.signing.leases import LeaseKeys
from broker.storage.db import create_engine, migrate
from broker.storage.eventlog import EventLog, LicenseEvent, encode_event
from broker.storage.licenses import initial_state
from broker.transports import livecheck
from broker.transports.base import channel
from broker.transports.livecheck import LiveCheck
from broker.transports.redis import RedisTransport
from broker.transports.sweep import DatabaseSweep
from broker.transports.swept import SweptTransport
from license_broker.embedded import create_app
from tests.support.licenses import append, make_settings, new_license, post_event, token_for
from tests.support.processes import serving
from tests.support.services import psycopg_connect
from tests.support.transports import Received
from tests.support.waiting import async_wait_until, free_port
from webhook.samples import SampleEvents

KEYS = LeaseKeys.generate()


def rejected(reason: str) -> float:
    return REGISTRY.get_sample_value("license_broker_live_messages_rejected_total", {"reason": reason}) or 0.0


def forged_event(license_id: str, seq: int, *, entitled: bool) -> bytes:
    """A well-formed event, as the webhook would encode it, that the database never held."""
    state = {**initial_state(), "status": "active" if entitled else "canceled", "entitled": entitled}
    state["features"] = ["forged-pro"]
    return encode_event(
        license_id,
        seq,
        state,  # type: ignore[arg-type]
        stripe_event_id="evt_forged",
        stripe_event_type="customer.subscription.updated",
        occurred_at=datetime.now(UTC),
        recorded_at=datetime.now(UTC),
    )


class Follower:
    """One SSE client of a license, its events (state and lease) queued as they arrive."""

    def __init__(self, client: httpx.AsyncClient, url: str, license_id: str) -> None:
        self.received: asyncio.Queue[ServerSentEvent] = asyncio.Queue()
        self.seen: list[ServerSentEvent] = []
        self._task = asyncio.create_task(self._read(client, url, license_id))

    async def _read(self, client: httpx.AsyncClient, url: str, license_id: str) -> None:
        headers = {"authorization": f"Bearer {token_for(license_id)}"}
        async with aconnect_sse(client, "GET", f"{url}/api/licenses/{license_id}/events", headers=headers) as source:
            async for sse in source.aiter_sse():
                if sse.data:
                    self.received.put_nowait(sse)

    async def until_lease_of(self, seq: int) -> list[ServerSentEvent]:
        """Everything up to the lease that follows the state of `seq`."""
        got: list[ServerSentEvent] = []
        async with asyncio.timeout(10):
            while True:
                sse = await self.received.get()
                got.append(sse)
                self.seen.append(sse)
                if sse.event == "lease" and sse.json()["seq"] == seq:
                    return got

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


async def current_seq(client: httpx.AsyncClient, url: str, license_id: str) -> int:
    response = await client.get(
        f"{url}/api/licenses/{license_id}", headers={"authorization": f"Bearer {token_for(license_id)}"}
    )
    seq: int = response.json()["seq"]
    return seq


async def pay(client: httpx.AsyncClient, url: str, license_id: str, action: str = "pay") -> int:
    for event in SampleEvents(license_id).for_action(action):
        assert (await post_event(client, url, event)).status_code == 200
    return await current_seq(client, url, license_id)


@pytest.fixture
async def publisher(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


async def test_a_forged_publish_reaches_no_client_and_no_lease_while_genuine_events_arrive(
    pg_url: str, redis_url: str, publisher: aioredis.Redis
) -> None:
    license_id = new_license()
    settings = make_settings(pg_url, redis_url=redis_url, transport="redis", lease_keys=KEYS)
    public = KEYS.signing.public_key()
    async with serving(create_app(settings)) as url, httpx.AsyncClient(timeout=10) as client:
        follower = Follower(client, url, license_id)
        try:
            await follower.until_lease_of(0)  # the current state ("none") and its lease
            unknown, mismatch = rejected("unknown"), rejected("mismatch")
            # The next seq, entitled, with features the license never had: what an attacker with
            # PUBLISH rights would send to unlock every app of this license.
            await publisher.publish(channel(license_id), forged_event(license_id, 1, entitled=True))
            await publisher.publish(channel(license_id), forged_event(license_id, 50, entitled=True))
            await async_wait_until(lambda: rejected("unknown") >= unknown + 2, what="the forgeries counted")

            paid = await pay(client, url, license_id)
            after_pay = await follower.until_lease_of(paid)
            # A forged lock, and other bytes for a seq the log holds.
            await publisher.publish(channel(license_id), forged_event(license_id, paid + 1, entitled=False))
            await publisher.publish(channel(license_id), forged_event(license_id, paid, entitled=True))
            await async_wait_until(
                lambda: rejected("unknown") + rejected("mismatch") >= unknown + mismatch + 4,
                what="the forgeries counted",
            )
            assert rejected("mismatch") >= mismatch + 1
            refunded = await pay(client, url, license_id, "refund")
            after_refund = await follower.until_lease_of(refunded)
        finally:
            await follower.close()
        engine = create_engine(settings)
        try:
            stored = await EventLog(engine).read(license_id, 0, limit=100)
        finally:
            await engine.dispose()

    states = [sse for sse in follower.seen if sse.event == "message"]
    leases = [
        jwt.decode(sse.json()["lease"], public, algorithms=["EdDSA"]) for sse in follower.seen if sse.event == "lease"
    ]
    assert all(b"forged" not in sse.data.encode() for sse in follower.seen)
    # Every state sent is a stored event, byte for byte, and every lease is over one of them.
    by_seq = {event.seq: event.data for event in stored}
    assert all(sse.data.encode() == by_seq[int(sse.id)] for sse in states if sse.id != "0")
    assert leases[0]["seq"] == 0 and leases[-1]["seq"] == refunded and paid in {lease["seq"] for lease in leases}
    for lease in leases[1:]:
        genuine = orjson.loads(by_seq[lease["seq"]])
        assert (lease["entitled"], lease["features"]) == (genuine["entitled"], genuine["state"]["features"])
    assert after_pay[-2].json()["entitled"] is True and after_refund[-2].json()["entitled"] is False


async def test_a_forged_seq_far_ahead_does_not_stop_the_sweep_finding_lost_events(pg_url: str, redis_url: str) -> None:
    """A forgery noted as delivered would move the sweep past events it has yet to find: with Redis
    losing (or an attacker dropping) the genuine message, the client would never get it."""
    engine = create_engine(Settings(database_url=pg_url))
    transport = SweptTransport(RedisTransport(redis_url), DatabaseSweep(EventLog(engine), interval=60))
    received = Received()
    publisher = aioredis.Redis.from_url(redis_url)
    await transport.start(received.on_message)
    try:
        license_id = new_license()
        await transport.listen(license_id)
        before = rejected("unknown")
        await publisher.publish(channel(license_id), forged_event(license_id, 10**6, entitled=True))
        await async_wait_until(lambda: rejected("unknown") > before, what="the forgery counted")
        lost = await append(engine, license_id)  # committed, never published
        assert await transport.sweep.sweep_once() == 1
        assert (await received.next()).data == lost.data
        assert received.received.empty()
    finally:
        await transport.close()
        await publisher.aclose()
        await engine.dispose()


@pytest.fixture
def queries(monkeypatch: pytest.MonkeyPatch) -> list[Sequence[tuple[str, int]]]:
    """The keys of each query the live check makes."""
    made: list[Sequence[tuple[str, int]]] = []
    read = livecheck.read_stored

    async def counting(conn: AsyncConnection, pg: Any, keys: Sequence[tuple[str, int]]) -> dict[tuple[str, int], bytes]:
        made.append(keys)
        return await read(conn, pg, keys)

    monkeypatch.setattr(livecheck, "read_stored", counting)
    return made


async def test_messages_that_arrive_together_are_checked_in_one_query_in_their_order(
    db_url: str, queries: list[Sequence[tuple[str, int]]]
) -> None:
    engine = create_engine(Settings(database_url=db_url))
    await migrate(engine)  # Postgres's is migrated already; SQLite's is new
    passed: list[LicenseEvent] = []
    unchecked: list[int] = []
    check = LiveCheck(engine, passed.append, lambda: unchecked.append(1), limit=40)
    statements: list[str] = []  # the SQL the check sends through SQLAlchemy (SQLite; Postgres's goes through psycopg)

    def noted(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().startswith("SELECT") and "subscription_event_logs" in statement:
            statements.append(statement)

    sa.event.listen(engine.sync_engine, "before_cursor_execute", noted)
    try:
        genuine = [await append(engine, lid) for lid in (new_license(), new_license()) for _ in range(10)]
        forged = [
            LicenseEvent(e.license_id, e.seq + 10, forged_event(e.license_id, e.seq + 10, entitled=True))
            for e in genuine[:5]
        ]
        mismatched = [
            LicenseEvent(e.license_id, e.seq, forged_event(e.license_id, e.seq, entitled=True)) for e in genuine[5:10]
        ]
        arriving = [item for pair in zip(genuine, [*forged, *mismatched] * 2, strict=True) for item in pair]
        checks = REGISTRY.get_sample_value("license_broker_live_check_seconds_count") or 0.0
        for event in arriving:
            check.submit(event)
        await check.check_pending()
        assert REGISTRY.get_sample_value("license_broker_live_check_seconds_count") == checks + 1
        assert [len(keys) for keys in queries] == [25]  # 40 messages, 25 distinct (license, seq): one query
        assert len(statements) == (1 if engine.dialect.name == "sqlite" else 0)
        assert passed == genuine
        assert unchecked == []
        # A batch of one (the usual one: its own statement) or of two, genuine or not.
        for batch in ([genuine[0]], [forged[0]], [genuine[1], mismatched[0]], [genuine[2], genuine[3]]):
            for event in batch:
                check.submit(event)
            await check.check_pending()
        assert [len(keys) for keys in queries[1:]] == [1, 1, 2, 2]
        assert passed[20:] == [genuine[0], genuine[1], genuine[2], genuine[3]]
        assert unchecked == []
        del passed[20:], queries[1:]
        # Beyond the queue's limit, messages are left to the sweep (which reads the database itself).
        for event in [*genuine, *genuine, *genuine[:1]]:
            check.submit(event)
        assert unchecked == [1]
        await check.check_pending()
        assert len(queries) == 2 and len(passed) == 20 + 40
    finally:
        await check.stop()
        await engine.dispose()


async def test_an_event_reaching_many_clients_of_one_process_is_checked_once(
    pg_url: str, redis_url: str, queries: list[Sequence[tuple[str, int]]]
) -> None:
    license_id = new_license()
    settings = make_settings(pg_url, redis_url=redis_url, transport="redis", lease_keys=KEYS)
    async with serving(create_app(settings)) as url, httpx.AsyncClient(timeout=10) as client:
        followers = [Follower(client, url, license_id) for _ in range(8)]
        try:
            for follower in followers:
                await follower.until_lease_of(0)
            paid = await pay(client, url, license_id)
            for follower in followers:
                await follower.until_lease_of(paid)
        finally:
            for follower in followers:
                await follower.close()
    checked = [key for keys in queries for key in keys]
    assert sorted(checked) == [(license_id, seq) for seq in range(1, paid + 1)]  # once each, not once per client


async def test_the_check_opens_a_new_connection_after_its_own_dies(pg_url: str) -> None:
    """It holds one connection: a database restart (or a killed backend) costs the messages of one
    batch their live path (the sweep delivers them), never the check itself."""
    engine = create_engine(Settings(database_url=pg_url))
    check_engine = create_engine(Settings(database_url=pg_url, db_pool_size=1))
    passed: list[LicenseEvent] = []
    unchecked: list[int] = []
    check = LiveCheck(check_engine, passed.append, lambda: unchecked.append(1))
    license_id = new_license()
    try:
        first = await append(engine, license_id)
        check.submit(first)
        await check.check_pending()
        assert passed == [first]
        with psycopg_connect(pg_url) as admin:
            killed = admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() "
                # The check's connection, by its last statement (a batch of one: livecheck._STORED_ONE_PG).
                f"AND query = '{livecheck._STORED_ONE_PG.replace('%s', '$1', 1).replace('%s', '$2', 1)}'"
            ).fetchall()
        assert killed == [(True,)]
        second = await append(engine, license_id)
        check.submit(second)
        await check.check_pending()
        assert (passed, unchecked) == ([first], [1])  # left to the sweep
        third = await append(engine, license_id)
        check.submit(third)
        await check.check_pending()
        assert passed == [first, third]
    finally:
        await check.stop()
        await check_engine.dispose()
        await engine.dispose()


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The live check's monotonic clock, set by the test; it starts at 0 (monotonic's origin is
    arbitrary: a host just booted)."""
    now = [0.0]
    monkeypatch.setattr(livecheck, "time", SimpleNamespace(monotonic=lambda: now[0]))
    return now


async def test_each_kind_of_warning_is_logged_at_once_then_at_most_every_ten_seconds_with_how_many_were_not(
    pg_url: str, clock: list[float], caplog: pytest.LogCaptureFixture
) -> None:
    """A flood of forgeries, a queue that stays full, a database that stays down: each must not
    flood the log. Each kind of warning is logged the first time, then at most once per LOG_EVERY
    (10 s), saying how many like it were not logged meanwhile; kinds do not hold each other back."""
    caplog.set_level(logging.WARNING, logger="broker.livecheck")
    engine = create_engine(Settings(database_url=pg_url))
    refused = make_url(pg_url).set(port=free_port()).render_as_string(hide_password=False)
    refused_engine = create_engine(Settings(database_url=refused))
    unchecked: list[int] = []
    check = LiveCheck(engine, lambda event: None, lambda: unchecked.append(1), limit=2)
    down = LiveCheck(refused_engine, lambda event: None, lambda: unchecked.append(1))
    license_id = new_license()

    def forged(seq: int) -> LicenseEvent:
        return LicenseEvent(license_id, seq, forged_event(license_id, seq, entitled=True))

    async def checked(*events: LicenseEvent) -> None:
        for event in events:
            check.submit(event)
        await check.check_pending()

    def logged() -> list[str]:
        messages = [r.getMessage() for r in caplog.records if r.name == "broker.livecheck"]
        caplog.clear()
        return messages

    dropped = f"dropped a live message for license {license_id} seq %d: %s (someone else publishes on this Redis?)"
    unknown, mismatch = "no such event in the database", "not the stored event of its seq"
    try:
        genuine = await append(engine, license_id)
        await checked(forged(5))
        assert logged() == [dropped % (5, unknown)]
        clock[0] = 9.9
        await checked(forged(6), forged(7))
        assert logged() == []
        await checked(forged(genuine.seq))  # another kind: logged at once
        assert logged() == [dropped % (genuine.seq, mismatch)]
        clock[0] = 10.0  # LOG_EVERY after the first
        await checked(forged(8))
        assert logged() == [dropped % (8, unknown) + " (and 2 more like it in the last 10 s)"]
        clock[0] = 19.9
        await checked(forged(9))
        assert logged() == []
        for _ in range(3):  # the third finds the queue (limit 2) full
            check.submit(genuine)
        check.submit(genuine)
        assert unchecked == [1, 1]
        assert logged() == ["live messages left to the database sweep: 2 wait for their check"]
        await check.check_pending()
        clock[0] = 20.0
        await checked(forged(10))
        await checked(forged(11))
        assert logged() == [dropped % (10, unknown) + " (and 1 more like it in the last 10 s)"]
        clock[0] = 30.0
        await checked(forged(12))
        assert logged() == [dropped % (12, unknown) + " (and 1 more like it in the last 10 s)"]
        for _ in range(2):
            down.submit(genuine)
            await down.check_pending()
        assert unchecked == [1, 1, 1, 1]
        failed = logged()
        assert len(failed) == 1
        assert (
            failed[0].startswith("live messages left to the database sweep, their check failed: ")
            and "refused" in failed[0]
        )
    finally:
        await check.stop()
        await down.stop()
        await engine.dispose()
        await refused_engine.dispose()


async def test_the_time_a_check_adds_is_counted_from_the_arrival_of_the_oldest_message_of_its_batch(
    pg_url: str, clock: list[float]
) -> None:
    engine = create_engine(Settings(database_url=pg_url))
    check = LiveCheck(engine, lambda event: None, lambda: None)
    license_id = new_license()

    def sample(name: str) -> float:
        return REGISTRY.get_sample_value(f"license_broker_live_check_seconds_{name}") or 0.0

    try:
        events = [await append(engine, license_id) for _ in range(2)]
        count, total = sample("count"), sample("sum")
        clock[0] = 100.0
        check.submit(events[0])
        clock[0] = 100.125
        check.submit(events[1])
        clock[0] = 100.25
        await check.check_pending()
        assert (sample("count") - count, sample("sum") - total) == (1, 0.25)
        clock[0] = 200.0
        check.submit(events[1])
        clock[0] = 200.5
        await check.check_pending()
        assert (sample("count") - count, sample("sum") - total) == (2, 0.75)
    finally:
        await check.stop()
        await engine.dispose()


async def test_a_connection_that_fails_to_close_is_let_go_without_an_error(pg_url: str) -> None:
    """The check's connection is closed when it fails (perhaps dead) and when the check stops; a
    close that raises (its socket already gone) must neither stop the check nor fail the stop."""
    engine = create_engine(Settings(database_url=pg_url))
    check = LiveCheck(engine, lambda event: None, lambda: None)

    class Gone:
        closes = 0

        async def close(self) -> None:
            self.closes += 1
            raise OSError("the connection is already gone")

    gone = Gone()
    check._conn = gone  # type: ignore[assignment]
    try:
        await check.stop()
        assert gone.closes == 1 and check._conn is None
    finally:
        await engine.dispose()
