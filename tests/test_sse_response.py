"""EventStreamResponse on its own: a client that stops reading is dropped after the send timeout,
and a client that goes away ends the stream, whatever the body is waiting for."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from broker import metrics
from stream.sse import EventStreamResponse


class Body:
    """An endless event body that records whether it was closed."""

    def __init__(self, wait: float) -> None:
        self.wait = wait
        self.closed = False

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._gen()

    async def _gen(self) -> AsyncIterator[bytes]:
        try:
            seq = 0
            while True:
                seq += 1
                yield b"id: %d\ndata: {}\n\n" % seq
                await asyncio.sleep(self.wait)
        finally:
            self.closed = True


def _response(body: Body, send_timeout: float) -> EventStreamResponse:
    return EventStreamResponse(body.__aiter__(), send_timeout=send_timeout)


async def test_a_client_that_stops_reading_is_dropped_after_the_send_timeout() -> None:
    body = Body(wait=0)
    sent: list[dict[str, Any]] = []
    stuck = asyncio.Event()

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if len(sent) == 3:  # start, one event, then the socket buffer is full
            stuck.set()
            await asyncio.Event().wait()

    async def receive() -> dict[str, Any]:
        await asyncio.Event().wait()
        raise AssertionError

    before = metrics.SLOW_CLIENTS._value.get()
    await asyncio.wait_for(_response(body, send_timeout=0.1)({"type": "http"}, receive, send), 5)
    assert stuck.is_set()
    assert metrics.SLOW_CLIENTS._value.get() == before + 1
    assert body.closed


async def test_sends_that_complete_are_not_cut_off_by_an_earlier_deadline() -> None:
    body = Body(wait=0.08)  # each event comes longer than the send timeout after the last
    sent: list[dict[str, Any]] = []
    enough = asyncio.Event()

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if len(sent) == 7:  # start and six events: five waits, each beyond the send timeout
            enough.set()

    disconnect = asyncio.Event()

    async def receive() -> dict[str, Any]:
        await disconnect.wait()
        return {"type": "http.disconnect"}

    before = metrics.SLOW_CLIENTS._value.get()
    task = asyncio.create_task(_response(body, send_timeout=0.05)({"type": "http"}, receive, send))
    waiting = asyncio.create_task(enough.wait())
    await asyncio.wait({waiting, task}, timeout=5, return_when=asyncio.FIRST_COMPLETED)
    waiting.cancel()
    # The timer is disarmed between sends: no wait of the body counts against it.
    assert enough.is_set() and not task.done(), f"the stream ended after {len(sent) - 1} events"
    disconnect.set()
    await asyncio.wait_for(task, 5)
    assert metrics.SLOW_CLIENTS._value.get() == before
    assert body.closed


def _idle_after_the_first_event() -> tuple[Body, asyncio.Event, Any]:
    """A body that sends one event, then waits an hour; `sent` is set once that event is sent."""
    body = Body(wait=3600)
    sent = asyncio.Event()

    async def send(message: dict[str, Any]) -> None:
        if message.get("body"):
            sent.set()

    return body, sent, send


async def test_a_client_that_goes_away_ends_an_idle_stream() -> None:
    body, sent, send = _idle_after_the_first_event()
    gone = asyncio.Event()

    async def receive() -> dict[str, Any]:
        await gone.wait()
        return {"type": "http.disconnect"}

    task = asyncio.create_task(_response(body, send_timeout=30)({"type": "http"}, receive, send))
    await asyncio.wait_for(sent.wait(), 5)
    gone.set()
    await asyncio.wait_for(task, 5)  # not an hour
    assert body.closed


async def test_a_server_cancelling_the_handler_is_not_mistaken_for_the_client_leaving() -> None:
    body, sent, send = _idle_after_the_first_event()

    async def receive() -> dict[str, Any]:
        await asyncio.Event().wait()
        raise AssertionError

    task = asyncio.create_task(_response(body, send_timeout=30)({"type": "http"}, receive, send))
    await asyncio.wait_for(sent.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert body.closed
