"""The measurements: end-to-end latency with lost and duplicated events, webhook ingest
throughput, replay of a backlog, and what one stream process holds per idle connection."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple

import orjson
import redis.asyncio as aioredis
from psycopg.types.json import Json

from bench.clients import EventFactory, Posted, SseClient, WebhookConnection, connect_clients, now_ns
from bench.stack import (
    RedisConnections,
    _admin,
    backend_pids,
    cpu_seconds,
    libpq_url,
    redis_connections,
    rss_kb,
)
from broker.storage.eventlog import encode_event
from broker.storage.licenses import initial_state

Progress = Callable[[str], None]
HOST = "127.0.0.1"


def license_ids(prefix: str, n: int) -> list[str]:
    run = secrets.token_hex(3)
    return [f"lic_{prefix}_{run}_{i}" for i in range(n)]


@contextlib.asynccontextmanager
async def _clients(port: int, ids: list[str], token_secret: str, **kw: Any) -> Any:
    clients: list[SseClient] = []
    try:
        clients = await connect_clients(HOST, port, ids, token_secret=token_secret, **kw)
        yield clients
    finally:
        for client in clients:
            client.close()
        await asyncio.sleep(0)


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


class Endpoint(NamedTuple):
    """A server process under test: where it listens, and its pid for /proc."""

    url: str
    pid: int


# --- latency --------------------------------------------------------------------------------------


BACK_TO_BACK = "back to back"


def posting_name(rate: float | None) -> str:
    """How a row's events were posted: `100/s` (open loop) or back to back (`rate` None)."""
    return BACK_TO_BACK if rate is None else f"{rate:g}/s"


@dataclass
class LatencyResult:
    transport: str
    clients: int
    events: int
    latencies_ms: list[float]
    lost: int
    duplicates: int
    out_of_order: int
    rejected: int
    not_applied: int
    stream_pids: list[int]
    webhook_response_ms: list[float] = field(default_factory=list)
    first_event_response_ms: list[float] = field(default_factory=list)
    webhook_cpu_ms_per_event: float = 0.0
    stream_cpu_ms_per_event: float = 0.0
    # One per stream process, in the order of `stream_pids`; None without Redis.
    redis_connections: list[RedisConnections] | None = None
    # Summed over the stream processes.
    rss_kb_before: int = 0
    rss_kb_after: int = 0
    notes: list[str] = field(default_factory=list)
    # `100/s` or `back to back` (posting_name); the rate the events were posted at, as measured.
    posting: str = "100/s"
    events_per_s: float = 0.0
    # Split at the moment the bench's own Redis subscription got the message (plain Redis only):
    # the webhook's part and the stream's part of each latency.
    post_to_publish_ms: list[float] = field(default_factory=list)
    publish_to_client_ms: list[float] = field(default_factory=list)
    # The load averages (1, 5, 15 min) when the row started: the machine may be shared.
    load_average: tuple[float, float, float] = (0.0, 0.0, 0.0)


async def _post_paced(
    webhook_port: int, work: list[tuple[str, bytes, str]], rate: float, connections: int
) -> list[Posted]:
    """Open loop: event i is sent at start + i/rate on whichever keep-alive connection is free."""
    pool: asyncio.Queue[WebhookConnection] = asyncio.Queue()
    opened = [await WebhookConnection(HOST, webhook_port).open() for _ in range(connections)]
    for conn in opened:
        pool.put_nowait(conn)
    results: list[Posted] = []
    # One license's events in sequence (a customer's events are seconds apart); different
    # licenses' events concurrently, on whichever connection is free.
    in_turn: dict[str, asyncio.Lock] = {}

    async def one(license_id: str, payload: bytes, signature: str) -> None:
        async with in_turn.setdefault(license_id, asyncio.Lock()):
            conn = await pool.get()
            try:
                results.append(await conn.post(license_id, payload, signature))
            finally:
                pool.put_nowait(conn)

    start = time.monotonic()
    tasks = []
    for i, (license_id, payload, signature) in enumerate(work):
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(license_id, payload, signature)))
    await asyncio.gather(*tasks)
    for conn in opened:
        await conn.close()
    return results


async def _post_back_to_back(webhook_port: int, work: list[tuple[str, bytes, str]]) -> list[Posted]:
    """Closed loop on one keep-alive connection: each event is sent as soon as the previous one is
    answered, so one event is in flight at a time and no process of the chain idles between two."""
    conn = await WebhookConnection(HOST, webhook_port).open()
    try:
        return [await conn.post(license_id, payload, signature) for license_id, payload, signature in work]
    finally:
        await conn.close()


async def _post(webhook_port: int, work: list[tuple[str, bytes, str]], rate: float | None) -> list[Posted]:
    if rate is None:
        return await _post_back_to_back(webhook_port, work)
    return await _post_paced(webhook_port, work, rate, connections=8)


async def _flask_sse_clients(port: int, ids: list[str], redis_url: str, concurrency: int = 200) -> list[SseClient]:
    """Flask-SSE's streams, one per license (`?channel=license:<id>`). It sends nothing (not even its
    response head) before the first message, and subscribes only once gunicorn iterates the body:
    each is ready when Redis counts a subscriber on its channel (PUBSUB NUMSUB, polled)."""
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(concurrency)

    async def one(license_id: str) -> SseClient:
        async with gate:
            _, client = await loop.create_connection(
                lambda: SseClient(license_id, None, HOST, port, None, path=f"/stream?channel=license:{license_id}"),
                HOST,
                port,
            )
            return client

    clients = list(await asyncio.gather(*(one(i) for i in ids)))
    channels = [f"license:{i}" for i in ids]
    client = aioredis.Redis.from_url(redis_url)
    try:
        deadline = time.monotonic() + 60
        while True:
            counts = []
            for start in range(0, len(channels), 500):
                counts += await client.pubsub_numsub(*channels[start : start + 500])
            if all(n >= 1 for _, n in counts):
                return clients
            if time.monotonic() > deadline:
                missing = sum(1 for _, n in counts if n < 1)
                raise TimeoutError(f"flask-sse: {missing} of {len(ids)} streams not subscribed after 60 s")
            await asyncio.sleep(0.05)
    finally:
        await client.aclose()


class RedisTap:
    """The bench's own subscription to the row's channels (plain Redis only), on the loop its
    clients read on (redis.asyncio: it never blocks it): when each (license, seq) left Redis, which
    splits a latency into the webhook's part (POST to publish) and the stream's (publish to client)."""

    def __init__(self, pubsub: Any) -> None:
        self.pubsub = pubsub
        self.seen: dict[tuple[str, int], int] = {}
        self._task = asyncio.create_task(self._read(), name="bench-redis-tap")

    @classmethod
    async def open(cls, redis_url: str, ids: list[str]) -> RedisTap:
        pubsub = aioredis.Redis.from_url(redis_url).pubsub(ignore_subscribe_messages=True)
        for start in range(0, len(ids), 500):
            await pubsub.subscribe(*(f"license:{i}" for i in ids[start : start + 500]))
        return cls(pubsub)

    async def _read(self) -> None:
        while True:
            message = await self.pubsub.get_message(timeout=1.0)
            if message is None or message.get("type") != "message":
                continue
            arrived = now_ns()
            with contextlib.suppress(ValueError, KeyError, TypeError):
                body = orjson.loads(message["data"])
                # The project's wire format carries "seq"; Flask-SSE's {"data": ..., "id": n}.
                seq = body["seq"] if "seq" in body else body["id"]
                self.seen[(message["channel"].decode().split(":", 1)[1], int(seq))] = arrived

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        await self.pubsub.aclose()


async def latency(
    *,
    transport: str,
    label: str | None = None,
    webhook: Endpoint,
    streams: Sequence[Endpoint],
    redis_url: str | None,
    token_secret: str,
    webhook_secret: str,
    clients: int,
    events: int,
    rate: float | None = None,
    rates: Sequence[float | None] = (),
    grace: float,
    progress: Progress,
    peer: bool = False,
) -> list[LatencyResult]:
    """`clients` subscribers, one per license (each desktop app follows its own license), dealt
    round-robin over the stream processes; then, for each of `rates` (or `rate`), `events` signed
    webhooks sent round-robin over those licenses: open loop at that many per second, or back to
    back (None). Latency is from just before the POST is written to the moment the subscriber has
    parsed the event's frame. Each result is named `label` (default: transport).

    `peer`: the servers are the Flask-SSE peer (bench.flask_sse_peer): its streams are opened as
    its docs say, and since it has no current state to send, each license's first event is posted
    once every stream is subscribed, and held by its client before the measured ones."""
    rates = list(rates) or [rate]
    ids = license_ids(transport.replace("-", "_"), clients)
    stream_pids = [s.pid for s in streams]
    rss_before = sum(rss_kb(pid) for pid in stream_pids)
    factory = EventFactory(webhook_secret)
    # Each license's first event binds its subscription (the ingest's general path, a Checkout's
    # once per customer); the desktop apps follow licenses that exist. So each license gets one
    # event before its client connects: timed as `first_event_response_ms`, not as latency.
    first = [(license_id, *factory.signed(license_id)) for license_id in ids]
    first_posted = [] if peer else await _post_paced(_port(webhook.url), first, rate=10_000, connections=8)
    results: list[LatencyResult] = []
    async with contextlib.AsyncExitStack() as stack:
        subscribers: list[SseClient] = []
        for i, stream in enumerate(streams):
            mine = ids[i :: len(streams)]
            if peer:
                assert redis_url is not None
                subscribers += await _flask_sse_clients(_port(stream.url), mine, redis_url)
                stack.callback(_close_all, subscribers)
            else:
                subscribers += await stack.enter_async_context(_clients(_port(stream.url), mine, token_secret))
        if peer:
            first_posted = await _post_paced(_port(webhook.url), first, rate=10_000, connections=8)
            await asyncio.wait_for(asyncio.gather(*(c.first_event for c in subscribers)), 60)
        rss_after = sum(rss_kb(pid) for pid in stream_pids)
        tap = None
        if redis_url and redis_url.startswith(("redis://", "rediss://")):
            tap = await RedisTap.open(redis_url, ids)
            stack.push_async_callback(tap.close)
        connections = (
            await asyncio.to_thread(lambda: [redis_connections(redis_url, pid) for pid in stream_pids])
            if redis_url
            else None
        )
        for pace in rates:
            work = [(ids[i % clients], *factory.signed(ids[i % clients])) for i in range(events)]
            progress(f"  {clients} clients connected; posting {events} events {_pace_text(pace)}")
            result = await _phase(webhook, stream_pids, subscribers, work, pace, grace, tap)
            result.transport, result.clients = label or transport, clients
            result.first_event_response_ms = sorted((p.done_ns - p.sent_ns) / 1e6 for p in first_posted)
            result.redis_connections = connections
            result.rss_kb_before, result.rss_kb_after = rss_before, rss_after
            results.append(result)
    return results


def _close_all(clients: list[SseClient]) -> None:
    for client in clients:
        client.close()


def _pace_text(rate: float | None) -> str:
    return "back to back" if rate is None else f"at {rate:g}/s"


async def _phase(
    webhook: Endpoint,
    stream_pids: list[int],
    subscribers: list[SseClient],
    work: list[tuple[str, bytes, str]],
    rate: float | None,
    grace: float,
    tap: RedisTap | None = None,
) -> LatencyResult:
    """Post `work` and wait for the subscribers to hold it: the latencies of that posting."""
    load = os.getloadavg()
    marks = {id(c): len(c.received) for c in subscribers}
    cpu_before = cpu_seconds(webhook.pid), sum(cpu_seconds(pid) for pid in stream_pids)
    started = time.monotonic()
    posted = await _post(_port(webhook.url), work, rate)
    posting_s = time.monotonic() - started
    expected: dict[tuple[str, int], int] = {(p.license_id, p.seq): p.sent_ns for p in posted if p.seq is not None}
    deadline = time.monotonic() + grace

    def delivered() -> int:
        return sum(len(c.received) - marks[id(c)] for c in subscribers)

    # Polled: the count is spread over thousands of protocol callbacks; 50 ms is fine here.
    while delivered() < len(expected) and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)  # late duplicates, if any, would land here
    # Includes the streams' database sweep and heartbeats over the same time: what it costs.
    cpu_webhook = cpu_seconds(webhook.pid) - cpu_before[0]
    cpu_stream = sum(cpu_seconds(pid) for pid in stream_pids) - cpu_before[1]
    latencies: list[float] = []
    to_publish: list[float] = []
    from_publish: list[float] = []
    duplicates = out_of_order = 0
    for client in subscribers:
        mark = marks[id(client)]
        seen = {seq for seq, _ in client.received[:mark]}
        last = max(seen, default=-1)
        for seq, arrived in client.received[mark:]:
            if seq in seen:
                duplicates += 1
                continue
            seen.add(seq)
            if seq < last:
                out_of_order += 1
            last = max(last, seq)
            sent = expected.get((client.license_id, seq))
            if sent is not None:
                latencies.append((arrived - sent) / 1e6)
                published = tap.seen.get((client.license_id, seq)) if tap is not None else None
                if published is not None:
                    to_publish.append((published - sent) / 1e6)
                    from_publish.append((arrived - published) / 1e6)
    received = {(c.license_id, seq) for c in subscribers for seq, _ in c.received}
    lost = sum(1 for key in expected if key not in received)
    return LatencyResult(
        transport="",
        clients=0,
        events=len(expected),
        latencies_ms=latencies,
        lost=lost,
        duplicates=duplicates,
        out_of_order=out_of_order,
        rejected=sum(1 for p in posted if p.status != 200),
        not_applied=sum(1 for p in posted if p.status == 200 and p.seq is None),
        stream_pids=stream_pids,
        webhook_response_ms=sorted((p.done_ns - p.sent_ns) / 1e6 for p in posted),
        webhook_cpu_ms_per_event=round(1000 * cpu_webhook / max(1, len(posted)), 3),
        stream_cpu_ms_per_event=round(1000 * cpu_stream / max(1, len(expected)), 3),
        posting=posting_name(rate),
        events_per_s=round(len(posted) / posting_s, 1) if posting_s else 0.0,
        post_to_publish_ms=sorted(to_publish),
        publish_to_client_ms=sorted(from_publish),
        load_average=(load[0], load[1], load[2]),
    )


# --- webhook ingest -------------------------------------------------------------------------------


async def ingest(
    *,
    webhook_url: str,
    webhook_pid: int,
    database_url: str,
    webhook_secret: str,
    events: int,
    concurrency: int,
    licenses: int,
) -> dict[str, Any]:
    """Closed loop: `concurrency` keep-alive connections post pre-signed events as fast as the
    webhook answers; events/s counts 200s whose rows are then found committed in Postgres.
    CPU per event (webhook process, and the Postgres backends serving it) is the figure that
    holds still when other jobs share the machine."""
    ids = license_ids("ingest", licenses)
    factory = EventFactory(webhook_secret)
    work = iter([(ids[i % licenses], *factory.signed(ids[i % licenses])) for i in range(events)])
    conns = [await WebhookConnection(HOST, _port(webhook_url)).open() for _ in range(concurrency)]
    results: list[Posted] = []

    async def worker(conn: WebhookConnection) -> None:
        for license_id, payload, signature in work:
            results.append(await conn.post(license_id, payload, signature))

    backends = backend_pids(database_url)
    cpu_before = cpu_seconds(webhook_pid), sum(cpu_seconds(pid) for pid in backends)
    start = now_ns()
    await asyncio.gather(*(worker(c) for c in conns))
    elapsed = (now_ns() - start) / 1e9
    # Backends opened during the run started from zero CPU.
    cpu_webhook = cpu_seconds(webhook_pid) - cpu_before[0]
    cpu_postgres = sum(cpu_seconds(pid) for pid in backend_pids(database_url)) - cpu_before[1]
    for conn in conns:
        await conn.close()
    ok = [r for r in results if r.status == 200]
    with _admin(database_url) as db:
        row = db.execute(
            "SELECT count(*) FROM stripe_events WHERE license_id LIKE %s", (ids[0].rsplit("_", 1)[0] + "_%",)
        ).fetchone()
    committed = int(row[0]) if row else 0
    service = sorted((r.done_ns - r.sent_ns) / 1e6 for r in ok)
    return {
        "events": events,
        "concurrency": concurrency,
        "licenses": licenses,
        "ok": len(ok),
        "errors": len(results) - len(ok),
        "committed": committed,
        "seconds": round(elapsed, 3),
        "events_per_s": round(committed / elapsed, 1) if elapsed else 0.0,
        "response_p50_ms": round(service[len(service) // 2], 2) if service else None,
        "response_p99_ms": round(service[int(len(service) * 0.99)], 2) if service else None,
        "webhook_cpu_ms_per_event": round(1000 * cpu_webhook / max(1, len(ok)), 3),
        "postgres_cpu_ms_per_event": round(1000 * cpu_postgres / max(1, len(ok)), 3),
    }


# --- replay ---------------------------------------------------------------------------------------


def _seed_rows(license_id: str, n: int) -> Iterator[tuple[Any, ...]]:
    state = initial_state()
    now = datetime.now(UTC)
    for seq in range(1, n + 1):
        status = ("active", "past_due")[seq % 2]
        state = {**state, "status": status, "entitled": True, "kind": "subscription"}
        event_id, kind = f"evt_seed_{seq}", "customer.subscription.updated"
        data = encode_event(
            license_id, seq, state, stripe_event_id=event_id, stripe_event_type=kind, occurred_at=now, recorded_at=now
        )
        yield (license_id, seq, event_id, kind, status, True, data.decode(), now, now)


def seed_backlog(database_url: str, license_id: str, n: int) -> None:
    """`n` events of one license, written straight into the event log (as n webhooks would have
    left it) so that the replay measurement does not wait for n webhooks."""
    with _admin(database_url) as db, db.transaction():
        db.execute(
            "INSERT INTO licenses (id, seq, status, entitled, state) VALUES (%s, %s, 'active', true, %s)",
            (license_id, n, Json(initial_state())),
        )
        with db.cursor().copy(
            "COPY subscription_event_logs (license_id, seq, stripe_event_id, stripe_event_type, status, entitled,"
            " data, occurred_at, recorded_at) FROM STDIN"
        ) as copy:
            for row in _seed_rows(license_id, n):
                copy.write_row(row)


async def replay(*, stream_url: str, database_url: str, token_secret: str, events: int) -> dict[str, Any]:
    """A client that missed `events` events connects with Last-Event-ID: 0: the time from the start
    of its connect to its parsing the last one."""
    (license_id,) = license_ids("replay", 1)
    await asyncio.to_thread(seed_backlog, database_url, license_id, events)
    done = asyncio.get_running_loop().create_future()

    def on_event(client: SseClient, seq: int, arrived: int) -> None:
        if seq >= events and not done.done():
            done.set_result(arrived)

    start = now_ns()
    loop = asyncio.get_running_loop()
    from broker.signing import tokens

    token = tokens.mint(token_secret, license_id)
    _, client = await loop.create_connection(
        lambda: SseClient(license_id, token, HOST, _port(stream_url), last_event_id=0), HOST, _port(stream_url)
    )
    client.on_event = on_event
    try:
        finished: int = await asyncio.wait_for(done, 60)
    finally:
        client.close()
    seqs = [seq for seq, _ in client.received]
    return {
        "events": events,
        "seconds": round((finished - start) / 1e9, 3),
        "events_per_s": round(events / ((finished - start) / 1e9)),
        "lost": len(set(range(1, events + 1)) - set(seqs)),
        "duplicates": len(seqs) - len(set(seqs)),
        "in_order": seqs == sorted(seqs),
    }


# --- idle connections -----------------------------------------------------------------------------


async def idle_connections(
    *, stream_url: str, stream_pid: int, redis_url: str, token_secret: str, clients: int, progress: Progress
) -> dict[str, Any]:
    """RSS of a stream process before and after `clients` idle subscribers (one license each),
    and how many Redis connections it holds meanwhile."""
    port = _port(stream_url)
    async with _clients(port, license_ids("warm", 20), token_secret):
        await asyncio.sleep(0.3)
    await asyncio.sleep(0.5)
    before = rss_kb(stream_pid)
    before_redis = redis_connections(redis_url, stream_pid).total
    async with _clients(port, license_ids("idle", clients), token_secret):
        await asyncio.sleep(1.0)
        after = rss_kb(stream_pid)
        during_redis = redis_connections(redis_url, stream_pid).total
    progress(f"  {clients} idle connections: RSS {before / 1024:.1f} -> {after / 1024:.1f} MiB")
    return {
        "clients": clients,
        "rss_kb_before": before,
        "rss_kb_after": after,
        "rss_kb_per_connection": round((after - before) / clients, 2),
        "redis_connections_idle": before_redis,
        "redis_connections": during_redis,
    }


# --- ceiling --------------------------------------------------------------------------------------


async def ceiling(*, database_url: str, events: int, concurrency: int) -> dict[str, Any]:
    """What the database allows at all: `events` bare single-row INSERT + COMMIT transactions, from
    this process over `concurrency` psycopg connections (the driver the webhook uses), into a
    scratch table of the same database. Ingest / ceiling is how much of it the webhook's work takes."""
    import psycopg

    libpq = libpq_url(database_url)
    table = f"bench_ceiling_{secrets.token_hex(3)}"
    with _admin(database_url) as db:
        db.execute(f"CREATE TABLE {table} (id bigint PRIMARY KEY, payload text NOT NULL)")
    conns = [await psycopg.AsyncConnection.connect(libpq) for _ in range(concurrency)]
    numbers = iter(range(events))
    payload = "x" * 200

    async def worker(conn: psycopg.AsyncConnection[Any]) -> None:
        for i in numbers:
            await conn.execute(f"INSERT INTO {table} (id, payload) VALUES (%s, %s)", (i, payload))
            await conn.commit()

    try:
        start = now_ns()
        await asyncio.gather(*(worker(c) for c in conns))
        elapsed = (now_ns() - start) / 1e9
    finally:
        for conn in conns:
            await conn.close()
        with _admin(database_url) as db:
            db.execute(f"DROP TABLE {table}")
    return {
        "events": events,
        "concurrency": concurrency,
        "seconds": round(elapsed, 3),
        "commits_per_s": round(events / elapsed, 1) if elapsed else 0.0,
    }
