"""The `license-broker` command."""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
from collections.abc import Sequence

import httpx
import orjson
import uvicorn
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from starlette.applications import Starlette

from broker import tokens
from broker.db import create_engine, migrate
from broker.runtime import Runtime
from broker.settings import DEV_WEBHOOK_SECRET, Settings, SettingsError
from license_broker import logs


def _tune_gc() -> None:
    """A full collection walks every object of every open connection: with the default thresholds
    a stream process holding 10,000 SSE connections paused for 0.3-0.9 s, several times a minute
    while clients came and went, and the redis p99 went from 15 ms to 800 ms (docs/bench.md).
    Young collections a little rarer, full ones ten times rarer. Called in each server process
    (uvicorn's workers are spawned, not forked, so they do not inherit it)."""
    gc.set_threshold(100_000, 20, 100)


def webhook_app() -> Starlette:
    from webhook.app import create_app

    _tune_gc()
    return create_app()


def stream_app() -> Starlette:
    from stream.app import create_app

    _tune_gc()
    return create_app()


def _server(app: object, args: argparse.Namespace, settings: Settings, *, factory: bool = False) -> None:
    _tune_gc()
    config = uvicorn.Config(
        app,  # type: ignore[arg-type]
        factory=factory,
        host=args.host,
        port=args.port,
        workers=getattr(args, "workers", None),
        loop="auto",
        http="auto",
        lifespan="on",
        log_config=logs.configure(settings),
        proxy_headers=True,
        # Streams end themselves on SIGTERM (stream.app); this bounds whatever else is open.
        timeout_graceful_shutdown=10,
    )
    if config.workers > 1:
        sock = config.bind_socket()
        uvicorn.supervisors.Multiprocess(config, sockets=[sock]).run()
    else:
        uvicorn.Server(config).run()


def _banner(args: argparse.Namespace) -> object:
    def on_ready(runtime: Runtime) -> None:
        settings = runtime.settings
        base = f"http://{args.host}:{args.port}"
        lines = [
            "",
            f"license-broker is serving on {base}",
            f"  database:  {settings.database_url}",
            f"  transport: {settings.transport}",
        ]
        if settings.dev:
            assert settings.token_secret is not None
            token = tokens.mint(settings.token_secret, "lic_demo", ttl=7 * 86400)
            lines += [
                f"  development webhook secret: {settings.webhook_secrets[0]}",
                "",
                "Try it. In one terminal, follow license lic_demo:",
                f"  curl -N -H 'Authorization: Bearer {token}' {base}/api/licenses/lic_demo/events",
                "In another, pay for it (a signed checkout.session.completed, as Stripe would send it):",
                f"  .venv/bin/license-broker send pay lic_demo --url {base}",
                "Then try: fail, recover, cancel, refund.",
                "",
            ]
        print("\n".join(lines), flush=True)

    return on_ready


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    from license_broker.embedded import create_app

    settings.require_webhook()
    settings.require_stream()
    _server(create_app(settings, on_ready=_banner(args)), args, settings)  # type: ignore[arg-type]
    return 0


def cmd_webhook(args: argparse.Namespace, settings: Settings) -> int:
    settings.require_webhook()
    _server("license_broker.cli:webhook_app", args, settings, factory=True)
    return 0


def cmd_stream(args: argparse.Namespace, settings: Settings) -> int:
    settings.require_stream()
    _server("license_broker.cli:stream_app", args, settings, factory=True)
    return 0


def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    async def run() -> None:
        engine = create_engine(settings)
        try:
            await migrate(engine)
        finally:
            await engine.dispose()

    try:
        asyncio.run(run())
    except (SQLAlchemyError, OSError) as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        print(f"license-broker: migrate: DATABASE_URL is not reachable: {reason}", file=sys.stderr)
        return 1
    print(f"migrated {make_url(settings.database_url).render_as_string(hide_password=True)}")
    return 0


def cmd_prune(args: argparse.Namespace, settings: Settings) -> int:
    from datetime import timedelta

    from broker.retention import prune_event_log

    days = args.older_than_days if args.older_than_days is not None else settings.event_log_retention_days
    if not days:
        raise SettingsError("EVENT_LOG_RETENTION_DAYS: required by prune (or --older-than-days)")

    async def run() -> int:
        engine = create_engine(settings)
        try:
            return await prune_event_log(engine, timedelta(days=days))
        finally:
            await engine.dispose()

    print(f"pruned {asyncio.run(run())} event log rows older than {days:g} days (each license's latest kept)")
    return 0


def cmd_token(args: argparse.Namespace, settings: Settings) -> int:
    settings.require_stream()
    assert settings.token_secret is not None
    print(tokens.mint(settings.token_secret, args.license_id, ttl=args.ttl))
    return 0


def cmd_send(args: argparse.Namespace, settings: Settings) -> int:
    from webhook.samples import SampleEvents

    secret = settings.webhook_secrets[0] if settings.webhook_secrets else DEV_WEBHOOK_SECRET
    url = args.url.rstrip("/") + "/api/stripe/webhooks"
    with httpx.Client(timeout=10) as client:
        for event, payload, headers in SampleEvents(args.license_id).deliveries(args.action, secret):
            response = client.post(url, content=payload, headers=headers)
            print(f"{event['type']} {event['id']} -> {response.status_code} {response.text}")
            if response.status_code >= 300:
                return 1
    return 0


def cmd_unmatched(args: argparse.Namespace, settings: Settings) -> int:
    from webhook.ingest import unmatched_events

    async def run() -> list[dict[str, object]]:
        engine = create_engine(settings)
        try:
            return await unmatched_events(engine, args.limit)
        finally:
            await engine.dispose()

    events = asyncio.run(run())
    for e in events:
        if args.json:
            print(orjson.dumps(e["payload"]).decode())
        else:
            ids = " ".join(
                str(e[k]) for k in ("stripe_customer_id", "stripe_subscription_id", "stripe_charge_id") if e[k]
            )
            print(f"{e['id']} {e['type']} created={e['created']} {e['outcome']} {ids}".rstrip())
    print(f"{len(events)} event(s) not matched to a license (limit {args.limit})", file=sys.stderr)
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="license-broker", description="Stripe events to desktop apps, live.")
    sub = top.add_subparsers(dest="command", required=True)

    def server(name: str, help: str, port: int, workers: bool) -> argparse.ArgumentParser:
        # Defaults from the settings (HOST, PORT, WEB_CONCURRENCY), filled in by main().
        p = sub.add_parser(name, help=help)
        p.add_argument("--host", help="default: HOST, else 127.0.0.1")
        p.add_argument("--port", type=int, help=f"default: PORT, else {port}")
        if workers:
            p.add_argument("--workers", type=int, help="default: WEB_CONCURRENCY, else 1")
        p.set_defaults(command_port=port)
        return p

    server("serve", "both apps in one process (the embedded default)", 8000, False).set_defaults(run=cmd_serve)
    server("webhook", "the Stripe webhook app", 8001, True).set_defaults(run=cmd_webhook)
    server("stream", "the SSE stream app", 8002, True).set_defaults(run=cmd_stream)
    sub.add_parser("migrate", help="apply schema migrations to DATABASE_URL").set_defaults(run=cmd_migrate)
    p = sub.add_parser("prune", help="delete old event log rows, keeping each license's latest")
    p.add_argument("--older-than-days", type=float, help="default: EVENT_LOG_RETENTION_DAYS")
    p.set_defaults(run=cmd_prune)
    p = sub.add_parser("token", help="print a subscriber token for a license")
    p.add_argument("license_id")
    p.add_argument("--ttl", type=float, default=3600.0, help="seconds until it expires (default 3600)")
    p.set_defaults(run=cmd_token)
    p = sub.add_parser("send", help="sign and post a realistic Stripe event to a running webhook")
    p.add_argument("action", choices=["pay", "fail", "recover", "cancel", "refund"])
    p.add_argument("license_id")
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.set_defaults(run=cmd_send)
    p = sub.add_parser("unmatched", help="list Stripe events no license took (pending or unmatched), oldest first")
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--json", action="store_true", help="print each raw Stripe event as one JSON line")
    p.set_defaults(run=cmd_unmatched)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        settings = Settings.from_env()
        if hasattr(args, "command_port"):  # a server: what the command line leaves out, the settings give
            args.host = args.host or settings.host
            args.port = args.port or settings.port or args.command_port
            if hasattr(args, "workers"):
                args.workers = args.workers or settings.workers
        code: int = args.run(args, settings)
        return code
    except SettingsError as exc:
        print(f"license-broker: {exc}", file=sys.stderr)
        return 2
