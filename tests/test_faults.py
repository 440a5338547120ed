"""Delivery under faults, with real processes, real Postgres and private redis-servers: exactly
once, in order, per license, for every client."""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import time
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial

import httpx
import pytest
from license_broker_client import LicenseClient

from broker import metrics
from broker.runtime import Runtime
from broker.settings import Settings
from broker.storage.db import create_engine
from broker.storage.eventlog import EventLog, LicenseEvent
from broker.storage.licenses import LicenseStore
from broker.transports.memory import MemoryTransport
from broker.transports.poll import PollTransport
from broker.transports.sweep import DatabaseSweep
from broker.transports.swept import SweptTransport
from license_broker.embedded import create_app
from stream.catchup import license_stream
from stream.hub import SubscriptionHub
from tests.support.faults import RedisServer, TcpProxy
from tests.support.licenses import append, make_settings, new_license, post_event, token_for
from tests.support.metrics import metric
from tests.support.processes import SLOW_SWEEP, Process, process_env, serving
from tests.support.transports import RecordingTransport
from tests.support.waiting import async_wait_until
from webhook.samples import SampleEvents


def update(license_id: str, status: str) -> dict[str, object]:
    sample = SampleEvents(license_id)
    return sample.subscription_event("customer.subscription.updated", status, sample.tick())


async def next_event(stream, within: float = 10) -> dict[str, object]:  # type: ignore[no-untyped-def]
    event: dict[str, object] = await asyncio.wait_for(anext(stream), within)
    return event


async def test_a_webhook_killed_between_commit_and_publish_still_reaches_the_client(
    pg_url: str, redis_url: str, spawn: Callable[..., Process]
) -> None:
    env = process_env(pg_url, REDIS_URL=redis_url)
    doomed = spawn("", env, module="tests.support.crashing_webhook")
    stream_process = spawn("stream", env)
    license_id = new_license()
    stream = LicenseClient(stream_process.url, license_id, token_for(license_id)).connect_once()
    try:
        assert (await next_event(stream))["seq"] == 0
        event = update(license_id, "active")
        async with httpx.AsyncClient() as http:
            with pytest.raises(httpx.TransportError):
                await post_event(http, doomed.url, event)  # committed, then the process died
            assert doomed.proc.wait(10) == 86
            got = await next_event(stream)  # found by the stream's database sweep
            assert (got["seq"], got["stripe_event_id"]) == (1, event["id"])
            # Stripe retries the delivery it never got an answer for: a duplicate, nothing new.
            healthy = spawn("webhook", env)
            assert (await post_event(http, healthy.url, event)).json()["outcome"] == "duplicate"
            await post_event(http, healthy.url, update(license_id, "past_due"))
            assert (await next_event(stream))["seq"] == 2
    finally:
        await stream.aclose()  # type: ignore[attr-defined]


async def test_redis_stopped_and_started_during_traffic_loses_and_doubles_nothing(
    pg_url: str, redis_server: RedisServer, spawn: Callable[..., Process]
) -> None:
    """The stream's sweep runs every SLOW_SWEEP seconds: the events of the outage arrive only
    because the subscriber's reconnect wakes it, and those after it only because the subscriber
    subscribed every channel again (instant again, without the sweep's help)."""
    env = process_env(pg_url, REDIS_URL=redis_server.url, BROKER_POLL_INTERVAL=SLOW_SWEEP)
    webhook, stream_process = spawn("webhook", env), spawn("stream", env)
    licenses = [new_license() for _ in range(3)]
    received: dict[str, list[int]] = {license_id: [] for license_id in licenses}

    async def follow(license_id: str) -> None:
        async for event in LicenseClient(stream_process.url, license_id, token_for(license_id)).connect_once():
            received[license_id].append(int(event["seq"]))  # type: ignore[call-overload]

    def have(seq: int) -> bool:
        return all(seqs and seqs[-1] >= seq for seqs in received.values())

    statuses = ["active", "past_due"]

    async def post_round(http: httpx.AsyncClient, round_: int) -> None:
        for license_id in licenses:
            response = await post_event(http, webhook.url, update(license_id, statuses[round_ % 2]))
            assert response.status_code == 200  # a failed publish is never Stripe's problem

    followers = [asyncio.create_task(follow(license_id)) for license_id in licenses]
    latencies: list[float] = []
    try:
        async with httpx.AsyncClient() as http:
            await async_wait_until(lambda: have(0), what="every client's first event")
            for round_ in range(4):  # live, through Redis
                await post_round(http, round_)
                await async_wait_until(partial(have, round_ + 1), what=f"round {round_} live")
            redis_server.stop()
            assert (await http.get(f"{stream_process.url}/readyz")).json()["status"] == "degraded"
            for round_ in range(4, 8):  # committed, their publishes lost
                await post_round(http, round_)
            assert not any(seqs[-1] > 4 for seqs in received.values()), received  # nothing can carry them
            redis_server.start()
            # Found by the sweep that the subscriber's reconnect wakes; its interval is far away.
            await async_wait_until(lambda: have(8), 15, f"the outage's events after the reconnect ({received})")
            # The webhook fails fast for a moment after a failed publish (publish_backoff): a
            # license nobody follows shows when its publishes go out again.
            probe = new_license()

            async def publishes_again() -> bool:
                failures = await metric(http, webhook.url, "license_broker_publish_failures_total")
                await post_event(http, webhook.url, update(probe, "active"))
                return await metric(http, webhook.url, "license_broker_publish_failures_total") == failures

            deadline = time.monotonic() + 10
            while not await publishes_again():
                assert time.monotonic() < deadline, "the webhook never published again"
            for round_ in range(8, 12):  # instant again: through the resubscribed channels
                sent = time.monotonic()
                await post_round(http, round_)
                await async_wait_until(partial(have, round_ + 1), 5, f"round {round_} after the outage")
                latencies.append(time.monotonic() - sent)
            swept = await metric(http, stream_process.url, "license_broker_swept_events_total")
    finally:
        for task in followers:
            task.cancel()
        await asyncio.gather(*followers, return_exceptions=True)
    for seqs in received.values():
        assert seqs == list(range(0, 13))
    assert swept == 4 * len(licenses)  # the outage's, and only those: the rest came live
    print(f"\nafter Redis came back: a round of {len(licenses)} events live in at most {max(latencies) * 1000:.0f} ms")


async def test_transactions_that_commit_out_of_id_order_are_all_delivered(pg_url: str) -> None:
    """A poller that followed a global id would skip the first transaction (lower id, later commit)."""
    engine = create_engine(Settings(database_url=pg_url))
    transport = PollTransport(DatabaseSweep(EventLog(engine), interval=0.05))
    got: asyncio.Queue[LicenseEvent] = asyncio.Queue()
    await transport.start(got.put_nowait)
    slow, fast = new_license(), new_license()
    await transport.listen(slow)
    await transport.listen(fast)
    try:
        async with engine.begin() as conn:
            row = await LicenseStore.lock(conn, slow)
            row.seq += 1
            await LicenseStore.save(conn, row)
            await EventLog.append(
                conn, slow, 1, row.state, stripe_event_id=None, stripe_event_type="t", occurred_at=datetime.now(UTC)
            )
            await append(engine, fast, "active")  # takes a higher id, commits first
            assert (await asyncio.wait_for(got.get(), 5)).license_id == fast
        assert (await asyncio.wait_for(got.get(), 5)).license_id == slow  # committed last, still found
    finally:
        await transport.close()
        await engine.dispose()


async def hub_and_stream(pg_url: str, **changes: object):  # type: ignore[no-untyped-def]
    engine = create_engine(Settings(database_url=pg_url))
    transport = RecordingTransport()
    events = EventLog(engine)
    settings = make_settings(pg_url, **changes)
    hub = SubscriptionHub(transport, buffer=settings.client_buffer)
    await hub.start()
    return engine, transport, events, settings, hub


def seq_of(chunk: bytes) -> int:
    return int(chunk.split(b"\n", 1)[0].removeprefix(b"id: "))


async def test_a_live_message_that_skips_ahead_makes_the_stream_fetch_the_gap_first(pg_url: str) -> None:
    engine, transport, events, settings, hub = await hub_and_stream(pg_url, heartbeat_interval=30)
    license_id = new_license()
    stream = license_stream(events, hub, settings, license_id, None)
    try:
        await anext(stream)  # retry
        assert seq_of(await anext(stream)) == 0
        first, second = await append(engine, license_id), await append(engine, license_id, "past_due")
        await transport.publish(license_id, second.data)  # seq 2 overtakes seq 1 (two publishers)
        # Within 5 s each: a gap fill that sends nothing would otherwise wait for the 30 s heartbeat.
        assert [seq_of(await asyncio.wait_for(anext(stream), 5)) for _ in range(2)] == [1, 2]
        await transport.publish(license_id, first.data)  # late: already sent, skipped
        third = await append(engine, license_id, "canceled")
        await transport.publish(license_id, third.data)
        assert seq_of(await asyncio.wait_for(anext(stream), 5)) == 3
    finally:
        await stream.aclose()
        await hub.close()
        await engine.dispose()


async def test_a_client_that_leaves_in_the_middle_of_a_replay_releases_everything(pg_url: str) -> None:
    engine, transport, events, settings, hub = await hub_and_stream(pg_url, replay_batch=10)
    license_id = new_license()
    for _ in range(50):
        await append(engine, license_id)
    stream = license_stream(events, hub, settings, license_id, 0)
    await anext(stream)
    assert [seq_of(await anext(stream)) for _ in range(15)] == list(range(1, 16))
    assert transport.listened == {license_id}
    await stream.aclose()
    assert transport.listened == set()
    assert license_id not in hub._topics  # nor does the hub keep the license's entry
    assert engine.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    await hub.close()
    await engine.dispose()


async def test_the_queue_of_a_stream_whose_reader_takes_nothing_stays_bounded_and_ends_the_stream(pg_url: str) -> None:
    engine, transport, events, settings, hub = await hub_and_stream(pg_url, client_buffer=4, heartbeat_interval=30)
    license_id = new_license()
    stream = license_stream(events, hub, settings, license_id, None)
    try:
        await anext(stream)
        assert seq_of(await anext(stream)) == 0
        [sub] = hub._topics[license_id].subs
        assert sub.overflowed is False
        for _ in range(10):  # the client reads nothing meanwhile
            event = await append(engine, license_id)
            await transport.publish(license_id, event.data)
            assert sub.pending <= 4
        assert sub.overflowed
        # The stream ends instead of growing; the client reconnects with Last-Event-ID.
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(anext(stream), 5)
    finally:
        await stream.aclose()
        await hub.close()
        await engine.dispose()


async def append_batch(engine, license_id: str, count: int) -> list[LicenseEvent]:  # type: ignore[no-untyped-def]
    """`count` events of one license in one transaction, each with a state of ~4 KB (a license
    with a few hundred features), so that a few hundred fill a socket's buffers."""
    features = [f"feature-{n:04d}" for n in range(300)]
    appended = []
    async with engine.begin() as conn:
        row = await LicenseStore.lock(conn, license_id)
        for _ in range(count):
            row.seq += 1
            status = ("active", "past_due")[row.seq % 2]
            row.state = {**row.state, "status": status, "entitled": status == "active", "features": features}
            appended.append(
                await EventLog.append(
                    conn, license_id, row.seq, row.state,
                    stripe_event_id=None, stripe_event_type="test", occurred_at=datetime.now(UTC),
                )
            )  # fmt: skip
        await LicenseStore.save(conn, row)
    return appended


async def test_a_client_whose_socket_stops_reading_is_dropped_and_catches_up_when_it_reconnects(
    pg_url: str,
) -> None:
    """Two clients of one license on real sockets; one reads its first event and then nothing.
    Events come as fast as the reading client takes them. Once the silent client's socket buffers
    are full the server's send blocks, its bounded queue overflows and the server gives it up
    (the send timeout is far beyond the test: the full queue, not the timer, drops it), while the
    reading client gets every event. When the silent client reads again it finds what was in
    flight and then the end of the response; it resumes from the last id it read and gets every
    later event once, in order."""
    runtimes: list[Runtime] = []
    settings = make_settings(pg_url, client_buffer=4, send_timeout=600, heartbeat_interval=30)
    license_id = new_license()
    loop = asyncio.get_running_loop()
    async with serving(create_app(settings, on_ready=runtimes.append)) as url:
        [runtime] = runtimes
        reader = LicenseClient(url, license_id, token_for(license_id)).connect_once()
        assert (await next_event(reader))["seq"] == 0
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window, filled sooner
        sock.setblocking(False)
        try:
            host, port = url.removeprefix("http://").split(":")
            await loop.sock_connect(sock, (host, int(port)))
            request = f"GET /api/licenses/{license_id}/events HTTP/1.1\r\nHost: {host}\r\n"
            request += f"Authorization: Bearer {token_for(license_id)}\r\n\r\n"
            await loop.sock_sendall(sock, request.encode())
            received = b""
            while b"id: 0\n" not in received:
                received += await asyncio.wait_for(loop.sock_recv(sock, 65536), 10)
            # From here on this client reads nothing.
            before = metrics.SLOW_CLIENTS._value.get()
            published = 0
            while metrics.SLOW_CLIENTS._value.get() == before:
                # ~4 KB each: 3,000 are 12 MB, three times what the kernel buffers a socket here.
                assert published < 3000, f"still followed after {published} events"
                for event in await append_batch(runtime.engine, license_id, 50):
                    await runtime.transport.publish(license_id, event.data)
                    published += 1
                    assert (await next_event(reader))["seq"] == published  # the reading client keeps up
            dropped_at = published
            assert metrics.SLOW_CLIENTS._value.get() == before + 1
            # Given up: what was in flight, then the end of the response (chunked: a last chunk).
            while not received.endswith(b"\r\n0\r\n\r\n"):
                chunk = await asyncio.wait_for(loop.sock_recv(sock, 65536), 10)
                assert chunk, "closed before the end of the response"
                received += chunk
        finally:
            sock.close()
            await reader.aclose()  # type: ignore[attr-defined]
        seen = [int(n) for n in re.findall(rb"^id: (\d+)$", received, re.MULTILINE)]
        assert seen == list(range(seen[-1] + 1))  # what did arrive: each once, in order
        assert seen[-1] < published
        resumed = LicenseClient(url, license_id, token_for(license_id), last_event_id=seen[-1]).connect_once()
        try:
            rest = [int((await next_event(resumed))["seq"]) for _ in range(published - seen[-1])]  # type: ignore[call-overload]
        finally:
            await resumed.aclose()  # type: ignore[attr-defined]
        assert rest == list(range(seen[-1] + 1, published + 1))
    print(f"\ndropped after {dropped_at} events (~4 KB each), {seen[-1]} of them received ({len(received)} bytes)")


async def test_sigterm_ends_the_streams_and_the_process_exits_promptly(
    pg_url: str, redis_url: str, spawn: Callable[..., Process]
) -> None:
    stream_process = spawn("stream", process_env(pg_url, REDIS_URL=redis_url))
    clients = [LicenseClient(stream_process.url, lid, token_for(lid)) for lid in (new_license(), new_license())]
    streams = [client.connect_once() for client in clients]
    for stream in streams:
        assert (await next_event(stream))["seq"] == 0
    started = time.monotonic()
    stream_process.proc.send_signal(signal.SIGTERM)
    for stream in streams:
        with pytest.raises(StopAsyncIteration):  # ended cleanly: the client reconnects elsewhere
            await next_event(stream, within=5)
    # uvicorn shuts down gracefully, then re-raises the signal it caught, as a signalled process should.
    assert await asyncio.to_thread(stream_process.proc.wait, 10) in (0, -signal.SIGTERM)
    assert time.monotonic() - started < 5


async def test_a_stream_ends_after_its_maximum_lifetime_so_that_clients_rebalance(pg_url: str) -> None:
    engine, _, events, settings, hub = await hub_and_stream(pg_url, max_connection_lifetime=0.3, heartbeat_interval=30)
    stream = license_stream(events, hub, settings, new_license(), None)
    started = time.monotonic()
    try:
        chunks = [chunk async for chunk in stream]
    finally:
        await hub.close()
        await engine.dispose()
    assert len(chunks) == 2  # retry hint and the current state, then the end
    assert 0.25 <= time.monotonic() - started < 5


async def test_a_postgres_outage_answers_503_keeps_the_streams_and_recovers(
    pg_url: str, redis_url: str, spawn: Callable[..., Process]
) -> None:
    from sqlalchemy.engine import make_url

    real = make_url(pg_url)
    proxy = TcpProxy(real.port or 5432, real.host or "127.0.0.1")
    try:
        via_proxy = real.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
        # The event after the outage comes through Redis: the sweep is far slower than the waits.
        env = process_env(
            via_proxy, REDIS_URL=redis_url, STREAM_HEARTBEAT_INTERVAL="0.2", BROKER_POLL_INTERVAL=SLOW_SWEEP
        )
        webhook, stream_process = spawn("webhook", env), spawn("stream", env)
        license_id = new_license()
        url = f"{stream_process.url}/api/licenses/{license_id}/events"
        headers = {"authorization": f"Bearer {token_for(license_id)}"}
        async with httpx.AsyncClient(timeout=10) as http, http.stream("GET", url, headers=headers) as response:
            lines = response.aiter_lines()
            while await anext(lines) != "id: 0":
                pass
            proxy.cut()
            assert (await post_event(http, webhook.url, update(license_id, "active"))).status_code == 503
            # The state route too: 503, and when to ask again (the client packages wait that long).
            state = await http.get(f"{stream_process.url}/api/licenses/{license_id}", headers=headers)
            assert (state.status_code, state.headers.get("retry-after")) == (503, "2"), state.text
            pings = 0
            while pings < 3:  # the connection lives on, heartbeats and all
                pings += await anext(lines) == ": ping"
            proxy.restore()
            deadline = time.monotonic() + 15
            while (response_ := await post_event(http, webhook.url, update(license_id, "active"))).status_code != 200:
                assert time.monotonic() < deadline, response_.text
            while (line := await anext(lines)) != "id: 1":
                assert not line.startswith("id:"), line
    finally:
        proxy.close()


class LosingTransport(MemoryTransport):
    """Loses every message, as Redis does during an outage: only the sweep can deliver."""

    reliable = False

    async def publish(self, license_id: str, payload: bytes) -> None:
        pass


async def test_every_lost_message_arrives_through_the_sweep_even_beside_a_client_with_a_bogus_resume_point(
    pg_url: str,
) -> None:
    engine = create_engine(Settings(database_url=pg_url))
    events = EventLog(engine)
    settings = make_settings(pg_url, heartbeat_interval=30)
    transport = SweptTransport(LosingTransport(), DatabaseSweep(events, interval=0.05))
    hub = SubscriptionHub(transport, buffer=16)
    await hub.start()
    license_id = new_license()
    liar = license_stream(events, hub, settings, license_id, 9999)  # claims events that don't exist
    honest = license_stream(events, hub, settings, license_id, None)
    waiting = None
    try:
        await anext(liar)
        assert seq_of(await anext(liar)) == 0  # brought back to the license's current state
        waiting = asyncio.create_task(anext(liar))  # then waits for live events
        await async_wait_until(lambda: license_id in transport.sweep.known, what="the sweep to follow")
        topic = hub._topics[license_id]
        await async_wait_until(lambda: any(sub.waiting for sub in topic.subs), what="the liar to wait live")
        await anext(honest)
        assert seq_of(await anext(honest)) == 0
        for _ in range(3):
            await transport_publish_lost(engine, hub, license_id)
        assert [seq_of(await asyncio.wait_for(anext(honest), 5)) for _ in range(3)] == [1, 2, 3]
        assert seq_of(await asyncio.wait_for(waiting, 5)) == 1
        assert [seq_of(await asyncio.wait_for(anext(liar), 5)) for _ in range(2)] == [2, 3]
    finally:
        if waiting is not None:
            waiting.cancel()
            await asyncio.gather(waiting, return_exceptions=True)
        await liar.aclose()
        await honest.aclose()
        await hub.close()
        await engine.dispose()


async def transport_publish_lost(engine, hub: SubscriptionHub, license_id: str) -> None:  # type: ignore[no-untyped-def]
    event = await append(engine, license_id)
    await hub.transport.publish(license_id, event.data)  # lost
