"""Every route that reads a body bounds it: over the limit is a 413 as soon as Content-Length
or the bytes received say so, on a real socket, while the client is still sending."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest
from prometheus_client import REGISTRY

from license_broker import dev
from license_broker.embedded import create_app as create_embedded_app
from tests.support.licenses import make_settings, new_license, signed
from tests.support.processes import serving
from tests.support.services import count_rows
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
