"""What request logging needs: a request id on every request (X-Request-ID, in and out, and on
every log line written while the request runs), and tokens kept out of the logs."""

from __future__ import annotations

import itertools
import logging
import os
import re
from contextvars import ContextVar
from urllib.parse import unquote_plus

from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUEST_ID: ContextVar[str | None] = ContextVar("request_id", default=None)

# An id from a proxy or a client is kept only if it is short and plain: it goes into log lines.
_ACCEPTABLE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# Every query parameter of a logged URL: its name is compared once decoded, because a server
# decodes `%74oken=` and `tok%65n=` into `token=` and would accept the token they carry.
_QUERY_PARAM = re.compile(r"((?:^|[?&;])([^=&;?\s\"']*)=)([^&;\s\"']*)")


class RequestIds:
    """Made request ids: a random 64-bit prefix per process and a counter, 32 hex characters like
    a uuid4's. As unique (a prefix collision between two processes is a 1 in 2**64 chance per
    pair), but without uuid4's getrandom call and its UUID object per request. An id is a log
    correlation handle, never a secret: a guessable next one gives nothing away."""

    def __init__(self) -> None:
        self.reseed()
        # A forked child (not uvicorn's spawned workers, but a forking supervisor would) must not
        # repeat its parent's ids.
        os.register_at_fork(after_in_child=self.reseed)

    def reseed(self) -> None:
        self._prefix = os.urandom(8).hex()
        self._counter = itertools.count()

    def next(self) -> str:
        return f"{self._prefix}{next(self._counter) & 0xFFFF_FFFF_FFFF_FFFF:016x}"


_IDS = RequestIds()


def _is_token(name: str) -> bool:
    for _ in range(4):  # double (triple...) encoding: %2574oken
        decoded = unquote_plus(name)
        if decoded == name:
            break
        name = decoded
    return name.strip().lower() in ("token", "access_token")


def redact(text: str) -> str:
    return _QUERY_PARAM.sub(lambda m: f"{m.group(1)}[redacted]" if _is_token(m.group(2)) else m.group(0), text)


class RedactTokens(logging.Filter):
    """`?token=...` (what browsers' EventSource has to use) becomes `?token=[redacted]`, however
    the name is spelled or percent-encoded."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
        record.msg = redact(str(record.msg))
        return True


class RequestIdFilter(logging.Filter):
    """Adds `request_id` ("-" outside a request) to every record, for the formatters."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get() or "-"
        return True


def redact_access_log() -> None:
    """Put the redaction on uvicorn's access logger itself, not only on our handlers: an app
    started by bare `uvicorn stream.app:app` never sees license_broker.logs' configuration, and
    its access log would otherwise write every `?token=` it serves. Idempotent."""
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, RedactTokens) for f in access.filters):
        access.addFilter(RedactTokens())


class RequestIdMiddleware:
    """Pure ASGI (no response buffering, so streams are untouched): takes X-Request-ID from the
    request or makes one, sets it for the logs of this request, and returns it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        redact_access_log()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"x-request-id"), "")
        request_id = given if _ACCEPTABLE_ID.fullmatch(given) else _IDS.next()
        header = (b"x-request-id", request_id.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        # uvicorn writes its access line from inside `send`, in this task: it sees the id too.
        token = REQUEST_ID.set(request_id)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            REQUEST_ID.reset(token)
