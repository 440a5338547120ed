"""A reconnect storm: a thousand clients come back at once with Last-Event-ID, and a stream
process with a small database pool catches every one of them up."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from datetime import UTC, datetime

import httpx

from broker.settings import Settings
from broker.storage.db import create_engine
from broker.storage.eventlog import EventLog
from broker.storage.licenses import LicenseStore
from tests.support.licenses import new_license, token_for
from tests.support.processes import Process, process_env
from tests.support.services import psycopg_connect

CLIENTS = 1000
LICENSES = 100
EVENTS = 6
POOL = 5


async def seed(url: str, licenses: list[str]) -> None:
    engine = create_engine(Settings(database_url=url))
    try:
        async with engine.begin() as conn:
            for license_id in licenses:
                row = await LicenseStore.lock(conn, license_id)
                for seq in range(1, EVENTS + 1):
                    await EventLog.append(conn, license_id, seq, row.state, stripe_event_id=None,
                                          stripe_event_type="seed", occurred_at=datetime.now(UTC))  # fmt: skip
                row.seq = EVENTS
                await LicenseStore.save(conn, row)
    finally:
        await engine.dispose()


async def test_a_thousand_clients_reconnecting_at_once_are_all_caught_up_within_a_bounded_pool(
    pg_url: str, redis_url: str, spawn: Callable[..., Process]
) -> None:
    rng = random.Random(7)
    licenses = [new_license() for _ in range(LICENSES)]
    await seed(pg_url, licenses)
    stream = spawn("stream", process_env(pg_url, REDIS_URL=redis_url, DATABASE_POOL_SIZE=str(POOL)))
    database = pg_url.rsplit("/", 1)[1]
    peak = 0

    async def watch_connections() -> None:
        nonlocal peak
        while True:
            with psycopg_connect(pg_url) as conn:
                row = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()", (database,)
                ).fetchone()
            peak = max(peak, row[0] if row else 0)
            await asyncio.sleep(0.05)

    async def reconnect(http: httpx.AsyncClient, license_id: str) -> list[int]:
        resume = rng.randint(0, EVENTS - 1)
        headers = {"authorization": f"Bearer {token_for(license_id)}", "last-event-id": str(resume)}
        seqs: list[int] = []
        async with http.stream("GET", f"{stream.url}/api/licenses/{license_id}/events", headers=headers) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("id: "):
                    seqs.append(int(line[4:]))
                    if seqs[-1] == EVENTS:
                        break
        assert seqs == list(range(resume + 1, EVENTS + 1))
        return seqs

    watcher = asyncio.create_task(watch_connections())
    limits = httpx.Limits(max_connections=CLIENTS + 10, max_keepalive_connections=0)
    async with httpx.AsyncClient(limits=limits, timeout=60) as http:
        results = await asyncio.gather(*(reconnect(http, licenses[i % LICENSES]) for i in range(CLIENTS)))
    watcher.cancel()
    assert len(results) == CLIENTS
    assert 0 < peak <= POOL, f"{peak} database connections for a pool of {POOL}"
