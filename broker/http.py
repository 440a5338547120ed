"""What every app serves besides its own routes: health, readiness, metrics."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from broker.db import ping
from broker.runtime import Runtime
from broker.settings import Settings, SettingsError


class BodyTooLarge(Exception):
    """413: the request declared or sent more than the route accepts."""


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, or BodyTooLarge as soon as Content-Length or the bytes received pass
    `limit`: nothing beyond it is buffered (answer with too_large(), which closes the connection)."""
    declared = request.headers.get("content-length", "")
    # The HTTP server has already refused a malformed Content-Length; digits only here.
    if declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(f"Content-Length {declared} is over the limit of {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise BodyTooLarge(f"body is over the limit of {limit} bytes")
    return bytes(body)


def too_large() -> Response:
    # `connection: close` makes uvicorn close the socket once the 413 is sent; otherwise it keeps
    # reading (and discarding) the rest of the body until its keep-alive timeout.
    return JSONResponse({"error": "body too large"}, status_code=413, headers={"connection": "close"})


def settings_from_env(*checks: Callable[[Settings], None]) -> Settings:
    """Settings for an app started by uvicorn: a bad one stops the process with one line."""
    try:
        settings = Settings.from_env()
        settings.require_development_ok("uvicorn")
        for check in checks:
            check(settings)
        return settings
    except SettingsError as exc:
        print(f"license-broker: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    """503 without the database (nothing works); 200 "degraded" without the transport, because
    the database sweep still delivers (within BROKER_POLL_INTERVAL)."""
    runtime: Runtime = request.state.runtime
    try:
        await asyncio.wait_for(ping(runtime.engine), 5)
        database = "ok"
    except Exception:
        database = "unavailable"
    transport = "ok" if await runtime.transport.check() else "unavailable"
    status = "ok" if database == transport == "ok" else ("unavailable" if database != "ok" else "degraded")
    body = {"status": status, "database": database, "transport": transport, "transport_name": runtime.transport.name}
    return JSONResponse(body, status_code=503 if database != "ok" else 200)


async def metrics(request: Request) -> Response:
    return PlainTextResponse(generate_latest(), media_type=CONTENT_TYPE_LATEST)


def ops_routes() -> list[Route]:
    return [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
