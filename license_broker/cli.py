"""The `license-broker` command."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any

import orjson

from broker.settings import Settings, SettingsError, lease_keys_from_env, mask_password
from webhook.sample_actions import ACTION_HELP, ACTIONS

# What a command needs is imported by its function: the servers' stack (uvicorn, Starlette, the
# runtime), SQLAlchemy, httpx and the `stripe` package are ~1 s of CPU, which `--help`, `token`,
# `keys` and a refusal of a bad setting (one line, at once) need not pay.
if TYPE_CHECKING:
    from starlette.applications import Starlette

    from broker.runtime import Runtime


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
    import uvicorn

    from broker.web import server as http_server
    from license_broker import logs

    _tune_gc()
    config = uvicorn.Config(
        app,  # type: ignore[arg-type]
        factory=factory,
        host=args.host,
        port=args.port,
        workers=getattr(args, "workers", None),
        loop="auto",
        # httptools, with the request head bounded in bytes and in time (broker.web.server).
        http=http_server.PROTOCOL,
        lifespan="on",
        log_config=logs.configure(settings),
        # Above INFO no access line is ever written, but uvicorn would still build its arguments
        # (client address, path with query) for every request.
        access_log=logging.getLevelName(settings.log_level) <= logging.INFO,
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
    from broker.signing import tokens

    def on_ready(runtime: Runtime) -> None:
        settings = runtime.settings
        base = f"http://{args.host}:{args.port}"
        lines = [
            "",
            f"license-broker is serving on {base}",
            f"  database:  {mask_password(settings.database_url)}",
            f"  transport: {settings.transport}",
        ]
        if settings.dev:
            token = tokens.mint_for(settings, "lic_demo", ttl=7 * 86400)
            assert runtime.leases is not None  # development mode always signs
            # Generated at this start (Settings.from_env): `send` and `token` need them, and the
            # next start has others. Only ever for this machine: no app outside development mode
            # takes a development secret.
            lines += [
                "",
                "Development mode: secrets and lease key generated for this run only:",
                f"  export STRIPE_WEBHOOK_SECRET={settings.webhook_secrets[0]}",
                f"  export STREAM_TOKEN_SECRET={settings.token_secret}",
                f"  lease key: kid {runtime.leases.kid} (its public key: {base}/dev/public-key.pem)",
                "",
                "Try it. In one terminal, follow license lic_demo:",
                f"  curl -N -H 'Authorization: Bearer {token}' {base}/api/licenses/lic_demo/events",
                "In another, with the two exports above, pay for it (a signed checkout.session.completed,",
                "as Stripe would send it), or mint a token for another license:",
                f"  .venv/bin/license-broker send pay lic_demo --url {base}",
                "  .venv/bin/license-broker token lic_other",
                "Then try: fail, recover, cancel_at_period_end, cancel, refund (`send --help` says what each is).",
                "Once paid, the buyer's page (Checkout's success_url) shows its license key:",
                f"  {base}/activate?session_id={_demo_session()}",
                "and the key activates machines: POST /api/activations (docs/desktop.md), or the live page",
                f"  {base}/?license=lic_demo",
                "",
                "Buy from the app, as an app would (docs/protocol.md): ask for a checkout, open its",
                "checkout_url (this server's own page in development mode) and press Pay while following",
                "the stream with the token it gave; POST /api/trials starts a 14-day trial the same way:",
                f"  curl -s {base}/api/checkout -H 'content-type: application/json' "
                "-d '{\"fingerprint\": \"'$(head -c32 /dev/urandom | sha256sum | cut -c1-64)'\"}'",
                "",
            ]
        print("\n".join(lines), flush=True)

    return on_ready


def _demo_session() -> str:
    from webhook.samples import SampleEvents

    session_id: str = SampleEvents("lic_demo").checkout_completed(0)["data"]["object"]["id"]
    return session_id


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    from license_broker.embedded import create_app

    settings.require_webhook()
    settings.require_stream()
    _server(create_app(settings, on_ready=_banner(args)), args, settings)  # type: ignore[arg-type]
    return 0


def _one_metrics_port_per_process(args: argparse.Namespace, settings: Settings) -> None:
    if settings.metrics_port is not None and args.workers > 1:
        # Every worker is a process with its own metrics, and only one can listen on the port.
        raise SettingsError(
            "METRICS_PORT: serves one process; run one worker per process (WEB_CONCURRENCY=1) or use METRICS_TOKEN"
        )


def cmd_webhook(args: argparse.Namespace, settings: Settings) -> int:
    settings.require_webhook()
    _one_metrics_port_per_process(args, settings)
    _server("license_broker.cli:webhook_app", args, settings, factory=True)
    return 0


def cmd_stream(args: argparse.Namespace, settings: Settings) -> int:
    settings.require_stream()
    _one_metrics_port_per_process(args, settings)
    _server("license_broker.cli:stream_app", args, settings, factory=True)
    return 0


def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    from sqlalchemy.exc import SQLAlchemyError

    from broker.storage.db import create_engine, migrate

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
        print(f"license-broker: migrate: DATABASE_URL is not reachable: {mask_password(reason)}", file=sys.stderr)
        return 1
    print(f"migrated {mask_password(settings.database_url)}")
    return 0


def cmd_prune(args: argparse.Namespace, settings: Settings) -> int:
    from datetime import timedelta

    from broker.storage.db import create_engine
    from broker.storage.retention import prune_event_log, prune_event_payloads

    days = args.older_than_days if args.older_than_days is not None else settings.event_log_retention_days
    if not days:
        raise SettingsError("EVENT_LOG_RETENTION_DAYS: required by prune (or --older-than-days)")

    async def run() -> tuple[int, int]:
        engine = create_engine(settings)
        try:
            older_than = timedelta(days=days)
            return await prune_event_log(engine, older_than), await prune_event_payloads(engine, older_than)
        finally:
            await engine.dispose()

    rows, payloads = asyncio.run(run())
    print(f"pruned {rows} event log rows older than {days:g} days (each license's latest kept)")
    print(f"dropped the payloads of {payloads} Stripe events older than {days:g} days that changed no license "
          "(ignored, unmatched, rejected; each event's id kept)")  # fmt: skip
    return 0


def cmd_token(args: argparse.Namespace, settings: Settings) -> int:
    from broker.signing import tokens

    # Not require_stream(): a development server's secret (printed by `serve`) is fine here.
    if settings.token_secret is None:
        raise SettingsError("STREAM_TOKEN_SECRET: required by token (the stream's secret)")
    if not 0 < args.ttl <= settings.token_max_ttl:
        print(f"license-broker: token: --ttl must be between 0 and STREAM_TOKEN_MAX_TTL ({settings.token_max_ttl:g} s)",
              file=sys.stderr)  # fmt: skip
        return 2
    # Its audience (STREAM_TOKEN_AUDIENCE, else license-broker), STREAM_TOKEN_ISSUER if set, and
    # typ "stream": what the stream requires.
    print(tokens.mint_for(settings, args.license_id, ttl=args.ttl))
    return 0


def cmd_keys(args: argparse.Namespace, settings: None) -> int:
    """Needs no settings but LICENSE_SIGNING_KEY (main() reads none): BROKER_DEV, a database or a
    missing secret in the environment change nothing here."""
    from broker.signing import leases

    if args.action == "generate":
        # Printed, not written to a file: where a secret is kept is the operator's choice.
        keys = leases.LeaseKeys.generate()
        public = keys.signing.public_key()
        print(f"# kid {leases.key_id(public)}")
        print("# LICENSE_SIGNING_KEY (private: keep it secret, e.g. in your secret store)")
        print(leases.private_pem(keys.signing), end="")
        print("# the public key: pin it in your app (`license-broker keys public` prints it again)")
        print(leases.public_pem(public), end="")
        return 0
    configured = lease_keys_from_env(os.environ)
    if configured is None:
        raise SettingsError("LICENSE_SIGNING_KEY: required by keys public")
    if args.jwks:
        print(orjson.dumps({"keys": [leases.public_jwk(k) for k in configured.published]}).decode())
        return 0
    print(leases.public_pems(configured), end="")
    return 0


def cmd_send(args: argparse.Namespace, settings: Settings) -> int:
    import httpx

    from webhook.samples import SampleEvents, explain

    if not settings.webhook_secrets:
        raise SettingsError(
            "STRIPE_WEBHOOK_SECRET: required by send (the webhook's; `serve` prints it in development mode)"
        )
    secret = settings.webhook_secrets[0]
    # The server `serve` starts here: PORT, as `make run` and `serve` take it, else serve's 8000.
    base = args.url or f"http://127.0.0.1:{settings.port or 8000}"
    url = base.rstrip("/") + "/api/stripe/webhooks"
    print(f"{args.action}: {ACTION_HELP[args.action]}")
    deliveries = SampleEvents(args.license_id).deliveries(args.action, secret)
    with httpx.Client(timeout=10) as client:
        for i, (event, payload, headers) in enumerate(deliveries):
            response = client.post(url, content=payload, headers=headers)
            print(f"{event['type']} {event['id']} -> {response.status_code} {response.text}")
            if response.status_code >= 300:
                return 1
            try:
                outcome = response.json().get("outcome")
            except ValueError:
                continue
            if note := explain(outcome, event, [later for later, _, _ in deliveries[i + 1 :]]):
                print(f"  {outcome}: {note}")
    return 0


def cmd_unmatched(args: argparse.Namespace, settings: Settings) -> int:
    from broker.ingest import unmatched_events
    from broker.storage.db import create_engine

    async def run() -> list[dict[str, object]]:
        engine = create_engine(settings)
        try:
            return await unmatched_events(engine, args.limit)
        finally:
            await engine.dispose()

    events = asyncio.run(run())
    for e in events:
        if args.json:
            # A payload not kept (an event type not used, or pruned): what its row recorded.
            kept = {k: e[k] for k in ("id", "type", "created")} | {"payload": "not kept"}
            print(orjson.dumps(e["payload"] if e["payload"] is not None else kept).decode())
        else:
            detail = " ".join(str(e[k]) for k in ("object_id", "reason") if e[k])
            print(f"{e['id']} {e['type']} created={e['created']} {e['outcome']} {detail}".rstrip())
    print(f"{len(events)} event(s) that changed no license (limit {args.limit})", file=sys.stderr)
    return 0


def cmd_rebuild(args: argparse.Namespace, settings: Settings) -> int:
    from license_broker.rebuild import rebuild

    changed = asyncio.run(rebuild(settings, args.license_id))
    for license_id, seq in changed:
        print(f"{license_id} seq={seq}")
    print(f"{len(changed)} license(s) changed", file=sys.stderr)
    return 0


def _async_command(
    use: Callable[[argparse.Namespace, Settings], Coroutine[Any, Any, int]],
) -> Callable[[argparse.Namespace, Settings], int]:
    def command(args: argparse.Namespace, settings: Settings) -> int:
        from sqlalchemy.exc import SQLAlchemyError

        try:
            return asyncio.run(use(args, settings))
        except (SQLAlchemyError, OSError) as exc:
            reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
            print(f"license-broker: {args.command}: database unavailable: {mask_password(reason)}", file=sys.stderr)
            return 1

    return command


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="license-broker", description="Stripe events to desktop apps, live.")
    sub = top.add_subparsers(dest="command", required=True)

    def server(name: str, help: str, port: int, workers: bool) -> argparse.ArgumentParser:
        # Defaults from the settings (HOST, PORT, WEB_CONCURRENCY), filled in by main().
        p = sub.add_parser(name, help=help)
        # Not from a HOST variable: some shells export one (the machine's name), which would
        # silently bind to a public interface. Containers pass --host 0.0.0.0 explicitly.
        p.add_argument("--host", default="127.0.0.1")
        p.add_argument("--port", type=int, help=f"default: PORT, else {port}")
        if workers:
            p.add_argument("--workers", type=int, help="default: WEB_CONCURRENCY, else 1")
        p.set_defaults(command_port=port)
        return p

    server("serve", "both apps in one process (the embedded default)", 8000, False).set_defaults(run=cmd_serve)
    server("webhook", "the Stripe webhook app", 8001, True).set_defaults(run=cmd_webhook)
    server("stream", "the SSE stream app", 8002, True).set_defaults(run=cmd_stream)
    sub.add_parser("migrate", help="apply schema migrations to DATABASE_URL").set_defaults(run=cmd_migrate)
    p = sub.add_parser(
        "prune",
        help="delete old event log rows, keeping each license's latest, and the old payloads of Stripe events "
        "that changed no license",
    )
    p.add_argument("--older-than-days", type=float, help="default: EVENT_LOG_RETENTION_DAYS")
    p.set_defaults(run=cmd_prune)
    p = sub.add_parser("token", help="print a subscriber token for a license")
    p.add_argument("license_id")
    p.add_argument("--ttl", type=float, default=3600.0, help="seconds until it expires (default 3600)")
    p.set_defaults(run=cmd_token)
    p = sub.add_parser("keys", help="lease signing keys: generate a pair, or print the configured public keys")
    p.add_argument("action", choices=["generate", "public"])
    p.add_argument("--jwks", action="store_true", help="public: print the JWKS instead of PEM")
    p.set_defaults(run=cmd_keys, settings=False)
    p = sub.add_parser("send", help="sign and post a realistic Stripe event to a running webhook")
    p.add_argument("action", choices=ACTIONS, help="; ".join(f"{a}: {h}" for a, h in ACTION_HELP.items()))
    p.add_argument("license_id")
    p.add_argument("--url", help="the webhook's base URL (default: http://127.0.0.1:PORT, PORT else 8000)")
    p.set_defaults(run=cmd_send)
    p = sub.add_parser(
        "rebuild",
        help="refill the ledger from the stored Stripe events and re-derive licenses (after a rules fix); "
        "appends an event only where a license's state changes",
    )
    p.add_argument("license_id", nargs="?", help="only this license (the ledger is refilled whole)")
    p.set_defaults(run=cmd_rebuild)
    p = sub.add_parser(
        "unmatched", help="list Stripe events that changed no license (pending, ignored, rejected), oldest first"
    )
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--json", action="store_true", help="print each raw Stripe event as one JSON line")
    p.set_defaults(run=cmd_unmatched)
    from license_broker import licensing_cli

    licensing_cli.add_commands(sub, _async_command)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if not getattr(args, "settings", True):
            standalone: int = args.run(args, None)
            return standalone
        settings = Settings.from_env()
        if hasattr(args, "command_port"):  # a server: what the command line leaves out, the settings give
            args.port = args.port or settings.port or args.command_port
            if hasattr(args, "workers"):
                args.workers = args.workers or settings.workers
        settings.require_development_ok(args.command, getattr(args, "host", None))
        code: int = args.run(args, settings)
        return code
    except SettingsError as exc:
        print(f"license-broker: {exc}", file=sys.stderr)
        return 2
