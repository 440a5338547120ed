"""The core promise: a webhook received by one process reaches a client held by another. With
Redis, the stream process's database sweep runs every SLOW_SWEEP seconds, far beyond the tests'
waits: what arrives came through Redis."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from license_broker_client import LicenseClient

from tests.support.licenses import new_license, post_event, token_for
from tests.support.processes import SLOW_SWEEP, Process, process_env
from webhook.samples import SampleEvents


@pytest.fixture(params=["redis", "poll"])
def stack(request: pytest.FixtureRequest, pg_url: str, spawn: Callable[..., Process]) -> tuple[Process, Process]:
    extra = {"BROKER_TRANSPORT": request.param}
    if request.param == "redis":
        extra |= {"REDIS_URL": request.getfixturevalue("redis_url"), "BROKER_POLL_INTERVAL": SLOW_SWEEP}
    env = process_env(pg_url, **extra)
    return spawn("webhook", env), spawn("stream", env)


async def test_an_event_posted_to_the_webhook_process_reaches_a_client_of_the_stream_process(
    stack: tuple[Process, Process],
) -> None:
    webhook, stream = stack
    license_id = new_license()
    sample = SampleEvents(license_id)
    client = LicenseClient(stream.url, license_id, token_for(license_id)).connect_once()
    latencies: list[float] = []
    statuses = ["active", "past_due", "active", "canceled"] * 5
    try:
        first = await asyncio.wait_for(anext(client), 10)
        assert first["seq"] == 0
        async with httpx.AsyncClient() as http:
            for seq, status in enumerate(statuses, start=1):
                event = sample.subscription_event("customer.subscription.updated", status, sample.tick())
                sent = time.perf_counter()
                response = await post_event(http, webhook.url, event)
                assert response.json()["seq"] == seq
                received = await asyncio.wait_for(anext(client), 10)
                latencies.append((time.perf_counter() - sent) * 1000)
                assert (received["seq"], received["status"], received["stripe_event_id"]) == (seq, status, event["id"])
    finally:
        await client.aclose()  # type: ignore[attr-defined]
    # Reported, not asserted: speed is measured by `make bench`.
    print(
        f"\ncross-process POST -> SSE latency: p50 {statistics.median(latencies):.1f} ms, max {max(latencies):.1f} ms"
    )


async def test_a_client_that_moves_to_another_stream_process_resumes_without_gaps_or_doubles(
    pg_url: str, redis_url: str, spawn: Callable[..., Process]
) -> None:
    env = process_env(pg_url, REDIS_URL=redis_url, BROKER_POLL_INTERVAL=SLOW_SWEEP)
    webhook, first_stream, second_stream = spawn("webhook", env), spawn("stream", env), spawn("stream", env)
    license_id = new_license()
    sample = SampleEvents(license_id)
    seen: list[dict[str, Any]] = []

    async def post(status: str) -> None:
        async with httpx.AsyncClient() as http:
            event = sample.subscription_event("customer.subscription.updated", status, sample.tick())
            assert (await post_event(http, webhook.url, event)).status_code == 200

    client = LicenseClient(first_stream.url, license_id, token_for(license_id))
    stream = client.connect_once()
    seen.append(await asyncio.wait_for(anext(stream), 10))
    await post("active")
    seen.append(await asyncio.wait_for(anext(stream), 10))
    await stream.aclose()  # type: ignore[attr-defined]
    first_stream.stop()
    for status in ("past_due", "active", "canceled"):  # missed while away
        await post(status)
    client.url = client.url.replace(first_stream.url, second_stream.url)
    stream = client.connect_once()
    seen.extend([await asyncio.wait_for(anext(stream), 10) for _ in range(3)])
    await post("active")
    seen.append(await asyncio.wait_for(anext(stream), 10))
    await stream.aclose()  # type: ignore[attr-defined]
    assert [(e["seq"], e["status"]) for e in seen] == [
        (0, "none"), (1, "active"), (2, "past_due"), (3, "active"), (4, "canceled"), (5, "active"),
    ]  # fmt: skip
