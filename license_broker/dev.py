"""Development-only endpoints behind the live page's buttons: a subscriber token for any license,
and simulated Stripe events. Mounted by `serve` only when BROKER_DEV is set (see embedded.py),
which itself is refused outside `serve` on a loopback host with SQLite
(Settings.require_development_ok): they hand out tokens to anyone who asks, so they must never
exist in production. They answer only requests addressed to a loopback name that no proxy
forwarded, and the POSTs only with a JSON body."""

from __future__ import annotations

import contextlib
import re
from typing import Any

import httpx
import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from broker.runtime import Runtime
from broker.signing import leases, tokens
from broker.web.body import BodyRefused, read_body
from broker.web.ops import forwarded
from broker.web.requestlog import REQUEST_ID
from webhook.sample_actions import ACTIONS
from webhook.samples import SampleEvents, explain

TOKEN_TTL = 3600
# A license id and an action: a few dozen bytes.
MAX_BODY = 4096
_LICENSE_ID = re.compile(r"[A-Za-z0-9_.:-]{1,100}")
# DNS rebinding: a page on evil.example whose name is made to resolve to 127.0.0.1 reaches this
# process, but its requests still carry `Host: evil.example`.
_LOOPBACK_HOST = re.compile(r"(?:127\.0\.0\.1|localhost|\[::1\])(?::[0-9]{1,5})?", re.IGNORECASE)


def _refused(request: Request) -> Response | None:
    """403 unless the request is addressed to a loopback name and no proxy forwarded it: a proxy
    on this machine that passes (or rewrites) Host to 127.0.0.1 would otherwise open these routes
    to whoever reaches the proxy."""
    hosts = request.headers.getlist("host")
    if len(hosts) != 1 or not _LOOPBACK_HOST.fullmatch(hosts[0]):
        return JSONResponse({"error": "development routes answer only to 127.0.0.1, localhost or [::1]"}, 403)
    if forwarded(request):
        return JSONResponse(
            {"error": "development routes answer no proxied request (Forwarded, X-Forwarded-*, Via)"}, 403
        )
    return None


async def _json_object(request: Request) -> dict[str, Any] | Response:
    """The request's JSON object, or the response that refuses it."""
    if (refused := _refused(request)) is not None:
        return refused
    # A cross-site page may POST text/plain (a form, a no-cors fetch) without asking; JSON takes
    # a CORS preflight, which nothing here answers, so the browser never sends it.
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != "application/json":
        return JSONResponse({"error": "expected Content-Type: application/json"}, status_code=415)
    try:
        raw = await read_body(request, MAX_BODY)
    except BodyRefused as exc:
        return exc.response()
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        body = None
    return body if isinstance(body, dict) else _bad("expected a JSON object")


def _license_id(body: dict[str, Any]) -> str | None:
    value = body.get("license_id")
    return value if isinstance(value, str) and _LICENSE_ID.fullmatch(value) else None


def _bad(message: str) -> Response:
    return JSONResponse({"error": message}, status_code=400)


async def _license_request(request: Request) -> tuple[dict[str, Any], str] | Response:
    """The JSON object of a dev request and the license it names, or the 4xx to answer."""
    body = await _json_object(request)
    if isinstance(body, Response):
        return body
    license_id = _license_id(body)
    if license_id is None:
        return _bad("license_id: letters, digits and _.:- (at most 100)")
    return body, license_id


async def dev_token(request: Request) -> Response:
    asked = await _license_request(request)
    if isinstance(asked, Response):
        return asked
    _, license_id = asked
    runtime: Runtime = request.state.runtime
    token = tokens.mint_for(runtime.settings, license_id, ttl=TOKEN_TTL)
    return JSONResponse({"license_id": license_id, "token": token, "expires_in": TOKEN_TTL})


def _own_url(request: Request) -> str:
    # The socket this request came in on: this very process, whatever proxy headers say.
    server = request.scope.get("server")
    if server and server[1] is not None:
        host = "127.0.0.1" if server[0] in ("0.0.0.0", "::") else server[0]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{server[1]}"
    return str(request.base_url).rstrip("/")


async def dev_simulate(request: Request) -> Response:
    """Sign the sample events of `action` with the webhook secret and POST them to this process's
    own webhook endpoint, as Stripe would: the same verification, transaction, publish and logs."""
    asked = await _license_request(request)
    if isinstance(asked, Response):
        return asked
    body, license_id = asked
    action = body.get("action")
    if action not in ACTIONS:
        return _bad(f"action: one of {', '.join(ACTIONS)}")
    runtime: Runtime = request.state.runtime
    secret = runtime.settings.webhook_secrets[0]
    results: list[dict[str, Any]] = []
    deliveries = SampleEvents(license_id).deliveries(action, secret)
    async with httpx.AsyncClient(base_url=_own_url(request), timeout=10) as client:
        for i, (event, payload, headers) in enumerate(deliveries):
            # The webhook's log lines then carry the id of the click that caused them.
            headers["x-request-id"] = REQUEST_ID.get() or ""
            response = await client.post("/api/stripe/webhooks", content=payload, headers=headers)
            result = {"type": event["type"], "id": event["id"], "object": event["data"]["object"].get("id")}
            results.append(result | {"status": response.status_code})
            with contextlib.suppress(ValueError):  # not JSON: the status says enough
                results[-1].update(response.json())
            if response.status_code >= 300:
                return JSONResponse({"action": action, "events": results}, status_code=502)
            # Why a "pending" or "unchanged" event changed nothing (what `send` prints too).
            if note := explain(str(results[-1].get("outcome")), event, [e for e, _, _ in deliveries[i + 1 :]]):
                results[-1]["note"] = note
    return JSONResponse({"action": action, "events": results})


async def dev_public_key(request: Request) -> Response:
    """The public half of this run's lease key, as `license-broker keys public` prints a configured
    one: what an app under development pins (`curl -o public-key.pem`). A new key at each start."""
    if (refused := _refused(request)) is not None:
        return refused
    signer: leases.LeaseSigner | None = request.state.runtime.leases
    if signer is None:  # BROKER_DEV always signs; an app built from other settings may not
        return JSONResponse({"error": "this server signs no leases"}, status_code=404)
    return PlainTextResponse(leases.public_pems(signer.keys), media_type="application/x-pem-file")


routes = [
    Route("/dev/token", dev_token, methods=["POST"]),
    Route("/dev/simulate", dev_simulate, methods=["POST"]),
    Route("/dev/public-key.pem", dev_public_key, methods=["GET"]),
]
