"""The Python client (license_broker_client.LicenseClient, installed from its wheel) against a
real server: reconnects, resumes, honours `retry:`, keeps the last state, and gives up only on
401/403."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from license_broker_client import LicenseClient, Unauthorized

from license_broker.embedded import create_app
from tests.support.licenses import make_settings, new_license, post_event, token_for
from tests.support.processes import SLOW_SWEEP, Process, process_env, serving
from tests.support.waiting import async_wait_until, free_port
from webhook.samples import SampleEvents


async def send(url: str, license_id: str, action: str) -> int:
    """Posts the action's events; returns the license's seq after them."""
    seqs = [0]
    async with httpx.AsyncClient() as client:
        for event in SampleEvents(license_id).for_action(action):
            response = await post_event(client, url, event)
            assert response.status_code == 200
            seqs.append(response.json().get("seq", 0))
    return max(seqs)


class Collector:
    """Runs a client through its callback API in a task, keeping what it received."""

    def __init__(self, client: LicenseClient) -> None:
        self.client = client
        self.events: list[dict[str, Any]] = []
        self.task = asyncio.create_task(client.run(self.events.append))

    @property
    def seqs(self) -> list[int]:
        return [event["seq"] for event in self.events]

    async def wait_for_seq(self, seq: int, deadline_s: float = 15) -> None:
        await async_wait_until(
            lambda: self.task.done() or (bool(self.events) and self.events[-1]["seq"] >= seq),
            deadline_s,
            f"seq {seq} (have {self.seqs})",
        )
        if self.task.done():
            self.task.result()

    async def stop(self) -> None:
        self.task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await self.task


@pytest.mark.slow
async def test_reconnects_after_the_stream_server_restarts_and_resumes_without_duplicates(
    pg_url: str, redis_url: str, spawn: Callable[..., Process]
) -> None:
    license_id = new_license()
    # Live events come through Redis (the sweep is far slower than the waits); the missed ones from
    # the replay after Last-Event-ID.
    env = process_env(pg_url, REDIS_URL=redis_url, STREAM_RETRY_MS="100", BROKER_POLL_INTERVAL=SLOW_SWEEP)
    webhook = spawn("webhook", env)
    port = free_port()
    stream = spawn("stream", env, port=port)
    client = LicenseClient(stream.url, license_id, token_for(license_id), min_backoff=0.05, max_backoff=0.5)
    collector = Collector(client)
    try:
        await collector.wait_for_seq(0)
        paid = await send(webhook.url, license_id, "pay")  # live
        await collector.wait_for_seq(paid)

        stream.stop()
        canceled = await send(webhook.url, license_id, "fail")  # while no stream process is up
        assert canceled > paid
        stream = spawn("stream", env, port=port)
        await collector.wait_for_seq(canceled)  # replayed from the database after Last-Event-ID
        refunded = await send(webhook.url, license_id, "recover")  # live on the new process
        await collector.wait_for_seq(refunded)
    finally:
        await collector.stop()
    assert collector.seqs == list(range(refunded + 1))  # each once, in order
    assert collector.client.connections == 2
    assert collector.client.last_event_id == refunded
    assert collector.client.state is not None
    assert (collector.client.state["status"], collector.client.state["entitled"]) == ("active", True)


async def _reconnect_gap(pg_url: str, retry_ms: int) -> float:
    """Seconds from the end of one connection to the start of the next."""
    license_id = new_license()
    # The server ends each connection after ~0.2 s; the client then waits as `retry:` says.
    settings = make_settings(pg_url, retry_ms=retry_ms, max_connection_lifetime=0.2)
    async with serving(create_app(settings)) as url:
        client = LicenseClient(url, license_id, token_for(license_id), min_backoff=0.01, max_backoff=10)
        opened: list[float] = []
        original = client.connect_once

        async def timed() -> Any:
            opened.append(time.monotonic())
            async for event in original():
                yield event

        client.connect_once = timed  # type: ignore[method-assign]
        task = asyncio.create_task(client.run(lambda event: None))
        try:
            await async_wait_until(lambda: len(opened) >= 2 or task.done(), 15, "a second connection")
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
    return opened[1] - opened[0] - 0.2


async def test_the_client_waits_as_long_as_the_servers_retry_hint_says(pg_url: str) -> None:
    # Equal jitter: between half the hint and all of it (plus scheduling slack).
    assert 0.5 <= await _reconnect_gap(pg_url, retry_ms=1200) < 2.0
    assert await _reconnect_gap(pg_url, retry_ms=20) < 0.5


def test_the_backoff_doubles_with_each_failure_up_to_the_cap_with_jitter() -> None:
    client = LicenseClient("http://x", "lic", "t", min_backoff=0.5, max_backoff=4)
    for failures, ceiling in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (9, 4.0)]:
        delays = [client.reconnect_delay(failures) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert max(delays) - min(delays) > ceiling / 10  # jittered, not constant
    client._retry = 2.0  # as after a `retry: 2000` line
    assert 1.0 <= client.reconnect_delay(1) <= 2.0


async def test_the_callback_api_accepts_plain_and_async_callbacks_and_keeps_the_state(pg_url: str) -> None:
    license_id = new_license()
    async with serving(create_app(make_settings(pg_url))) as url:
        plain: list[int] = []
        awaited: list[int] = []

        async def on_event(event: dict[str, Any]) -> None:
            await asyncio.sleep(0)
            awaited.append(event["seq"])

        first = LicenseClient(url, license_id, token_for(license_id))
        second = LicenseClient(url, license_id, lambda: token_for(license_id))  # a token factory
        tasks = [
            asyncio.create_task(first.run(lambda event: plain.append(event["seq"]))),
            asyncio.create_task(second.run(on_event)),
        ]
        try:
            await async_wait_until(lambda: plain == [0] and awaited == [0], 10, "the first state")
            paid = await send(url, license_id, "pay")
            await async_wait_until(lambda: plain[-1] == paid and awaited[-1] == paid, 10, "the payment on both")
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    assert plain == awaited == list(range(paid + 1))
    assert first.state is not None and first.state["status"] == "active" and first.state["entitled"] is True
    assert first.last_event_id == second.last_event_id == paid


@pytest.mark.parametrize("which", ["invalid token (401)", "another license's token (403)"])
async def test_unauthorized_is_raised_at_once_instead_of_retrying(pg_url: str, which: str) -> None:
    license_id = new_license()
    token = "not-a-token" if which.endswith("(401)") else token_for(new_license())
    async with serving(create_app(make_settings(pg_url))) as url:
        client = LicenseClient(url, license_id, token, min_backoff=10)  # a retry would time out
        with pytest.raises(Unauthorized, match="401" if which.endswith("(401)") else "403"):
            await asyncio.wait_for(client.run(lambda event: None), 5)
    assert client.connections == 0
    assert client.status == "unauthorized"


async def test_an_async_token_function_is_awaited_on_every_connection(pg_url: str) -> None:
    license_id = new_license()
    asked: list[float] = []

    async def get_token() -> str:  # e.g. an httpx call to the seller's web app
        await asyncio.sleep(0)
        asked.append(time.monotonic())
        return token_for(license_id)

    # The server ends each connection after 0.3 s: every reconnect asks for a token again.
    async with serving(create_app(make_settings(pg_url, max_connection_lifetime=0.3, retry_ms=50))) as url:
        client = LicenseClient(url, license_id, get_token, min_backoff=0.01)
        collector = Collector(client)
        try:
            await async_wait_until(lambda: client.connections >= 3 or collector.task.done(), 15, "3 connections")
            if collector.task.done():
                collector.task.result()
        finally:
            await collector.stop()
    assert len(asked) >= 3 and collector.seqs[0] == 0


async def test_status_callbacks_follow_the_connection(pg_url: str) -> None:
    license_id = new_license()
    statuses: list[str] = []
    async with serving(create_app(make_settings(pg_url, max_connection_lifetime=0.3, retry_ms=50))) as url:
        client = LicenseClient(url, license_id, token_for(license_id), min_backoff=0.01, on_status=statuses.append)
        assert client.status == "stopped"
        collector = Collector(client)
        try:
            await async_wait_until(lambda: client.connections >= 2, 15, "a reconnect")
            assert client.status in ("live", "reconnecting")
        finally:
            await collector.stop()
    assert statuses[:4] == ["connecting", "live", "reconnecting", "live"]
    assert statuses[-1] == client.status == "stopped"
