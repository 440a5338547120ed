"""The SSE ASGI app: `uvicorn stream.app:app`."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy.exc import SQLAlchemyError
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from broker import tokens
from broker.http import ops_routes, settings_from_env
from broker.requestlog import RequestIdMiddleware
from broker.runtime import Runtime, open_runtime
from broker.settings import Settings
from stream.catchup import license_stream
from stream.hub import SubscriptionHub
from stream.sse import EventStreamResponse

log = logging.getLogger("stream")


def _authorize(request: Request, license_id: str) -> Response | None:
    """401 without a valid token, 403 for a token of another license."""
    header = request.headers.get("authorization", "")
    token = header[7:].strip() if header[:7].lower() == "bearer " else request.query_params.get("token")
    if not token:
        return JSONResponse({"error": "missing token"}, status_code=401, headers={"www-authenticate": "Bearer"})
    try:
        granted = tokens.verify(request.state.runtime.settings.token_secret, token)
    except tokens.InvalidToken as exc:
        return JSONResponse({"error": f"invalid token: {exc}"}, status_code=401, headers={"www-authenticate": "Bearer"})
    if granted != license_id:
        return JSONResponse({"error": "token is for another license"}, status_code=403)
    return None


def _resume_point(request: Request) -> int | None:
    raw = request.headers.get("last-event-id") or request.query_params.get("lastEventId")
    if raw is None or raw.strip() == "":
        return None
    value = int(raw)  # ValueError -> 400 in the caller
    if value < 0:
        raise ValueError(raw)
    return value


async def license_events(request: Request) -> Response:
    license_id = request.path_params["license_id"]
    if (denied := _authorize(request, license_id)) is not None:
        return denied
    try:
        last_seq = _resume_point(request)
    except ValueError:
        return JSONResponse({"error": "Last-Event-ID must be a non-negative integer"}, status_code=400)
    runtime: Runtime = request.state.runtime
    hub: SubscriptionHub = request.state.hub
    if hub.closing:
        return JSONResponse({"error": "shutting down"}, status_code=503, headers={"retry-after": "1"})
    body = license_stream(runtime.events, hub, runtime.settings, license_id, last_seq)
    return EventStreamResponse(body, send_timeout=runtime.settings.send_timeout)


async def license_state(request: Request) -> Response:
    license_id = request.path_params["license_id"]
    if (denied := _authorize(request, license_id)) is not None:
        return denied
    runtime: Runtime = request.state.runtime
    try:
        current = await runtime.events.current(license_id)
    except SQLAlchemyError:
        return JSONResponse({"error": "database unavailable"}, status_code=503)
    return Response(current.data, media_type="application/json")


routes = [
    Route("/api/licenses/{license_id}/events", license_events, methods=["GET"]),
    Route("/api/licenses/{license_id}", license_state, methods=["GET"]),
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
    hub = SubscriptionHub(runtime.transport, buffer=settings.client_buffer)
    await hub.start()
    _end_streams_on_exit(hub)
    try:
        yield {"hub": hub}
    finally:
        await hub.close()


def create_app(settings: Settings | None = None) -> Starlette:
    if settings is None:
        settings = settings_from_env(Settings.require_stream)
    settings.require_stream()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        async with open_runtime(settings) as runtime, stream_state(runtime) as state:
            yield {"runtime": runtime, **state}

    return Starlette(routes=[*routes, *ops_routes()], lifespan=lifespan, middleware=[Middleware(RequestIdMiddleware)])


def __getattr__(name: str) -> Any:
    # `stream.app:app` is built when uvicorn asks for it, not at import.
    if name == "app":
        return create_app()
    raise AttributeError(name)


__all__ = ["create_app", "routes", "stream_state"]
