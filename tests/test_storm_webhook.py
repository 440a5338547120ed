"""A reconnect storm under `serve`, where the webhook and the streams share one database pool.
The streams' reads queue behind a bound below the pool size (Settings.stream_db_slots), so a
webhook arriving while every stream read is stuck still finds a free connection."""

from __future__ import annotations

import asyncio
import time

import httpx

from broker import metrics
from license_broker.embedded import create_app
from tests.support.licenses import make_settings, new_license, post_event, token_for
from tests.support.processes import serving
from tests.support.services import psycopg_connect
from tests.support.waiting import async_wait_until

STREAMS = 40
POOL = 4


def lock_waiters(url: str) -> int:
    database = url.rsplit("/", 1)[1]
    with psycopg_connect(url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND wait_event_type = 'Lock'", (database,)
        ).fetchone()
    return int(row[0]) if row else 0


async def test_a_webhook_commits_at_once_while_a_storm_of_streams_holds_up_its_reads(pg_url: str) -> None:
    settings = make_settings(pg_url, db_pool_size=POOL)
    assert settings.stream_db_slots < POOL
    async with serving(create_app(settings)) as url, httpx.AsyncClient(timeout=30) as http:
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
                # event log row, so the lock above does not hold it up; only the pool could.
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
