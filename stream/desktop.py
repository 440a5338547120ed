"""The routes a desktop app calls besides its stream (docs/protocol.md): activate with a key,
list and release machines, renew a machine token, show the key again. Each one checks its input,
calls a use case of broker.licensing and answers; everything is off (404) without
LICENSE_KEY_SECRET."""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson
from sqlalchemy.exc import SQLAlchemyError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from broker.licensing import keys
from broker.licensing.checkout import Checkouts
from broker.licensing.gateway import Gateway, LocalGateway
from broker.licensing.machines import BadRequest, InvalidKey, LimitReached, Machines, fingerprint_of, label
from broker.licensing.metrics import ACTIVATIONS as ACTIVATION_OUTCOMES
from broker.licensing.pending import PendingCheckouts
from broker.licensing.portal import Portal
from broker.licensing.ratelimit import ACTIVATIONS, Limit, RateLimiter, address_bucket, create_rate_limiter
from broker.licensing.sessions import SessionWatch
from broker.licensing.store import KeyStore
from broker.licensing.trials import TrialClock, Trials
from broker.licensing.watch import HeldStreams, MachineWatch
from broker.runtime import Runtime
from broker.settings import Settings
from broker.signing import tokens
from broker.storage.eventlog import EventLog
from broker.stripe_ledger.ledger import LicenseRules
from broker.web.body import BodyRefused, read_body

log = logging.getLogger("stream.desktop")

# An activation is a key, a fingerprint, a name and a platform: a few hundred bytes.
MAX_BODY = 4096


@dataclass(frozen=True)
class Desktop:
    """What the desktop-facing routes use, built once per process when keys are on."""

    settings: Settings
    keys: KeyStore
    machines: Machines
    limiter: RateLimiter
    sessions: SessionWatch
    watch: MachineWatch
    # Buying, trying and managing from the app (stream.purchase): None where off.
    checkouts: Checkouts | None = None
    trials: Trials | None = None  # ends trials whatever the setting; starts them with LICENSE_TRIAL_DAYS
    portal: Portal | None = None
    pending: PendingCheckouts | None = None

    async def refused(self, request: Request, limit: Limit, *buckets: str) -> Response | None:
        """429 while the client's address (or one of `buckets`) has failed too often."""
        retry = await self.limiter.retry_after(limit, [client_bucket(request), *buckets])
        if retry is None:
            return None
        return JSONResponse(
            {"error": "too many failed attempts, try again later"}, status_code=429, headers={"retry-after": str(retry)}
        )

    async def failed(self, request: Request, limit: Limit, *buckets: str) -> None:
        await self.limiter.failed(limit, [client_bucket(request), *buckets])

    def key_bucket(self, key: str) -> str:
        return "key:" + self.keys.vault.digests(key)[0][:16].hex()

    def open_url(self, key: str) -> str | None:
        scheme = self.settings.app_url_scheme
        return f"{scheme}://activate?key={keys.display(key)}" if scheme else None


@asynccontextmanager
async def open_desktop(runtime: Runtime, streams: HeldStreams, events: EventLog) -> AsyncIterator[Desktop | None]:
    settings = runtime.settings
    if settings.license_keys is None:
        log.info("license keys: LICENSE_KEY_SECRET is not set; activations and machines are off")
        yield None
        return
    key_store = KeyStore(runtime.engine, settings.license_keys)
    machines = Machines(runtime.engine, settings, key_store, runtime.transport, events, runtime.leases)
    limiter = create_rate_limiter(settings)
    sessions = SessionWatch(runtime.engine)
    watch = MachineWatch(
        runtime.engine, streams, machines, sweep_interval=settings.poll_interval, machine_ttl=settings.machine_ttl
    )
    gateway = open_gateway(settings)
    checkouts = Checkouts(runtime.engine, settings, gateway, events) if gateway and settings.stripe_prices else None
    pending = (
        PendingCheckouts(runtime.engine, gateway, machines, ttl=settings.checkout_pending_ttl) if gateway else None
    )
    # The clock runs with trials off too: trials started before LICENSE_TRIAL_DAYS was unset still end.
    rules = LicenseRules.from_settings(settings)
    trials = Trials(runtime.engine, machines, runtime.transport, rules, settings.trial_days)
    clock = TrialClock(trials)
    trials.on_start = clock.wake
    portal = Portal(settings, gateway, events) if gateway else None
    sessions.start()
    watch.start()
    for task in (pending, clock):
        if task is not None:
            task.start()
    try:
        yield Desktop(settings, key_store, machines, limiter, sessions, watch, checkouts, trials, portal, pending)
    finally:
        for task in (clock, pending):
            if task is not None:
                await task.close()
        if gateway is not None:
            await gateway.close()
        await watch.close()
        await sessions.close()
        await limiter.close()


def open_gateway(settings: Settings) -> Gateway | None:
    """Stripe's API with STRIPE_API_KEY; development mode's own pages without one; else none (no
    I/O until a checkout or a portal session is asked for)."""
    if settings.stripe_api_key is not None:
        from broker.licensing.stripe_gateway import StripeGateway  # loads `stripe` only when it is used

        return StripeGateway(settings.stripe_api_key, settings.stripe_api_base)
    return LocalGateway() if settings.dev else None


def client_bucket(request: Request) -> str:
    # The peer uvicorn gives: a proxy's forwarded address only where FORWARDED_ALLOW_IPS trusts it.
    return address_bucket(request.client.host if request.client else None)


def error(message: str, status: int, **extra: Any) -> Response:
    return JSONResponse({"error": message, **extra}, status_code=status)


def keys_off() -> Response:
    return error("license keys are off on this server (LICENSE_KEY_SECRET is not set)", 404)


def unavailable() -> Response:
    return JSONResponse({"error": "database unavailable"}, status_code=503, headers={"retry-after": "2"})


R = TypeVar("R")  # what the handler answers: a Response, or a stream


def keyed(handler: Callable[[Request, Desktop], Awaitable[R]]) -> Callable[[Request], Awaitable[R | Response]]:
    """A route of license keys (activation, machines, buying, trials, the portal, the activation
    page's reads), given the process's Desktop: 404 while license keys are off (there is none),
    and 503 with Retry-After whenever the database fails under the handler, wherever that is."""

    @functools.wraps(handler)
    async def route(request: Request) -> R | Response:
        desktop: Desktop | None = request.state.desktop
        if desktop is None:
            return keys_off()
        try:
            return await handler(request, desktop)
        except SQLAlchemyError:
            return unavailable()

    return route


async def json_body(request: Request) -> dict[str, Any] | Response:
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != "application/json":
        return error("expected Content-Type: application/json", 415)
    try:
        raw = await read_body(request, MAX_BODY)
    except BodyRefused as exc:
        return exc.response()
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        body = None
    return body if isinstance(body, dict) else error("expected a JSON object", 400)


@dataclass(frozen=True, slots=True)
class Caller:
    license_id: str
    machine_id: str | None = None  # a machine token's machine
    fingerprint: str | None = None


def _unauthorized() -> Response:
    return JSONResponse(
        {"error": "invalid token"}, status_code=401, headers={"www-authenticate": 'Bearer, License realm="key"'}
    )


async def authenticate(request: Request, desktop: Desktop, *, key: bool = True) -> Caller | Response:
    """For a `keyed` route: `Authorization: Bearer <token>` (a machine token, whose machine must still be active, or a
    subscriber token minted by the seller's web app) or, where `key`, `Authorization: License
    <key>` (an app whose activation met the limit has no token yet)."""
    scheme, _, value = request.headers.get("authorization", "").strip().partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer" and value:
        try:
            grant = tokens.verify_for(desktop.settings, value)
        except tokens.InvalidToken as exc:
            log.info("token refused: %s", exc)
            return _unauthorized()
        if grant.machine_id is None:
            return Caller(grant.license_id)
        machine = await desktop.machines.seen(grant.license_id, grant.machine_id)
        if machine is None:
            return released()
        return Caller(grant.license_id, grant.machine_id, grant.fingerprint)
    if scheme.lower() == "license" and key and value:
        if (refused := await desktop.refused(request, ACTIVATIONS)) is not None:
            return refused
        try:
            normalised = keys.normalize(value)
        except keys.MalformedKey:
            await desktop.failed(request, ACTIVATIONS)
            return error("malformed key", 400)
        license_id = await desktop.keys.find(normalised)
        if license_id is None:
            await desktop.failed(request, ACTIVATIONS)
            return error("invalid key", 403)
        return Caller(license_id)
    return _unauthorized()


def released() -> Response:
    # The holder of this token knew a machine; telling it that the machine was released (so that
    # the app asks for the key again) tells it nothing else.
    return JSONResponse(
        {"error": "machine released"}, status_code=401, headers={"www-authenticate": 'Bearer error="invalid_token"'}
    )


@keyed
async def activate(request: Request, desktop: Desktop) -> Response:
    if (refused := await desktop.refused(request, ACTIVATIONS)) is not None:
        ACTIVATION_OUTCOMES.labels("throttled").inc()
        return refused
    body = await json_body(request)
    if isinstance(body, Response):
        return body
    text = body.get("key")
    try:
        if not isinstance(text, str):
            raise keys.MalformedKey("not a string")
        key = keys.normalize(text)
    except keys.MalformedKey:
        ACTIVATION_OUTCOMES.labels("malformed").inc()
        await desktop.failed(request, ACTIVATIONS)
        return error("malformed key", 400)
    try:
        fingerprint = fingerprint_of(body.get("fingerprint"))
        name = label(body.get("name"), "name", 200)
        platform = label(body.get("platform"), "platform", 100)
    except BadRequest as exc:
        return error(str(exc), 400)
    key_bucket = desktop.key_bucket(key)
    if (refused := await desktop.refused(request, ACTIVATIONS, key_bucket)) is not None:
        ACTIVATION_OUTCOMES.labels("throttled").inc()
        return refused
    try:
        activated = await desktop.machines.activate(key, fingerprint, name, platform)
    except InvalidKey:
        # Unknown and rotated keys alike: the answer tells a guesser nothing.
        ACTIVATION_OUTCOMES.labels("invalid").inc()
        await desktop.failed(request, ACTIVATIONS)
        return error("invalid key", 403)
    except LimitReached as full:
        ACTIVATION_OUTCOMES.labels("limit").inc()
        await desktop.failed(request, ACTIVATIONS, key_bucket)
        listed = [m.public() for m in full.machines]
        return error("machine limit reached", 409, machines=listed, max=full.limit)
    ACTIVATION_OUTCOMES.labels("created" if activated.created else "again").inc()
    return JSONResponse(activated.body(), status_code=201 if activated.created else 200)


@keyed
async def list_machines(request: Request, desktop: Desktop) -> Response:
    caller = await authenticate(request, desktop)
    if isinstance(caller, Response):
        return caller
    found, limit = await desktop.machines.list(caller.license_id)
    listed = [m.public() | {"current": m.id == caller.machine_id} for m in found]
    return JSONResponse({"license_id": caller.license_id, "machines": listed, "used": len(found), "max": limit})


@keyed
async def release_machine(request: Request, desktop: Desktop) -> Response:
    caller = await authenticate(request, desktop)
    if isinstance(caller, Response):
        return caller
    machine_id = request.path_params["machine_id"]
    if len(machine_id) > 40 or "\x00" in machine_id:
        return error("no such machine", 404)
    done = await desktop.machines.release(caller.license_id, machine_id)
    if not done:
        return error("no such machine", 404)
    return JSONResponse({"id": machine_id, "released": True})


@keyed
async def renew_token(request: Request, desktop: Desktop) -> Response:
    caller = await authenticate(request, desktop, key=False)
    if isinstance(caller, Response):
        return caller
    if caller.machine_id is None or caller.machine_id != request.path_params["machine_id"]:
        return error("only a machine's own token renews it", 403)
    assert caller.fingerprint is not None
    grant = await desktop.machines.grant(caller.license_id, caller.machine_id, caller.fingerprint)
    body = {"machine_id": caller.machine_id, "token": grant.token, "exp": grant.token_expires_at, "lease": grant.lease}
    return JSONResponse(body)


@keyed
async def license_key(request: Request, desktop: Desktop) -> Response:
    caller = await authenticate(request, desktop, key=False)
    if isinstance(caller, Response):
        return caller
    license_id = request.path_params["license_id"]
    if caller.license_id != license_id:
        return error("token is for another license", 403)
    key = await desktop.keys.reveal(license_id)
    if key is None:
        return error("no such license", 404)
    return JSONResponse({"license_id": license_id, "key": keys.display(key), "open_url": desktop.open_url(key)})


routes = [
    Route("/api/activations", activate, methods=["POST"]),
    Route("/api/machines", list_machines, methods=["GET"]),
    Route("/api/machines/{machine_id}", release_machine, methods=["DELETE"]),
    Route("/api/machines/{machine_id}/token", renew_token, methods=["POST"]),
    Route("/api/licenses/{license_id}/key", license_key, methods=["GET"]),
]
