"""The Stripe webhook ASGI app: `uvicorn webhook.app:app`."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from broker import metrics
from broker.ingest import AfterCommit, Ingestor, IngestUnavailable
from broker.runtime import Runtime
from broker.settings import Settings
from broker.stripe_ledger.ledger import LicenseRules
from broker.stripe_ledger.objects import EventFilter
from broker.stripe_ledger.refresh import open_refresher
from broker.web.asgi import Part, build_app
from broker.web.body import BodyRefused, read_body
from broker.web.ops import settings_from_env
from webhook.signature import BadWebhook, WebhookVerifier, single_header

log = logging.getLogger("webhook")


def _count(outcome: str) -> None:
    counter = metrics.WEBHOOKS_BY_OUTCOME.get(outcome)
    (counter if counter is not None else metrics.WEBHOOKS.labels(outcome)).inc()


def _json(body: dict[str, Any], status_code: int = 200) -> Response:
    # orjson: the answer is a few keys, and json.dumps' encoder setup costs more than encoding them.
    return Response(orjson.dumps(body), status_code, media_type="application/json")


async def receive_webhook(request: Request) -> Response:
    verifier: WebhookVerifier = request.state.verifier
    ingestor: Ingestor = request.state.ingestor
    runtime: Runtime = request.state.runtime
    try:
        payload = await read_body(request, runtime.settings.webhook_max_body)
    except BodyRefused as exc:
        _count("rejected")
        log.info("webhook rejected: %s", exc)
        return exc.response()
    try:
        event = verifier.verify(payload, single_header(request.headers.getlist("stripe-signature")))
    except BadWebhook as exc:
        _count("rejected")
        # The reason goes to the log only: the client learns nothing about the secrets.
        log.info("webhook rejected: %s", exc)
        return _json({"error": exc.public}, 400)
    try:
        outcome = await ingestor.ingest(event, payload)
    except IngestUnavailable as exc:
        # Nothing was committed (the database, or a read from Stripe's API the event cannot be
        # judged without, failed): Stripe retries on a 5xx.
        _count("error")
        log.error("webhook %s not recorded, %s unavailable: %s", event["id"], exc.what, exc)
        return _json({"error": f"{exc.what} unavailable, retry later"}, 503)
    _count(outcome.kind)
    appended = outcome.event
    if log.isEnabledFor(logging.INFO):  # the arguments cost more than the call when nothing is written
        log.info(
            "webhook %s %s -> %s%s",
            event["id"],
            event["type"],
            outcome.kind,
            f" license={outcome.license_id} seq={appended.seq}" if appended else "",
        )
    body: dict[str, Any] = {"received": True, "outcome": outcome.kind}
    if outcome.license_id:
        body["license_id"] = outcome.license_id
    if appended:
        body["seq"] = appended.seq
    return _json(body)


routes = [Route("/api/stripe/webhooks", receive_webhook, methods=["POST"])]


@asynccontextmanager
async def webhook_state(runtime: Runtime, after_commit: AfterCommit | None = None) -> AsyncIterator[dict[str, Any]]:
    settings = runtime.settings
    warn_about_mode(settings)
    async with open_refresher(settings) as refresher:
        yield {
            "verifier": WebhookVerifier(settings.webhook_secrets, settings.webhook_tolerance),
            "ingestor": Ingestor(
                runtime,
                LicenseRules.from_settings(settings),
                EventFilter(settings.stripe_livemode, settings.stripe_accounts),
                refresher,
                after_commit,
            ),
        }


def warn_about_mode(settings: Settings) -> None:
    if settings.stripe_livemode is None:
        log.warning("STRIPE_LIVEMODE is not set: test-mode and live-mode events both change licenses")


def create_app(settings: Settings | None = None, *, after_commit: AfterCommit | None = None) -> Starlette:
    if settings is None:
        settings = settings_from_env(Settings.require_webhook)
    settings.require_webhook()
    return build_app(settings, [Part(routes, lambda runtime: webhook_state(runtime, after_commit))])


def __getattr__(name: str) -> Any:
    # `webhook.app:app` is built when uvicorn asks for it, not at import.
    if name == "app":
        return create_app()
    raise AttributeError(name)
