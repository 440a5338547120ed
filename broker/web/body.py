"""Request bodies, bounded in bytes and in time: what a route reads before it looks at it."""

from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

# A body sent a byte at a time would otherwise hold its connection (and its slot) for as long as
# the sender likes: uvicorn bounds the head (broker.web.server), not the body. Stripe and the apps
# send a few KB at once, so 10 s, the head's own bound, is far beyond any real sender.
BODY_TIMEOUT = 10.0


class BodyRefused(Exception):
    """The body was not read: answer with response(), which closes the connection (otherwise
    uvicorn keeps reading, and discarding, the rest until its keep-alive timeout)."""

    status = 400
    error = "body refused"

    def response(self) -> Response:
        return JSONResponse({"error": self.error}, status_code=self.status, headers={"connection": "close"})


class BodyTooLarge(BodyRefused):
    """413: the request declared or sent more than the route accepts."""

    status = 413
    error = "body too large"


class BodyTooSlow(BodyRefused):
    """408: the body did not arrive whole within BODY_TIMEOUT."""

    status = 408
    error = "body not received in time"


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, or BodyTooLarge as soon as Content-Length or the bytes received pass
    `limit` (nothing beyond it is buffered), or BodyTooSlow when it is not whole within BODY_TIMEOUT."""
    declared = request.headers.get("content-length", "")
    # The HTTP server has already refused a malformed Content-Length; digits only here.
    if declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(f"Content-Length {declared} is over the limit of {limit} bytes")
    body = bytearray()
    within = BODY_TIMEOUT  # read at each call: tests shorten it
    try:
        async with asyncio.timeout(within):
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise BodyTooLarge(f"body is over the limit of {limit} bytes")
    except TimeoutError:
        raise BodyTooSlow(f"body not whole after {within:g} s ({len(body)} bytes received)") from None
    return bytes(body)
