"""The SSE ASGI app: `uvicorn stream.app:app`."""

from __future__ import annotations

import asyncio
import logging
import re
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import SQLAlchemyError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from broker import metrics
from broker.runtime import Runtime
from broker.settings import Settings
from broker.signing import tokens
from broker.signing.leases import NO_LEASES, with_lease
from broker.storage.eventlog import EventLog
from broker.storage.schema import licenses
from broker.web.asgi import Part, StreamRoute, build_app
from broker.web.ops import settings_from_env
from stream import activate, desktop, purchase
from stream.catchup import license_stream
from stream.desktop import Desktop, open_desktop
from stream.hub import SubscriptionHub
from stream.limits import StreamAdmission, StreamRefused, ThrottledEventLog
from stream.machine import StreamMachine
from stream.sse import EventStreamResponse

log = logging.getLogger("stream")


# The longest id the licenses table holds; and Postgres text cannot hold NUL. A longer id, or one
# with a NUL, names no license that can ever exist, and its query would be a database error (a 503).
_ID_TYPE = licenses.c.id.type
_MAX_LICENSE_ID = _ID_TYPE.length if isinstance(_ID_TYPE, sa.String) and _ID_TYPE.length else 200


def _impossible_license(license_id: str) -> Response | None:
    if len(license_id) > _MAX_LICENSE_ID or "\x00" in license_id:
        return JSONResponse({"error": f"license id: at most {_MAX_LICENSE_ID} characters, no NUL"}, status_code=400)
    return None


def _unauthorized() -> Response:
    # One body for every failure: which check failed (expired, forged, wrong audience) would tell
    # whoever holds a token more than they need; the log has the reason.
    return JSONResponse({"error": "invalid token"}, status_code=401, headers={"www-authenticate": "Bearer"})


def _authorize(request: Request, license_id: str) -> tokens.Grant | Response:
    """The grant, or 401 without a valid token, 403 for a token of another license (400 for an
    id no license can have)."""
    if (impossible := _impossible_license(license_id)) is not None:
        return impossible
    header = request.headers.get("authorization", "")
    token = header[7:].strip() if header[:7].lower() == "bearer " else request.query_params.get("token")
    if not token:
        return _unauthorized()
    try:
        grant = tokens.verify_for(request.state.runtime.settings, token)
    except tokens.InvalidToken as exc:
        log.info("token refused for license %r: %s", license_id, exc)
        return _unauthorized()
    if grant.license_id != license_id:
        return JSONResponse({"error": "token is for another license"}, status_code=403)
    return grant


# What a seq can be (a BIGINT): at most 19 plain digits. int() alone would also take "+7", "1_0",
# padded or non-ASCII digits, and numbers no database column can hold.
_SEQ = re.compile(r"[0-9]{1,19}")
_MAX_SEQ = 2**63 - 1


def _resume_point(request: Request) -> int | None:
    """The Last-Event-ID header, else ?lastEventId=; absent or empty: no resume point. Anything
    but a seq (0 to 2^63-1) is a ValueError, answered 400."""
    raw = request.headers.get("last-event-id") or request.query_params.get("lastEventId")
    if raw is None or raw.strip() == "":
        return None
    if not _SEQ.fullmatch(raw.strip()) or int(raw) > _MAX_SEQ:
        raise ValueError(raw)
    return int(raw)


async def _open_stream(request: Request) -> Response | EventStreamResponse:
    license_id = request.path_params["license_id"]
    grant = _authorize(request, license_id)
    if isinstance(grant, Response):
        return grant
    machine = None
    if grant.machine_id is not None:
        # A machine token: refused as soon as its machine is released. The check also marks the
        # machine seen; while the stream stays open, broker.licensing.watch keeps it so.
        refused = await _released(request, grant)
        if refused is not None:
            return refused
        machine = StreamMachine(request.state.runtime.settings, license_id, grant)
    try:
        last_seq = _resume_point(request)
    except ValueError:
        return JSONResponse({"error": "Last-Event-ID must be a non-negative integer"}, status_code=400)
    runtime: Runtime = request.state.runtime
    hub: SubscriptionHub = request.state.hub
    if hub.closing:
        return JSONResponse({"error": "shutting down"}, status_code=503, headers={"retry-after": "1"})
    admission: StreamAdmission = request.state.admission
    try:
        slot = admission.admit(license_id)
    except StreamRefused as refused:
        metrics.STREAMS_REFUSED.labels(refused.limit).inc()
        headers = {"retry-after": str(refused.retry_after)}
        return JSONResponse({"error": refused.reason}, status_code=refused.status, headers=headers)
    body = license_stream(
        request.state.stream_events,
        hub,
        runtime.settings,
        license_id,
        last_seq,
        runtime.leases,
        expires_at=grant.expires_at,
        machine=machine,
    )
    return EventStreamResponse(body, send_timeout=runtime.settings.send_timeout, on_close=slot.release)


async def _released(request: Request, grant: tokens.Grant) -> Response | None:
    """401 for the token of a released machine (503 without the database), else None."""
    assert grant.machine_id is not None
    desk: Desktop | None = request.state.desktop
    if desk is None:
        return _unauthorized()  # keys are off: no machine can be active
    events: ThrottledEventLog = request.state.stream_events
    try:
        # Through the stream side's bounded share of the pool, like the catch-up's reads.
        async with events.slots:
            machine = await desk.machines.seen(grant.license_id, grant.machine_id)
    except SQLAlchemyError:
        return desktop.unavailable()
    return desktop.released() if machine is None else None


class LicenseEvents:
    """GET /api/licenses/{license_id}/events, as an ASGI app rather than a request handler:
    starlette's request_response wrapper would keep two more coroutine frames, two closures and
    a Request alive for the whole life of every stream (~2 KB each; docs/bench.md). The Request
    here is dropped once the stream is decided. A StreamRoute: no middleware but the request id."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = await _open_stream(Request(scope))
        await response(scope, receive, send)


async def license_state(request: Request) -> Response:
    license_id = request.path_params["license_id"]
    if isinstance(grant := _authorize(request, license_id), Response):
        return grant
    if grant.machine_id is not None and (refused := await _released(request, grant)) is not None:
        return refused
    events: EventLog = request.state.stream_events
    try:
        current = await events.current(license_id)
    except SQLAlchemyError:
        return desktop.unavailable()
    leases = request.state.runtime.leases
    extra = None
    if grant.machine_id is not None and leases is not None:
        # A machine's lease names the machine, as on its stream.
        extra = StreamMachine(request.state.runtime.settings, license_id, grant).lease_claims()
    return Response(with_lease(current, leases, extra), media_type="application/json")


async def jwks(request: Request) -> Response:
    """The public keys that verify leases (none without LICENSE_SIGNING_KEY). Cacheable for a
    while: a rotation publishes the next key well before it signs (docs/desktop.md)."""
    leases = request.state.runtime.leases
    body = leases.jwks() if leases is not None else b'{"keys":[]}'
    return Response(body, media_type="application/json", headers={"cache-control": "public, max-age=300"})


routes = [
    StreamRoute("/api/licenses/{license_id}/events", LicenseEvents(), methods=["GET"]),
    Route("/api/licenses/{license_id}", license_state, methods=["GET"]),
    Route("/.well-known/jwks.json", jwks, methods=["GET"]),
    # Keys and machines (docs/protocol.md), and the buyer's /activate page.
    *desktop.routes,
    *activate.routes,
    # Buying, trying and managing from the app (docs/protocol.md).
    *purchase.routes,
]


def _end_streams_on_exit(hub: SubscriptionHub) -> None:
    """Chain onto the server's SIGTERM/SIGINT handlers: streams never end by themselves, so a
    graceful shutdown would otherwise wait for them until its timeout. Ended streams reconnect
    to another process and resume from Last-Event-ID."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            previous = signal.getsignal(sig)
        except ValueError:
            return
        if not callable(previous):
            continue

        def handler(signum: int, frame: Any, previous: Any = previous) -> None:
            loop.call_soon_threadsafe(hub.end_streams)
            previous(signum, frame)

        try:
            signal.signal(sig, handler)
        except ValueError:  # not the main thread (an app inside a test client)
            return


@asynccontextmanager
async def stream_state(runtime: Runtime) -> AsyncIterator[dict[str, Any]]:
    settings = runtime.settings
    # Every database read of the stream side (catch-up, gap fills) goes through this one, bounded
    # below the pool; the sweep's one query per interval is the transport's own.
    events = ThrottledEventLog(runtime.engine, settings.stream_db_slots)
    hub = SubscriptionHub(runtime.transport, buffer=settings.client_buffer)
    await hub.start()
    _end_streams_on_exit(hub)
    admission = StreamAdmission(settings.max_streams, settings.max_streams_per_license)
    log.info(runtime.leases.describe() if runtime.leases is not None else NO_LEASES)
    try:
        async with open_desktop(runtime, hub, events) as desk:
            if desk is not None:
                hub.on_notice = desk.watch.prompt
            yield {"hub": hub, "stream_events": events, "admission": admission, "desktop": desk}
    finally:
        await hub.close()


def create_app(settings: Settings | None = None) -> Starlette:
    if settings is None:
        settings = settings_from_env(Settings.require_stream)
    settings.require_stream()
    return build_app(settings, [Part(routes, stream_state)])


def __getattr__(name: str) -> Any:
    # `stream.app:app` is built when uvicorn asks for it, not at import.
    if name == "app":
        return create_app()
    raise AttributeError(name)


__all__ = ["create_app", "routes", "stream_state"]
