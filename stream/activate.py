"""The buyer's side of a purchase: `GET /activate?session_id=...` is the page a seller gives
Stripe Checkout as its success_url. It shows the license key (with a copy button and, with
APP_URL_SCHEME, an "Open APP_NAME" link) as soon as the Checkout Session is recorded: the browser
often arrives before Stripe's webhook, so the page waits live on
`GET /api/checkout-sessions/{id}/events` (SSE) rather than reloading.
`GET /api/checkout-sessions/{id}/license` is the same as JSON, for sellers with a page of their own.

The Checkout Session id is the secret that shows the key, as in Stripe's fulfilment guide; lookups
that find nothing (and malformed ids) count against the client's address (429 beyond)."""

from __future__ import annotations

import asyncio
import functools
import html
import logging
import time
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy.exc import SQLAlchemyError
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from broker import metrics
from broker.licensing import keys
from broker.licensing.metrics import SESSION_LOOKUPS
from broker.licensing.ratelimit import SESSIONS
from broker.licensing.sessions import TooManyWaiting, license_of_sessions, valid_session_id
from broker.storage.eventlog import EventLog
from broker.wire import PING, named_frame, retry_frame
from stream.desktop import Desktop, error, keyed
from stream.hub import HubClosed, SubscriptionHub
from stream.limits import StreamAdmission, StreamRefused
from stream.sse import EventStreamResponse

log = logging.getLogger("stream.activate")

STATIC = Path(__file__).parent / "static"
# How long the page's stream waits for the session and then follows its license before ending
# (the page then asks the buyer to reload).
PAGE_STREAM_LIFETIME = 30 * 60.0
# The page holds a key: nothing cached, nothing sent to another site, nothing loaded from one.
PAGE_HEADERS = {
    "cache-control": "no-store",
    "referrer-policy": "no-referrer",
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
}


@functools.cache
def _page(app_name: str | None) -> str:
    # Read once, when first asked for (nothing is read at import).
    return (STATIC / "activate.html").read_text().replace("{{APP_NAME}}", html.escape(app_name or "the app"))


async def activate_page(request: Request) -> Response:
    body = _page(request.state.runtime.settings.app_name)
    return Response(body, media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)


async def static_file(request: Request) -> Response:
    name = request.path_params["name"]
    media = {"activate.js": "text/javascript", "activate.css": "text/css"}.get(name)
    if media is None:
        return error("not found", 404)
    return FileResponse(STATIC / name, media_type=f"{media}; charset=utf-8", headers={"cache-control": "no-cache"})


async def _session(request: Request, desktop: Desktop) -> tuple[str, str | None] | Response:
    """The session id and its license (None: not recorded yet), or the refusal (for a `keyed` route)."""
    if (refused := await desktop.refused(request, SESSIONS)) is not None:
        SESSION_LOOKUPS.labels("throttled").inc()
        return refused
    session_id = request.path_params["session_id"]
    if not valid_session_id(session_id):
        SESSION_LOOKUPS.labels("malformed").inc()
        await desktop.failed(request, SESSIONS)
        return error("not a Checkout Session id", 400)
    found = await license_of_sessions(desktop.keys.engine, [session_id])
    license_id = found.get(session_id)
    SESSION_LOOKUPS.labels("not_found" if license_id is None else "found").inc()
    if license_id is None:
        await desktop.failed(request, SESSIONS)
    return session_id, license_id


async def _license(desktop: Desktop, events: EventLog, license_id: str) -> dict[str, Any]:
    key = await desktop.keys.reveal(license_id)
    assert key is not None  # a recorded session's license exists
    current = (await events.current(license_id)).fields()
    return {
        "license_id": license_id,
        "key": keys.display(key),
        "status": current["status"],
        "entitled": current["entitled"],
        "open_url": desktop.open_url(key),
    }


@keyed
async def session_license(request: Request, desktop: Desktop) -> Response:
    found = await _session(request, desktop)
    if isinstance(found, Response):
        return found
    _, license_id = found
    if license_id is None:
        return error("checkout session not recorded yet", 404)
    return JSONResponse(await _license(desktop, request.state.stream_events, license_id))


def _named(name: bytes, data: dict[str, Any]) -> bytes:
    return named_frame(name, orjson.dumps(data))


@keyed
async def session_events(request: Request, desktop: Desktop) -> Response | EventStreamResponse:
    found = await _session(request, desktop)
    if isinstance(found, Response):
        return found
    session_id, license_id = found
    admission: StreamAdmission = request.state.admission
    hub: SubscriptionHub = request.state.hub
    if hub.closing:
        return JSONResponse({"error": "shutting down"}, status_code=503, headers={"retry-after": "1"})
    try:
        slot = admission.admit(f"checkout:{session_id}")
    except StreamRefused as refused:
        metrics.STREAMS_REFUSED.labels(refused.limit).inc()
        headers = {"retry-after": str(refused.retry_after)}
        return JSONResponse({"error": refused.reason}, status_code=refused.status, headers=headers)
    waiting: asyncio.Future[str] | None = None
    if license_id is None:
        try:
            waiting = desktop.sessions.wait(session_id)
        except TooManyWaiting:
            slot.release()
            return JSONResponse({"error": "too many pages waiting"}, status_code=503, headers={"retry-after": "5"})

    def closed() -> None:
        slot.release()
        if waiting is not None:
            desktop.sessions.forget(session_id, waiting)

    settings = request.state.runtime.settings
    body = _session_stream(desktop, hub, request.state.stream_events, settings.retry_ms, license_id, waiting,
                           heartbeat=settings.heartbeat_interval)  # fmt: skip
    return EventStreamResponse(body, send_timeout=settings.send_timeout, on_close=closed)


async def _session_stream(
    desktop: Desktop,
    hub: SubscriptionHub,
    events: EventLog,
    retry_ms: int,
    license_id: str | None,
    waiting: asyncio.Future[str] | None,
    *,
    heartbeat: float,
) -> AsyncGenerator[bytes, None]:
    """`event: waiting` until the session is recorded, then `event: license` (the key and the
    license's state) and again whenever the license's status changes, until the page goes away
    or PAGE_STREAM_LIFETIME has passed (`event: timeout`)."""
    yield retry_frame(retry_ms)
    deadline = time.monotonic() + PAGE_STREAM_LIFETIME
    try:
        if license_id is None:
            assert waiting is not None
            yield _named(b"waiting", {})
            while not waiting.done():
                left = deadline - time.monotonic()
                if left <= 0:
                    yield _named(b"timeout", {})
                    return
                done, _ = await asyncio.wait({waiting}, timeout=min(heartbeat, left))
                if not done:
                    yield PING
            license_id = waiting.result()
        async with hub.subscribe(license_id) as sub:
            body = await _license(desktop, events, license_id)
            yield _named(b"license", body)
            while (left := deadline - time.monotonic()) > 0:
                live = await sub.get(min(heartbeat, left))
                if live is None:
                    if sub.ended:
                        return
                    yield PING
                    continue
                state = live.fields()  # decoded once per event, shared with the streams' leases
                if (state["status"], state["entitled"]) != (body["status"], body["entitled"]):
                    body = body | {"status": state["status"], "entitled": state["entitled"]}
                    yield _named(b"license", body)
            yield _named(b"timeout", {})
    except HubClosed:
        pass  # shutting down
    except SQLAlchemyError as exc:
        log.warning("checkout session page stream ended, database unavailable: %s", exc)


routes = [
    Route("/activate", activate_page, methods=["GET"]),
    Route("/static/{name}", static_file, methods=["GET"]),
    Route("/api/checkout-sessions/{session_id}/license", session_license, methods=["GET"]),
    Route("/api/checkout-sessions/{session_id}/events", session_events, methods=["GET"]),
]
