"""What every app serves besides its own routes: health, readiness, metrics; and who is asking."""

from __future__ import annotations

import hmac
import sys
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from broker.runtime import Runtime
from broker.settings import Settings, SettingsError, is_loopback

_PROXY_HEADERS = ("forwarded", "via", "x-real-ip")


def forwarded(request: Request) -> bool:
    """Whether a proxy handled the request (Forwarded, X-Forwarded-*, X-Real-IP, Via). A proxy on
    this machine connects from a loopback address, so a peer address or Host check alone would
    take any request it forwards from anywhere for a local one."""
    # Names in lower case, as ASGI servers hand them over.
    return any(name in _PROXY_HEADERS or name.startswith("x-forwarded-") for name in request.headers)


def local_peer(request: Request) -> bool:
    """A request from this machine, not forwarded by a proxy: the peer's address (uvicorn has
    already replaced it with X-Forwarded-For's when a trusted proxy sent one) is loopback."""
    client = request.client
    return client is not None and is_loopback(client.host) and not forwarded(request)


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
    """503 without the database; 200 "degraded" without the transport (see broker.web.readiness). The
    answer may be up to a second old: a flood of probes costs one database check per second."""
    runtime: Runtime = request.state.runtime
    ready = await runtime.readiness.check()
    body = {
        "status": ready.status,
        "database": "ok" if ready.database else "unavailable",
        "transport": "ok" if ready.transport else "unavailable",
        "transport_name": ready.transport_name,
    }
    return JSONResponse(body, status_code=503 if ready.status == "unavailable" else 200)


async def metrics(request: Request) -> Response:
    settings: Settings = request.state.runtime.settings
    if settings.metrics_port is not None:
        # Served on METRICS_PORT instead (broker.web.metrics_server), never on the public port.
        return JSONResponse({"error": "not found"}, status_code=404)
    if settings.metrics_token is not None:
        header = request.headers.get("authorization", "")
        given = header[7:].strip() if header[:7].lower() == "bearer " else ""
        # Constant time: the comparison must not tell how much of a guess was right.
        if not hmac.compare_digest(given.encode(), settings.metrics_token.encode()):
            return JSONResponse({"error": "invalid token"}, status_code=401, headers={"www-authenticate": "Bearer"})
    elif not local_peer(request):
        # Neither its own port nor a token: the public port answers a scraper on this machine only
        # (what is connected, how many, how fast is no one else's business).
        message = "/metrics answers only this machine without METRICS_TOKEN (or METRICS_PORT)"
        return JSONResponse({"error": message}, status_code=403)
    return PlainTextResponse(generate_latest(), media_type=CONTENT_TYPE_LATEST)


def ops_routes() -> list[Route]:
    return [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
