"""The HTTP protocol of every port the broker listens on (`serve`, `webhook`, `stream`,
METRICS_PORT): uvicorn's httptools protocol with the request head bounded in bytes and in time.

uvicorn bounds neither with httptools: llhttp has no size limit and the protocol buffers every
header until the head ends (h11's `h11_max_incomplete_event_size` applies to h11 only), and its one
timer, the keep-alive, is armed only after a response and cancelled by every byte received, so a
connection that never finishes its head, or never sends one, stays open for good. Neither can be
enforced from the ASGI app, which sees nothing before the head is complete.

The bound covers the head only: once it is complete the app bounds the body (WEBHOOK_MAX_BODY,
broker.http.read_body) and a response may last hours (an SSE stream)."""

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
# to the end of the head. A real client sends a head of this size in one or two segments; ten
# seconds leave room for a few retransmissions on a bad link.
HEAD_TIMEOUT = 10.0

# `uvicorn --http` takes this (`uvicorn webhook.app:app --http broker.http_server:BoundedHeadProtocol`).
PROTOCOL = "broker.http_server:BoundedHeadProtocol"


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
        self._head_bytes = 0
        self._head_deadline: asyncio.TimerHandle | None = None
        self._refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            # A head that spans reads is counted here, each read whole: one that also holds the
            # body counts only if the head is still unfinished after it. A head that ends within
            # the read is measured by on_headers_complete.
            self._head_bytes += len(data)
            if self._head_deadline is None:
                self._arm()
        super().data_received(data)
        if self._in_head and self._head_bytes > self.max_head_bytes:
            self._refuse(TOO_LARGE)

    def on_headers_complete(self) -> None:
        if self._refused:
            return
        self._in_head = False
        self._disarm()
        # The head's size as written in the usual form ("METHOD url HTTP/1.1", "name: value"
        # lines): llhttp hands over the parts, not the bytes. Checked before any app sees it.
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
        # Whatever comes next is the next request's head. Its timer starts with its first byte:
        # the response to this one may take hours (an SSE stream), and in between the keep-alive
        # timer closes an idle connection.
        self._in_head = True
        self._head_bytes = 0

    def _arm(self) -> None:
        self._head_deadline = self.loop.call_later(self.head_timeout, self._head_timed_out)

    def _disarm(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_timed_out(self) -> None:
        self._head_deadline = None
        self._refuse(TIMED_OUT if self._head_bytes else None)

    def _refuse(self, response: bytes | None) -> None:
        self._refused = True
        self._disarm()
        if self.transport.is_closing():
            return
        # Never into the middle of a response still being sent (a pipelined head during a stream).
        if response is not None and (self.cycle is None or self.cycle.response_complete):
            self.transport.write(response)
        self.transport.close()
