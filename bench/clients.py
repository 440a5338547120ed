"""Lean load generators: an SSE client that is an asyncio Protocol (no task, no buffer copies
beyond the frame), and a keep-alive HTTP/1.1 poster of signed Stripe events. The bench holds
thousands of connections in one process; httpx would make the bench the bottleneck."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import count
from typing import Any, cast

import orjson

from broker.signing import tokens
from webhook.samples import SampleEvents
from webhook.signature import sign

WEBHOOK_PATH = "/api/stripe/webhooks"
_STATUSES = ("active", "past_due")


def now_ns() -> int:
    # CLOCK_MONOTONIC: system-wide on Linux, so it would also compare across processes.
    return time.monotonic_ns()


class SseClient(asyncio.Protocol):
    """One subscriber connection. Records (seq, arrival ns) of every event frame it parses."""

    def __init__(
        self,
        license_id: str,
        token: str | None,
        host: str,
        port: int,
        last_event_id: int | None,
        *,
        path: str | None = None,
    ) -> None:
        """`path`: what to GET (the project's stream of the license by default); `token`: the
        bearer token, if any (the Flask-SSE peer takes none)."""
        self.license_id = license_id
        self.received: list[tuple[int, int]] = []
        self.status: int | None = None
        self.first_event = asyncio.get_running_loop().create_future()
        self.closed = asyncio.get_running_loop().create_future()
        self.on_event: Callable[[SseClient, int, int], None] | None = None
        self._request = (
            f"GET {path or f'/api/licenses/{license_id}/events'} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            + (f"Authorization: Bearer {token}\r\n" if token is not None else "")
            + "Accept: text/event-stream\r\n"
            + (f"Last-Event-ID: {last_event_id}\r\n" if last_event_id is not None else "")
            + "\r\n"
        ).encode()
        self._transport: asyncio.Transport | None = None
        self._raw = b""  # bytes not yet de-chunked
        self._text = b""  # de-chunked bytes not yet split into frames
        self._headers_done = False
        self._chunked = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have the same methods.
        self._transport = cast(asyncio.Transport, transport)
        self._transport.write(self._request)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(exc)
        if not self.first_event.done():
            self.first_event.set_exception(ConnectionError(f"closed before the first event (status {self.status})"))

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def data_received(self, data: bytes) -> None:
        arrived = now_ns()
        self._raw += data
        if not self._headers_done:
            end = self._raw.find(b"\r\n\r\n")
            if end < 0:
                return
            head, self._raw = self._raw[:end].decode("latin-1"), self._raw[end + 4 :]
            self.status = int(head.split(" ", 2)[1])
            self._chunked = "transfer-encoding: chunked" in head.lower()
            self._headers_done = True
            if self.status != 200:
                self.close()
                return
        if self._chunked:
            self._dechunk()
        else:
            self._text += self._raw
            self._raw = b""
        self._frames(arrived)

    def _dechunk(self) -> None:
        raw = self._raw
        while True:
            line_end = raw.find(b"\r\n")
            if line_end < 0:
                break
            size = int(raw[:line_end].split(b";", 1)[0], 16)
            if len(raw) < line_end + 2 + size + 2:
                break
            start = line_end + 2
            self._text += raw[start : start + size]
            raw = raw[start + size + 2 :]
        self._raw = raw

    def _frames(self, arrived: int) -> None:
        text = self._text
        while (end := text.find(b"\n\n")) >= 0:
            frame, text = text[:end], text[end + 2 :]
            if (seq := _frame_id(frame)) is not None:
                self.received.append((seq, arrived))
                if not self.first_event.done():
                    self.first_event.set_result(seq)
                if self.on_event is not None:
                    self.on_event(self, seq, arrived)
        self._text = text


def _frame_id(frame: bytes) -> int | None:
    """The `id` field of an SSE frame, if it has one: first, as the project writes it (`id: 5`), or
    on any line with or without the space, as the spec allows and Flask-SSE writes it (`id:5`, last)."""
    if frame.startswith(b"id: "):
        end = frame.find(b"\n")
        return int(frame[4:end] if end >= 0 else frame[4:])
    for line in frame.split(b"\n"):
        if line.startswith(b"id:"):
            return int(line[3:])
    return None


async def connect_clients(
    host: str,
    port: int,
    license_ids: list[str],
    *,
    token_secret: str,
    last_event_id: int | None = None,
    concurrency: int = 200,
    first_event_timeout: float = 60.0,
) -> list[SseClient]:
    """Open one stream per license id and wait for each one's first event; at most `concurrency`
    handshakes at once so that a large ramp does not overflow the listen backlog."""
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(concurrency)
    ttl = 3600.0

    async def one(license_id: str) -> SseClient:
        async with gate:
            token = tokens.mint(token_secret, license_id, ttl=ttl)
            _, client = await loop.create_connection(
                lambda: SseClient(license_id, token, host, port, last_event_id), host, port
            )
            await asyncio.wait_for(client.first_event, first_event_timeout)
            return client

    return list(await asyncio.gather(*(one(license_id) for license_id in license_ids)))


# --- webhooks -------------------------------------------------------------------------------------


@dataclass
class EventFactory:
    """Signed `customer.subscription.updated` events, each of which changes its license (and so
    takes the next seq): statuses alternate and `created` grows by a second per event of a
    license, as a customer's real events do. The poster sends one license's events one after
    another (bench.measure), so none arrives older than the license's state."""

    secret: str
    created: int = field(default_factory=lambda: int(time.time()))
    _samples: dict[str, SampleEvents] = field(default_factory=dict)
    _next: dict[str, int] = field(default_factory=dict)

    def signed(self, license_id: str) -> tuple[bytes, str]:
        samples = self._samples.get(license_id)
        if samples is None:
            samples = self._samples[license_id] = SampleEvents(license_id)
        n = self._next.get(license_id, 0)
        self._next[license_id] = n + 1
        event = samples.subscription_event("customer.subscription.updated", _STATUSES[n % 2], self.created + n)
        event["data"]["object"]["items"]["data"][0]["current_period_end"] += n + 1
        payload = orjson.dumps(event)
        return payload, sign(payload, self.secret)


@dataclass(frozen=True, slots=True)
class Posted:
    license_id: str
    sent_ns: int
    done_ns: int
    status: int
    seq: int | None


class WebhookConnection:
    """One keep-alive HTTP/1.1 connection to the webhook app."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._ids = count()

    async def open(self) -> WebhookConnection:
        self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        return self

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()

    async def post(self, license_id: str, payload: bytes, signature: str) -> Posted:
        assert self._reader is not None and self._writer is not None
        head = (
            f"POST {WEBHOOK_PATH} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Content-Type: application/json\r\nStripe-Signature: {signature}\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n"
        ).encode()
        sent = now_ns()
        self._writer.write(head + payload)
        response_head = await self._reader.readuntil(b"\r\n\r\n")
        status = int(response_head.split(b" ", 2)[1])
        length = 0
        for line in response_head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        body = await self._reader.readexactly(length)
        done = now_ns()
        seq: int | None = None
        if status == 200:
            answer: dict[str, Any] = orjson.loads(body)
            seq = answer.get("seq")
        return Posted(license_id, sent, done, status, seq)
