"""Every route that reads a body bounds it: over the limit is a 413 as soon as Content-Length
or the bytes received say so, on a real socket, while the client is still sending. Every port
bounds the request head before any app sees it: in bytes (431) and in time (408, or closed)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import orjson
import pytest
from prometheus_client import REGISTRY
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, StreamingResponse
from starlette.routing import Route

from broker.web import body as body_module
from broker.web.server import HEAD_TIMEOUT, MAX_HEAD_BYTES, BoundedHeadProtocol
from license_broker import dev
from license_broker.embedded import create_app as create_embedded_app
from tests.support.licenses import make_settings, new_license, signed
from tests.support.processes import Process, process_env, serving
from tests.support.services import count_rows
from tests.support.waiting import free_port
from webhook.app import create_app as create_webhook_app
from webhook.samples import SampleEvents

LIMIT = 4096
# Far more than any limit: a client that really sent it all would take minutes.
ENDLESS = 1 << 40


def rejected() -> float:
    value = REGISTRY.get_sample_value("license_broker_webhooks_total", {"outcome": "rejected"})
    return value or 0.0


@contextlib.asynccontextmanager
async def connection(url: str) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def request_head(path: str, length: int | None, host: str = "127.0.0.1", **headers: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}", "Content-Type: application/json"]
    lines.append(f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked")
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def status_of(reader: asyncio.StreamReader) -> int:
    line = await asyncio.wait_for(reader.readline(), 10)
    return int(line.split()[1])


async def refuses_the_rest(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    """After its 413 the server closes the connection: writing on fails long before 64 MiB more
    went through (a server that kept reading and discarding would take them all)."""
    rest = await asyncio.wait_for(reader.read(), 10)
    chunk = b"%x\r\n%s\r\n" % (65536, b"y" * 65536)
    with pytest.raises(ConnectionError):
        for _ in range(1024):
            writer.write(chunk)
            await asyncio.wait_for(writer.drain(), 10)
    return rest


async def declared_too_large(url: str, path: str) -> tuple[int, bytes]:
    """Headers that announce a huge body, and not one byte of it."""
    async with connection(url) as (reader, writer):
        writer.write(request_head(path, ENDLESS, stripe_signature="t=1,v1=00"))
        await writer.drain()
        status = await status_of(reader)
        rest = await refuses_the_rest(reader, writer)
    return status, rest


async def streamed_too_large(url: str, path: str) -> int:
    """A chunked body that never ends: only a server that stops reading at the limit answers."""
    async with connection(url) as (reader, writer):
        writer.write(request_head(path, None, stripe_signature="t=1,v1=00"))
        chunk = b"x" * 1024
        for _ in range(2 * LIMIT // len(chunk)):
            writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        await writer.drain()
        # No terminating chunk: the body is still open when the answer must come.
        status = await status_of(reader)
        await refuses_the_rest(reader, writer)
    return status


async def test_a_declared_length_over_the_limit_is_413_before_any_body_is_sent(sqlite_url: str) -> None:
    before = rejected()
    app = create_webhook_app(make_settings(sqlite_url, webhook_max_body=LIMIT))
    async with serving(app) as url:
        status, rest = await declared_too_large(url, "/api/stripe/webhooks")
    assert status == 413
    assert b'{"error":"body too large"}' in rest
    assert rejected() == before + 1


async def test_a_streamed_body_over_the_limit_is_413_while_it_is_still_arriving(sqlite_url: str) -> None:
    before = rejected()
    app = create_webhook_app(make_settings(sqlite_url, webhook_max_body=LIMIT))
    async with serving(app) as url:
        assert await streamed_too_large(url, "/api/stripe/webhooks") == 413
    assert rejected() == before + 1


@pytest.mark.parametrize("path", ["/api/stripe/webhooks", "/dev/simulate"])
async def test_a_body_that_trickles_in_is_408_once_its_time_is_up(
    path: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sender that announces a small body and sends it a byte now and then keeps its connection
    only until the body's deadline, then gets a 408 and the connection closes."""
    monkeypatch.setattr(body_module, "BODY_TIMEOUT", 0.5)
    settings = make_settings(f"sqlite+aiosqlite:///{tmp_path / 'slow.db'}", dev=True, webhook_max_body=LIMIT)
    app = create_embedded_app(settings)
    before = rejected()
    async with serving(app) as url, connection(url) as (reader, writer):
        writer.write(request_head(path, 100, stripe_signature="t=1,v1=00") + b"{")
        await writer.drain()
        answer = asyncio.ensure_future(reader.read())
        # One more byte now and then, never the whole body: the server must not wait for it.
        while not answer.done():
            writer.write(b" ")
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            await asyncio.wait([answer], timeout=0.1)
        raw = answer.result()
    assert raw.startswith(b"HTTP/1.1 408 "), raw[:80]
    assert b'{"error":"body not received in time"}' in raw
    assert await count_rows(f"sqlite+aiosqlite:///{tmp_path / 'slow.db'}", "stripe_events") == 0
    if path == "/api/stripe/webhooks":
        assert rejected() == before + 1


async def test_a_signed_event_within_the_limit_is_recorded_and_one_over_it_is_not(sqlite_url: str) -> None:
    def padded(size: int) -> tuple[bytes, dict[str, str]]:
        event = SampleEvents(new_license()).checkout_completed(int(time.time()))
        base = len(orjson.dumps(event))
        event["data"]["object"]["metadata"]["padding"] = "p" * (size - base - len(',"padding":""'))
        payload, headers = signed(event)
        assert len(payload) == size
        return payload, headers

    app = create_webhook_app(make_settings(sqlite_url, webhook_max_body=LIMIT))
    async with serving(app) as url:
        for size, expected in ((LIMIT, 200), (LIMIT + 1, 413)):
            payload, headers = padded(size)
            async with connection(url) as (reader, writer):
                writer.write(request_head("/api/stripe/webhooks", len(payload), **headers) + payload)
                await writer.drain()
                assert await status_of(reader) == expected, size
    assert await count_rows(sqlite_url, "stripe_events") == 1


@pytest.mark.parametrize("path", ["/dev/token", "/dev/simulate"])
async def test_the_development_routes_bound_their_bodies_too(path: str, tmp_path: Path) -> None:
    settings = make_settings(f"sqlite+aiosqlite:///{tmp_path / 'dev.db'}", dev=True)
    async with serving(create_embedded_app(settings)) as url:
        status, _ = await declared_too_large(url, path)
        assert status == 413
        assert await streamed_too_large(url, path) == 413
        # A body just over the routes' own bound, though far under the webhook's.
        body = orjson.dumps({"license_id": "lic_x", "action": "pay", "pad": "p" * dev.MAX_BODY})
        async with connection(url) as (reader, writer):
            writer.write(request_head(path, len(body)) + body)
            await writer.drain()
            assert await status_of(reader) == 413


# --- the request head, on every port -------------------------------------------------------------

# What a client would have to send to fill a process as the review did (4 x 100 MB); refused after
# a few tens of KiB, none of it gets that far.
HUGE_HEAD = 16 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class Port:
    name: str
    port: int
    pid: int  # the process that listens on it


@pytest.fixture
def every_port(spawn: Callable[..., Process], pg_url: str) -> list[Port]:
    """`license-broker webhook`, `stream` (with METRICS_PORT) and `serve`, as production runs them."""
    env = process_env(pg_url)
    metrics_port = free_port()
    webhook = spawn("webhook", env, ready=False)
    stream = spawn("stream", {**env, "METRICS_PORT": str(metrics_port)}, ready=False)
    serve = spawn("serve", env, ready=False)
    for process in (webhook, stream, serve):
        process.wait_ready()
    return [
        Port("webhook", webhook.port, webhook.proc.pid),
        Port("stream", stream.port, stream.proc.pid),
        Port("serve", serve.port, serve.proc.pid),
        Port("metrics", metrics_port, stream.proc.pid),
    ]


def rss_bytes(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))) * 1024


async def send_huge_head(port: int) -> tuple[int, bytes, asyncio.StreamWriter]:
    """A header that never ends, in 64 KiB writes: (bytes the server took before refusing, what it
    answered, the writer, still open on this side)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: ")
    chunk, sent = b"a" * 65536, 0
    with contextlib.suppress(ConnectionError):
        while sent < HUGE_HEAD:
            writer.write(chunk)
            await asyncio.wait_for(writer.drain(), 10)
            sent += len(chunk)
    answer = b""
    if sent < HUGE_HEAD:  # refused: whatever it said before closing (a reset may have dropped it)
        with contextlib.suppress(ConnectionError):
            answer = await asyncio.wait_for(reader.read(), 10)
    return sent, answer, writer


async def test_a_request_head_over_the_limit_is_refused_on_every_port_and_memory_does_not_grow(
    every_port: list[Port],
) -> None:
    for port in every_port:
        before = rss_bytes(port.pid)
        # Four at once, as in the review; measured while they are still open on this side.
        results = await asyncio.gather(*(send_huge_head(port.port) for _ in range(4)))
        grown = rss_bytes(port.pid) - before
        for _, _, writer in results:
            writer.close()
        for sent, answer, _ in results:
            assert sent < HUGE_HEAD, f"{port.name}: took a {HUGE_HEAD} byte head"
            assert answer == b"" or answer.startswith(b"HTTP/1.1 431 "), (port.name, answer[:80])
        assert grown < 16 * 1024 * 1024, f"{port.name}: grew {grown} bytes"
        # And it serves as before.
        async with httpx.AsyncClient() as client:
            path = "/metrics" if port.name == "metrics" else "/healthz"
            assert (await client.get(f"http://127.0.0.1:{port.port}{path}")).status_code == 200


async def hold_unfinished_head(port: int, trickle: bool) -> tuple[float, bytes]:
    """A head that never ends: one byte every half second (`trickle`), or not a byte at all. How
    long the server kept the connection, and what it answered."""
    started = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    if trickle:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
    answer = b""
    try:
        while time.monotonic() < started + HEAD_TIMEOUT + 10:
            try:
                data = await asyncio.wait_for(reader.read(1024), 0.5)
            except TimeoutError:
                if trickle:
                    writer.write(b"a")
                    await writer.drain()
                continue
            if not data:
                break
            answer += data
    except ConnectionError:
        pass
    finally:
        writer.close()
    return time.monotonic() - started, answer


async def test_a_request_head_not_finished_in_time_is_closed_on_every_port(every_port: list[Port]) -> None:
    held = await asyncio.gather(
        *(hold_unfinished_head(port.port, trickle) for port in every_port for trickle in (True, False))
    )
    cases = [(port.name, trickle) for port in every_port for trickle in (True, False)]
    for (name, trickle), (seconds, answer) in zip(cases, held, strict=True):
        assert HEAD_TIMEOUT - 0.5 < seconds < HEAD_TIMEOUT + 5, (name, trickle, seconds)
        # A client that sent part of a head is told why; one that sent nothing is just closed.
        assert answer.startswith(b"HTTP/1.1 408 ") if trickle else answer == b"", (name, trickle, answer)


# The same protocol, with a deadline short enough for what must outlast it.
class QuickHead(BoundedHeadProtocol):
    head_timeout = 0.5


async def ticks(request: Request) -> StreamingResponse:
    async def lines() -> AsyncIterator[bytes]:
        for i in range(20):
            yield b"%d\n" % i
            await asyncio.sleep(0.1)

    return StreamingResponse(lines(), media_type="text/plain")


async def ok(request: Request) -> PlainTextResponse:
    return PlainTextResponse(f"{len(request.headers)} headers, {len(await request.body())} bytes")


TICKS = Starlette(routes=[Route("/ticks", ticks), Route("/", ok, methods=["GET", "POST"])])


async def test_the_deadline_ends_with_the_head_so_a_long_response_and_kept_alive_requests_go_on() -> None:
    async with serving(TICKS, http=QuickHead) as url:
        async with connection(url) as (reader, writer):
            writer.write(b"GET /ticks HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            body = await asyncio.wait_for(reader.read(), 10)  # two seconds of lines: four deadlines
        assert body.startswith(b"HTTP/1.1 200 ") and b"\r\n19\n\r\n0\r\n\r\n" in body
        async with connection(url) as (reader, writer):
            # Each head in time, the three together four times longer than a deadline.
            for i in range(3):
                writer.write(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")
                await asyncio.sleep(0.2)  # pacing the client, as a slow but honest one would
                writer.write(b"X-Request: %d\r\n\r\n" % i)
                assert await status_of(reader) == 200
                await asyncio.wait_for(reader.readuntil(b"bytes"), 10)
                await asyncio.sleep(0.4)


async def test_a_head_under_the_limit_is_served_one_over_it_is_431_and_a_large_body_is_not_a_head() -> None:
    def head(size: int) -> bytes:
        start = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        # Many headers of ordinary length, filling the head to exactly `size` bytes.
        line = b"X-Filler: " + b"f" * 88 + b"\r\n"
        count, rest = divmod(size - len(start) - len(b"X-Last: \r\n\r\n"), len(line))
        return start + line * count + b"X-Last: " + b"l" * rest + b"\r\n\r\n"

    async with serving(TICKS, http=BoundedHeadProtocol) as url:
        for size, status in ((MAX_HEAD_BYTES - 64, 200), (MAX_HEAD_BYTES + 1, 431)):
            request = head(size)
            assert len(request) == size
            async with connection(url) as (reader, writer):
                writer.write(request)
                await writer.drain()
                assert await status_of(reader) == status, size
        # A body eight times the head limit, in the same write as its head.
        body = b"b" * (8 * MAX_HEAD_BYTES)
        async with connection(url) as (reader, writer):
            writer.write(b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
            await writer.drain()
            assert await status_of(reader) == 200
            assert (await asyncio.wait_for(reader.readuntil(b"bytes"), 10)).endswith(b"%d bytes" % len(body))


async def test_a_further_head_on_a_kept_alive_connection_has_its_own_deadline_from_its_first_byte() -> None:
    async with serving(TICKS, http=QuickHead) as url, connection(url) as (reader, writer):
        writer.write(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert await status_of(reader) == 200
        await asyncio.wait_for(reader.readuntil(b"bytes"), 10)
        await asyncio.sleep(0.3)  # idle, within the keep-alive, past half the first deadline
        writer.write(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        started = time.monotonic()
        answer = b""
        # Never the blank line that ends the head.
        while data := await asyncio.wait_for(reader.read(1024), 10):
            answer += data
        waited = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert QuickHead.head_timeout - 0.1 < waited < QuickHead.head_timeout + 2, waited
