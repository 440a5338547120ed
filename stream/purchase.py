"""Buying, trying and managing from the app (docs/protocol.md): `POST /api/checkout`,
`POST /api/trials`, `POST /api/portal`. Each checks its input and its bounds, calls a use case of
broker.licensing and answers; all are off (404) without LICENSE_KEY_SECRET, and each without its
own setting (STRIPE_PRICES, LICENSE_TRIAL_DAYS, STRIPE_API_KEY; development mode has all three)."""

from __future__ import annotations

import logging

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from broker.licensing.checkout import AlreadyEntitled, Buyer, TooManyPending
from broker.licensing.gateway import GatewayRefused, GatewayUnavailable
from broker.licensing.machines import BadRequest, fingerprint_of, label
from broker.licensing.metrics import CHECKOUTS as CHECKOUT_OUTCOMES
from broker.licensing.metrics import PORTALS as PORTAL_OUTCOMES
from broker.licensing.metrics import TRIALS as TRIAL_OUTCOMES
from broker.licensing.portal import NoCustomer
from broker.licensing.ratelimit import CHECKOUTS, PORTALS, TRIALS, Limit
from broker.licensing.trials import TrialUsed
from stream.desktop import Caller, Desktop, authenticate, client_bucket, error, json_body, keyed

log = logging.getLogger("stream.purchase")


def origin(request: Request, desktop: Desktop) -> str:
    """Where buyers reach this broker: PUBLIC_URL, else (development mode) the origin served."""
    return desktop.settings.public_url or str(request.base_url).rstrip("/")


async def _bounded(request: Request, desktop: Desktop, limit: Limit, what: str) -> Response | None:
    """429 once this address has asked for `limit.attempts` of these in the window."""
    retry = await desktop.limiter.retry_after(limit, [client_bucket(request)])
    if retry is None:
        return None
    return JSONResponse(
        {"error": f"too many {what} from your network, try again later"},
        status_code=429,
        headers={"retry-after": str(retry)},
    )


def _stripe_failed(exc: Exception) -> Response:
    if isinstance(exc, GatewayUnavailable):
        return JSONResponse({"error": str(exc)}, status_code=503, headers={"retry-after": "5"})
    return error(str(exc), 502)


@keyed
async def checkout(request: Request, desktop: Desktop) -> Response:
    if desktop.checkouts is None:
        return error("buying from the app is off on this server (STRIPE_PRICES is not set)", 404)
    caller: Caller | None = None
    if request.headers.get("authorization"):
        authenticated = await authenticate(request, desktop, key=False)
        if isinstance(authenticated, Response):
            return authenticated
        if authenticated.machine_id is None:
            return error("a checkout is for a machine: call it with a machine token, or with none", 403)
        caller = authenticated
    if (refused := await _bounded(request, desktop, CHECKOUTS, "checkouts")) is not None:
        CHECKOUT_OUTCOMES.labels("throttled").inc()
        return refused
    body = await json_body(request)
    if isinstance(body, Response):
        return body
    address = client_bucket(request)
    try:
        price = desktop.checkouts.price(body.get("price"))
        if caller is not None:
            assert caller.fingerprint is not None
            given = body.get("fingerprint")
            if given is not None and fingerprint_of(given) != caller.fingerprint.lower():
                raise BadRequest("fingerprint: not the machine of this token")
            buyer = Buyer(address, caller.fingerprint, license_id=caller.license_id, machine_id=caller.machine_id)
        else:
            buyer = Buyer(
                address,
                fingerprint_of(body.get("fingerprint")),
                label(body.get("name"), "name", 200),
                label(body.get("platform"), "platform", 100),
            )
    except BadRequest as exc:
        return error(str(exc), 400)
    # Every checkout asked for counts, made or not: each may be a license, a machine and a session.
    await desktop.failed(request, CHECKOUTS)
    base = origin(request, desktop)
    try:
        started = await desktop.checkouts.start(
            buyer, price, success_url=f"{base}/activate?session_id={{CHECKOUT_SESSION_ID}}", origin=base
        )
    except TooManyPending:
        CHECKOUT_OUTCOMES.labels("pending_limit").inc()
        return JSONResponse(
            {"error": "too many unpaid checkouts from your network, try again later"},
            status_code=429,
            headers={"retry-after": "600"},
        )
    except AlreadyEntitled:
        CHECKOUT_OUTCOMES.labels("entitled").inc()
        return error("this license is paid for already: manage it with POST /api/portal", 409)
    except (GatewayUnavailable, GatewayRefused) as exc:
        CHECKOUT_OUTCOMES.labels(
            "stripe_unavailable" if isinstance(exc, GatewayUnavailable) else "stripe_refused"
        ).inc()
        return _stripe_failed(exc)
    CHECKOUT_OUTCOMES.labels("created").inc()
    return JSONResponse(started.body(), status_code=201)


@keyed
async def start_trial(request: Request, desktop: Desktop) -> Response:
    if desktop.trials is None or desktop.trials.length is None:
        return error("trials are off on this server (LICENSE_TRIAL_DAYS is not set)", 404)
    if (refused := await _bounded(request, desktop, TRIALS, "trials")) is not None:
        TRIAL_OUTCOMES.labels("throttled").inc()
        return refused
    body = await json_body(request)
    if isinstance(body, Response):
        return body
    try:
        fingerprint = fingerprint_of(body.get("fingerprint"))
        name = label(body.get("name"), "name", 200)
        platform = label(body.get("platform"), "platform", 100)
    except BadRequest as exc:
        return error(str(exc), 400)
    # Started or refused, every trial asked for counts (a 409 says which fingerprints had one).
    await desktop.failed(request, TRIALS)
    try:
        started = await desktop.trials.start(fingerprint, name, platform)
    except TrialUsed:
        TRIAL_OUTCOMES.labels("used").inc()
        return error("this machine has had its trial", 409)
    TRIAL_OUTCOMES.labels("started").inc()
    return JSONResponse(started.body(), status_code=201)


@keyed
async def open_portal(request: Request, desktop: Desktop) -> Response:
    if desktop.portal is None:
        return error("the billing portal is off on this server (STRIPE_API_KEY is not set)", 404)
    caller = await authenticate(request, desktop, key=False)
    if isinstance(caller, Response):
        return caller
    bucket = f"license:{caller.license_id}"
    if (refused := await desktop.limiter.retry_after(PORTALS, [bucket])) is not None:
        return JSONResponse(
            {"error": "too many portal sessions, try again later"},
            status_code=429,
            headers={"retry-after": str(refused)},
        )
    await desktop.limiter.failed(PORTALS, [bucket])
    try:
        url = await desktop.portal.open(caller.license_id, origin(request, desktop))
    except NoCustomer:
        PORTAL_OUTCOMES.labels("no_customer").inc()
        return error("this license has no Stripe customer yet (nothing bought): nothing to manage", 409)
    except (GatewayUnavailable, GatewayRefused) as exc:
        PORTAL_OUTCOMES.labels("stripe_unavailable" if isinstance(exc, GatewayUnavailable) else "stripe_refused").inc()
        return _stripe_failed(exc)
    PORTAL_OUTCOMES.labels("created").inc()
    return JSONResponse({"url": url})


routes = [
    Route("/api/checkout", checkout, methods=["POST"]),
    Route("/api/trials", start_trial, methods=["POST"]),
    Route("/api/portal", open_portal, methods=["POST"]),
]
