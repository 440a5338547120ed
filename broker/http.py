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


def settings_from_env(*checks: Callable[[Settings], None]) -> Settings:
    """Settings for an app started by uvicorn: a bad one stops the process with one line."""
    try:
        settings = Settings.from_env()
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
