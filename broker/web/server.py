"""The HTTP protocol of every port the broker listens on (`serve`, `webhook`, `stream`,
METRICS_PORT): uvicorn's httptools protocol with the request head bounded in bytes and in time.

uvicorn bounds neither with httptools: llhttp has no size limit and the protocol buffers every
header until the head ends (h11's `h11_max_incomplete_event_size` applies to h11 only), and its one
timer, the keep-alive, is armed only after a response and cancelled by every byte received, so a
connection that never finishes its head, or never sends one, stays open for good. Neither can be
enforced from the ASGI app, which sees nothing before the head is complete.

The bound covers the head only: once it is complete the app bounds the body (WEBHOOK_MAX_BODY,
broker.web.body.read_body, which also bounds it in time) and a response may last hours (an SSE stream)."""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

# Request line and headers together. Browsers and proxies stay far below (nginx refuses a header
# line over 8 KiB by default); the heads the broker expects (a Stripe-Signature, a bearer token or
# `?token=`) are under 2 KiB. What a connection can make the process hold is this plus one read.
MAX_HEAD_BYTES = 32 * 1024
# From the connection's start, or from the first byte of a further request on a kept-alive one,
# to the end of the head. A real client sends its head (a few hundred bytes to 2 KiB) in one or two
# segments at once; ten seconds leave room for a few retransmissions on a bad link.
HEAD_TIMEOUT = 10.0

# `uvicorn --http` takes this (`uvicorn webhook.app:app --http broker.web.server:BoundedHeadProtocol`).
PROTOCOL = "broker.web.server:BoundedHeadProtocol"


def _response(status: bytes, message: bytes) -> bytes:
    return b"".join(
        [
            b"HTTP/1.1 " + status + b"\r\n",
            b"content-type: text/plain; charset=utf-8\r\n",
            b"content-length: " + str(len(message)).encode() + b"\r\n",
            b"connection: close\r\n\r\n",
            message,
        ]
    )


TOO_LARGE = _response(b"431 Request Header Fields Too Large", b"request head too large")
TIMED_OUT = _response(b"408 Request Timeout", b"request head not received in time")


class BoundedHeadProtocol(HttpToolsProtocol):
    """A head over `max_head_bytes` is answered 431 and the connection closed; one not complete
    within `head_timeout` is answered 408 (or, when not one byte of it came, just closed)."""

    max_head_bytes = MAX_HEAD_BYTES
    head_timeout = HEAD_TIMEOUT

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        # Between requests (and before the first) whatever arrives is the start of a head.
        self._in_head = True
        self._head_started: float | None = None  # loop time; None while no head is arriving
        self._head_bytes = 0  # of the reads the head has spanned so far
        self._read_bytes = 0  # of the read being parsed
        self._timer: asyncio.TimerHandle | None = None
        self._refused = False

    # The timer is not cancelled when a head completes, nor armed for each request: at most one
    # per connection is pending, and when it fires it looks at the head in progress, if any, and
    # waits for what is left of its time. Per request that leaves a clock read and a comparison
    # (a timer armed and cancelled per request cost as much as the rest of this class).

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_started = self.loop.time()
        self._timer = self.loop.call_later(self.head_timeout, self._check_time)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._read_bytes = len(data)
        if self._in_head:
            if self._head_started is None:  # the first byte of a further request
                self._head_started = self.loop.time()
                if self._timer is None:
                    self._timer = self.loop.call_later(self.head_timeout, self._check_time)
            # Each read counted whole: one that also holds the body matters only if the head is
            # still unfinished after it. A head that ends in this read is measured below.
            self._head_bytes += self._read_bytes
        super().data_received(data)
        if self._in_head and self._head_bytes > self.max_head_bytes:
            self._refuse(TOO_LARGE)

    def on_headers_complete(self) -> None:
        if self._refused:
            return
        self._in_head = False
        self._head_started = None
        # The head lies within the reads counted so far and this one: only when they could hold
        # more than the limit is it measured, as written in the usual form ("METHOD url HTTP/1.1",
        # "name: value" lines; llhttp hands over the parts, not the bytes).
        if self._head_bytes + self._read_bytes > self.max_head_bytes:
            size = len(self.parser.get_method()) + len(self.url) + 14
            if size + sum(len(name) + len(value) + 4 for name, value in self.headers) > self.max_head_bytes:
                self._refuse(TOO_LARGE)
                return
        super().on_headers_complete()

    # After a refusal the parser still reads the rest of the read it came in: nothing of it runs.
    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refused:
            return
        super().on_message_complete()
        # Whatever comes next is the next request's head, timed from its first byte: the response
        # to this one may take hours (an SSE stream), and until a byte comes the keep-alive timer
        # closes an idle connection.
        self._in_head = True
        self._head_bytes = 0

    def _check_time(self) -> None:
        self._timer = None
        if self._head_started is None or self._refused:
            return  # no head arriving: the next one arms the timer again
        left = self._head_started + self.head_timeout - self.loop.time()
        if left > 0:
            self._timer = self.loop.call_later(left, self._check_time)
        else:
            self._refuse(TIMED_OUT if self._head_bytes else None)

    def _refuse(self, response: bytes | None) -> None:
        self._refused = True
        if self.transport.is_closing():
            return
        # Never into the middle of a response still being sent (a pipelined head during a stream).
        if response is not None and (self.cycle is None or self.cycle.response_complete):
            self.transport.write(response)
        self.transport.close()
