"""A reconnect storm under `serve`, where the webhook and the streams share one database pool.
The streams' reads queue behind a bound below the pool size (Settings.stream_db_slots), so a
webhook arriving while every stream read is stuck still finds a free connection; and under a
real storm (hundreds of streams catching up at once) webhooks that change licenses commit and
reach the storm's clients after their replays, each event once, in order."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from datetime import UTC, datetime

import httpx

from broker import metrics
from broker.settings import Settings
from broker.storage.db import create_engine
from broker.storage.eventlog import EventLog
from broker.storage.licenses import LicenseStore
from license_broker.embedded import create_app
from tests.support.licenses import make_settings, new_license, post_event, token_for
from tests.support.processes import Process, process_env, serving
from tests.support.services import psycopg_connect
from tests.support.waiting import async_wait_until
from webhook.samples import SampleEvents

STREAMS = 300
POOL = 4
# The real storm: clients of LICENSES licenses, each license REPLAYED events behind, reconnecting
# at once to one `serve` process with a pool of POOL connections (two for the streams' reads).
CLIENTS = 400
LICENSES = 80
REPLAYED = 20
CHANGED = 20  # licenses that a webhook changes during the storm


def lock_waiters(url: str, *, writes: bool = False) -> int:
    """Sessions of the test's database waiting for a lock; with `writes`, those not reading (a
    webhook's statements: the streams' and the sweep's are SELECTs)."""
    database = url.rsplit("/", 1)[1]
    with psycopg_connect(url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND wait_event_type = 'Lock'"
            " AND (NOT %s OR ltrim(query, E' \\n') NOT ILIKE 'select%%')",
            (database, writes),
        ).fetchone()
    return int(row[0]) if row else 0


async def test_a_webhook_commits_at_once_while_a_storm_of_streams_holds_up_its_reads(pg_url: str) -> None:
    settings = make_settings(pg_url, db_pool_size=POOL)
    assert settings.stream_db_slots < POOL
    limits = httpx.Limits(max_connections=STREAMS + 10, max_keepalive_connections=0)
    async with serving(create_app(settings)) as url, httpx.AsyncClient(limits=limits, timeout=30) as http:
        first_states: list[str] = []

        async def connect(license_id: str, connected: asyncio.Event) -> None:
            headers = {"authorization": f"Bearer {token_for(license_id)}"}
            async with http.stream("GET", f"{url}/api/licenses/{license_id}/events", headers=headers) as response:
                lines = response.aiter_lines()
                assert await anext(lines) == "retry: 2000"  # sent before the stream's first read
                connected.set()
                while not (line := await anext(lines)).startswith("id: "):
                    pass
                first_states.append(line)

        # Every read of the event log waits while this lock is held: the slowest storm there is.
        blocker = psycopg_connect(pg_url)
        try:
            with blocker.transaction():
                blocker.execute("LOCK TABLE subscription_event_logs IN ACCESS EXCLUSIVE MODE")
                opened = metrics.OPEN_STREAMS._value.get()
                connected = [asyncio.Event() for _ in range(STREAMS)]
                storm = asyncio.gather(*(connect(new_license(), event) for event in connected))
                await asyncio.wait_for(asyncio.gather(*(event.wait() for event in connected)), 30)
                assert metrics.OPEN_STREAMS._value.get() - opened == STREAMS
                await async_wait_until(
                    lambda: lock_waiters(pg_url) >= settings.stream_db_slots, what="stream reads to be stuck"
                )
                # An event type the broker ignores: recorded (one insert into stripe_events), no
                # event log row, so the lock above does not hold it up; only the pool could. (A
                # license-changing event appends to the locked log: the real storm below posts those.)
                event = {"id": f"evt_{new_license()}", "type": "product.created", "created": int(time.time()),
                         "data": {"object": {"id": "prod_1", "object": "product"}}}  # fmt: skip
                posted = time.monotonic()
                response = await post_event(http, url, event)
                took = time.monotonic() - posted
                # Without the bound, every pooled connection would be stuck behind the lock and
                # the webhook would wait for the pool's timeout (10 s), then answer 503.
                assert (response.status_code, response.json().get("outcome")) == (200, "ignored"), response.text
                assert took < 5
                assert lock_waiters(pg_url) == settings.stream_db_slots  # the bound held
        finally:
            blocker.close()
        await asyncio.wait_for(storm, 30)  # lock released: every stream gets its state
    assert first_states == ["id: 0"] * STREAMS


async def seed(url: str, licenses: list[str], count: int) -> None:
    engine = create_engine(Settings(database_url=url))
    try:
        async with engine.begin() as conn:
            for license_id in licenses:
                row = await LicenseStore.lock(conn, license_id)
                for seq in range(1, count + 1):
                    await EventLog.append(conn, license_id, seq, row.state, stripe_event_id=None,
                                          stripe_event_type="seed", occurred_at=datetime.now(UTC))  # fmt: skip
                row.seq = count
                await LicenseStore.save(conn, row)
    finally:
        await engine.dispose()


async def test_webhooks_that_change_licenses_commit_during_a_storm_and_reach_its_clients_in_order(
    pg_url: str, spawn: Callable[..., Process]
) -> None:
    rng = random.Random(11)
    licenses = [new_license() for _ in range(LICENSES)]
    await seed(pg_url, licenses, REPLAYED)
    server = spawn("serve", process_env(pg_url, DATABASE_POOL_SIZE=str(POOL)))
    slots = Settings(database_url=pg_url, db_pool_size=POOL).stream_db_slots
    changed = licenses[:CHANGED]
    final = {license_id: REPLAYED + (license_id in changed) for license_id in licenses}
    caught_up = 0  # clients that have every replayed event
    got: dict[int, tuple[int, list[int]]] = {}  # client: (its Last-Event-ID, the ids it received)
    connected = [asyncio.Event() for _ in range(CLIENTS)]

    async def reconnect(http: httpx.AsyncClient, n: int, license_id: str) -> None:
        nonlocal caught_up
        resume = rng.randint(0, REPLAYED - 1)
        headers = {"authorization": f"Bearer {token_for(license_id)}", "last-event-id": str(resume)}
        seqs: list[int] = []
        got[n] = (resume, seqs)
        url = f"{server.url}/api/licenses/{license_id}/events"
        async with http.stream("GET", url, headers=headers) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("retry: "):
                    connected[n].set()  # sent before the stream's first read
                elif line.startswith("id: "):
                    seqs.append(int(line[4:]))
                    caught_up += seqs[-1] == REPLAYED
                    if seqs[-1] == final[license_id]:
                        return

    async def change(http: httpx.AsyncClient, license_id: str) -> float:
        sample = SampleEvents(license_id)
        event = sample.subscription_event("customer.subscription.updated", "active", sample.tick())
        response = await post_event(http, server.url, event)
        assert (response.status_code, response.json().get("outcome"), response.json().get("seq")) == (
            200, "applied", REPLAYED + 1,
        ), response.text  # fmt: skip
        return time.monotonic()

    limits = httpx.Limits(max_connections=CLIENTS + CHANGED + 10, max_keepalive_connections=0)
    async with httpx.AsyncClient(limits=limits, timeout=60) as http:
        # The storm is held at its first read, so the webhooks reach the server while every one of
        # its clients is still to be caught up, on a fast machine as on a slow one: the event log
        # is locked until the storm's reads fill their slots and a webhook's append waits behind
        # them, then released, and the replays and the webhooks' commits race for the pool.
        blocker = psycopg_connect(pg_url)
        storm = asyncio.gather(*(reconnect(http, n, licenses[n % LICENSES]) for n in range(CLIENTS)))
        webhooks: asyncio.Future[list[float]] | None = None
        try:
            with blocker.transaction():
                blocker.execute("LOCK TABLE subscription_event_logs IN ACCESS EXCLUSIVE MODE")
                await asyncio.wait_for(asyncio.gather(*(event.wait() for event in connected)), 60)
                await async_wait_until(lambda: lock_waiters(pg_url) >= slots, 30, "the storm's reads to be stuck")
                webhooks = asyncio.gather(*(change(http, license_id) for license_id in changed))
                await async_wait_until(
                    lambda: lock_waiters(pg_url, writes=True) >= 1,
                    30, "a webhook's append to wait behind the lock",
                )  # fmt: skip
                during = caught_up
                released = time.monotonic()
            took = [committed - released for committed in await webhooks]
            await asyncio.wait_for(storm, 120)
        finally:
            blocker.close()
            for pending in (storm, webhooks):
                if pending is not None:
                    pending.cancel()
                    await asyncio.gather(pending, return_exceptions=True)
        elapsed = time.monotonic() - released
    # The webhooks were in the server, waiting, before any of the storm's clients had its replay.
    assert during == 0
    assert max(took) < 5, took  # the pool's timeout is 10 s: a webhook queued behind the storm's reads
    assert len(got) == CLIENTS
    for n, (resume, seqs) in got.items():
        license_id = licenses[n % LICENSES]
        assert seqs == list(range(resume + 1, final[license_id] + 1)), (license_id, resume, seqs)
    print(
        f"\n{CLIENTS} streams caught up in {elapsed:.1f} s after their release; {CHANGED} webhooks "
        f"released with them: max {max(took) * 1000:.0f} ms, median {sorted(took)[len(took) // 2] * 1000:.0f} ms"
    )
