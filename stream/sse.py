"""A minimal Server-Sent Events response: one task per connection besides the handler's own,
which watches for the client going away and then interrupts the handler. It sends the frames its
body yields as they are (broker.wire builds them)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable

from starlette.types import Receive, Scope, Send

from broker import background, metrics

HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache, no-transform"),
    # nginx: do not buffer this response (see docs/deploy.md).
    (b"x-accel-buffering", b"no"),
]


class EventStreamResponse:
    """An ASGI response that sends `body`'s chunks as they come, until the body ends or the client
    goes away. A plain class with slots rather than a starlette Response: one per open stream."""

    __slots__ = ("_gone", "_handler", "_streaming", "on_close", "send_timeout", "stream")

    def __init__(
        self,
        body: AsyncGenerator[bytes, None],
        *,
        send_timeout: float,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self.stream = body
        self.send_timeout = send_timeout
        # Runs however the response ends, even when the body never started (a client gone
        # before the first send): what admitted the stream is released here.
        self.on_close = on_close
        self._handler: asyncio.Task[object] | None = None
        self._streaming = True
        self._gone = False

    async def _watch_disconnect(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        # Only interrupt the body while it runs: never the clean-up in __call__.
        if self._streaming and self._handler is not None:
            self._gone = True
            self._handler.cancel()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        metrics.OPEN_STREAMS.inc()
        self._handler = handler = asyncio.current_task()
        assert handler is not None
        # Plain asyncio rather than an anyio task group: with 10,000 idle streams per process the
        # group's bookkeeping was ~2 KB of each connection's ~35 KB (docs/bench.md).
        watcher = asyncio.create_task(self._watch_disconnect(receive), name="sse-disconnect")
        loop = asyncio.get_running_loop()
        try:
            await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
            # One timer for the life of the stream, armed only while a send is in flight: a fresh
            # anyio.fail_after per chunk cost ~12 us, this ~2 us (a replay sends thousands).
            async with asyncio.timeout(None) as send_deadline:
                async for chunk in self.stream:
                    # A client that stops reading blocks this send; it is dropped after the
                    # timeout (it reconnects and catches up) instead of holding memory forever.
                    send_deadline.reschedule(loop.time() + self.send_timeout)
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    send_deadline.reschedule(None)
                    del chunk  # not held while the body waits for the next one
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except TimeoutError:
            metrics.SLOW_CLIENTS.inc()
        except OSError:
            pass  # the client went away mid-send
        except asyncio.CancelledError:
            if not self._gone:
                raise  # the server is cancelling us, not the client leaving
            handler.uncancel()
        finally:
            self._streaming = False
            self._handler = None
            watcher.cancel()
            try:
                await self.stream.aclose()
            finally:
                metrics.OPEN_STREAMS.dec()
                if self.on_close is not None:
                    self.on_close()
                await background.stop(watcher)  # a shutdown's cancellation of this task goes through
