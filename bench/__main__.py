"""`make bench`: Redis against database polling, side by side, on a stack of real processes.

Environment: BENCH_SCALE (default | full: adds 10,000 clients), BENCH_ONLY (click-to-entitled: that
row alone, on the redis stack), BENCH_OUT (bench-results.json),
BENCH_PLOT (docs/bench.png), BENCH_TRANSPORTS (redis,poll,redis-cluster,flask-sse), BENCH_POSTING (paced,back-to-back:
how the latency rows of redis and flask-sse post; the others are paced), BENCH_FLASK_SSE_PUBLISH (sse: the
peer publishes with sse.publish, as its docs; pooled: the same message on one Redis client),
DATABASE_URL (the Postgres server to create the scratch database on; postgresql://127.0.0.1:5432/postgres), REDIS_URL
(redis://127.0.0.1:6379/0).
"""

from __future__ import annotations

import contextlib
import os
import resource
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import checkout, measure, report
from bench.stack import (
    TOKEN_SECRET,
    WEBHOOK_SECRET,
    Server,
    flask_sse_server,
    machine,
    running,
    scratch_database,
    server_env,
)
from localcluster import local_cluster

EVENTS_PER_SCENARIO = {1: 200, 100: 300, 1000: 1000, 10000: 2000}
# flask-sse: not a transport of the project but its peer, Flask-SSE (bench.flask_sse_peer).
TRANSPORTS = ("redis", "poll", "redis-cluster", "flask-sse")
# The rows posted back to back as well as paced (BENCH_POSTING): the project's and its peer's.
BACK_TO_BACK_TRANSPORTS = ("redis", "flask-sse")
POSTINGS = ("paced", "back-to-back")


@dataclass
class BenchConfig:
    admin_database_url: str
    redis_url: str
    out: Path
    plot: Path | None
    transports: tuple[str, ...] = TRANSPORTS
    # redis-cluster: stream processes behind the (imaginary) load balancer, clients dealt evenly.
    cluster_streams: int = 2
    clients: tuple[int, ...] = (1, 100, 1000)
    events: dict[int, int] = field(default_factory=lambda: dict(EVENTS_PER_SCENARIO))
    rate: float = 100.0
    # "paced" (open loop at `rate`) and/or "back-to-back" (BACK_TO_BACK_TRANSPORTS only).
    postings: tuple[str, ...] = POSTINGS
    # How the Flask-SSE peer publishes (bench.flask_sse_peer): "sse" (sse.publish, as its docs) or "pooled".
    flask_sse_publish: str = "sse"
    poll_interval: float = 2.0
    ingest_events: int = 4000
    ingest_concurrency: tuple[int, ...] = (1, 32)
    ingest_workers: tuple[int, ...] = (1, 2)
    ingest_licenses: int = 500
    replay_events: int = 10_000
    idle_clients: int = 1000
    # Click-to-entitled (bench.checkout), on the redis stack: purchases one after another.
    purchases: int = 100
    db_pool_size: int = 10  # the servers' DATABASE_POOL_SIZE default
    scale: str = "default"
    # Replay and idle connections too (off with BENCH_ONLY).
    everything: bool = True

    @classmethod
    def from_env(cls) -> BenchConfig:
        scale = os.environ.get("BENCH_SCALE", "default")
        if scale not in ("default", "full"):
            raise SystemExit(f"BENCH_SCALE: expected default or full, got {scale!r}")
        plot = os.environ.get("BENCH_PLOT", "docs/bench.png")
        config = cls(
            admin_database_url=os.environ.get("DATABASE_URL", "postgresql://127.0.0.1:5432/postgres"),
            redis_url=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
            out=Path(os.environ.get("BENCH_OUT", "bench-results.json")),
            plot=Path(plot) if plot else None,
            transports=tuple(t for t in os.environ.get("BENCH_TRANSPORTS", ",".join(TRANSPORTS)).split(",") if t),
            postings=tuple(p for p in os.environ.get("BENCH_POSTING", ",".join(POSTINGS)).split(",") if p),
            flask_sse_publish=os.environ.get("BENCH_FLASK_SSE_PUBLISH", "sse"),
            scale=scale,
        )
        if unknown := set(config.transports) - set(TRANSPORTS):
            raise SystemExit(f"BENCH_TRANSPORTS: expected some of {','.join(TRANSPORTS)}, got {','.join(unknown)}")
        if config.flask_sse_publish not in ("sse", "pooled"):
            raise SystemExit(f"BENCH_FLASK_SSE_PUBLISH: expected sse or pooled, got {config.flask_sse_publish!r}")
        if not config.postings or set(config.postings) - set(POSTINGS):
            raise SystemExit(f"BENCH_POSTING: expected some of {','.join(POSTINGS)}, got {','.join(config.postings)}")
        only = os.environ.get("BENCH_ONLY", "")
        if only not in ("", "click-to-entitled"):
            raise SystemExit(f"BENCH_ONLY: expected click-to-entitled, got {only!r}")
        if only:
            config.transports, config.clients, config.everything = ("redis",), (), False
            config.ingest_concurrency = config.ingest_workers = ()
            config.plot = None  # docs/bench.png is the whole run's
        if scale == "full":
            config.clients = (*config.clients, 10_000)
            config.idle_clients = 10_000
        return config


def _endpoint(server: Server) -> measure.Endpoint:
    # The process that serves, for /proc: gunicorn's worker rather than its master.
    return measure.Endpoint(server.url, server.worker_pid)


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def raise_open_files_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


async def run(config: BenchConfig) -> dict[str, Any]:
    started = time.monotonic()
    limit = raise_open_files_limit()
    needed = max([*config.clients, config.idle_clients]) + 200
    if limit < needed:
        progress(f"warning: open-files limit {limit} is below the {needed} connections this scale needs")
    logs = Path(tempfile.mkdtemp(prefix="lb-bench-"))
    progress(f"server logs in {logs}")
    results: dict[str, Any] = {"machine": "", "machine_detail": machine(), "scale": config.scale}
    results["machine"] = results["machine_detail"]["summary"]
    results["started_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    if "flask-sse" in config.transports:
        results["flask_sse_publish"] = config.flask_sse_publish
    latency_results: list[measure.LatencyResult] = []

    with scratch_database(config.admin_database_url) as database_url:
        progress(f"scratch database migrated: {database_url.rsplit('/', 1)[1]}")

        def env(transport: str) -> dict[str, str]:
            return server_env(database_url, config.redis_url, transport, config.poll_interval)

        @contextlib.contextmanager
        def transport_stack(transport: str) -> Iterator[tuple[measure.Endpoint, list[measure.Endpoint], str | None]]:
            """One webhook and its stream processes, and the Redis URL they use (None: none)."""
            if transport == "redis-cluster":
                progress(f"{transport}: starting a local Redis Cluster (3 masters, 3 replicas)")
                with local_cluster() as cluster:
                    cluster_env = {**env("redis"), "REDIS_URL": cluster.url}
                    webhook = Server("webhook", cluster_env, logs / f"webhook-{transport}.log")
                    streams = [
                        Server("stream", cluster_env, logs / f"stream-{transport}-{i}.log")
                        for i in range(config.cluster_streams)
                    ]
                    with running(webhook, *streams):
                        yield _endpoint(webhook), [_endpoint(s) for s in streams], cluster.url
                return
            if transport == "flask-sse":
                # Two gunicorn servers of the same Flask app, as the project's two processes: one
                # takes the webhooks and publishes, one serves the streams.
                # Its streams of earlier client counts stay open (docs/bench.md): room for them all.
                every = sum(config.clients)
                webhook = flask_sse_server(
                    "webhook",
                    config.redis_url,
                    logs / "flask-sse-webhook.log",
                    max_clients=10,
                    publish=config.flask_sse_publish,
                )
                stream = flask_sse_server("stream", config.redis_url, logs / "flask-sse-stream.log", max_clients=every)
                with running(webhook, stream):
                    yield _endpoint(webhook), [_endpoint(stream)], config.redis_url
                return
            webhook = Server("webhook", env(transport), logs / f"webhook-{transport}.log")
            stream = Server("stream", env(transport), logs / f"stream-{transport}.log")
            with running(webhook, stream):
                yield _endpoint(webhook), [_endpoint(stream)], config.redis_url if transport == "redis" else None

        for transport in config.transports if config.clients else ():
            rates: list[float | None] = []
            if "paced" in config.postings or transport not in BACK_TO_BACK_TRANSPORTS:
                rates.append(config.rate)
            if "back-to-back" in config.postings and transport in BACK_TO_BACK_TRANSPORTS:
                rates.append(None)
            with transport_stack(transport) as (hook, streams, redis_url):
                label = f"{transport} ({len(streams)} streams)" if len(streams) > 1 else transport
                progress(f"{label}: webhook pid {hook.pid}, stream pids {', '.join(str(s.pid) for s in streams)}")
                for clients in config.clients:
                    rows = await measure.latency(
                        transport=transport,
                        label=label,
                        webhook=hook,
                        streams=streams,
                        redis_url=redis_url,
                        token_secret=TOKEN_SECRET,
                        webhook_secret=WEBHOOK_SECRET,
                        clients=clients,
                        events=config.events.get(clients, clients),
                        rates=rates,
                        grace=2 * config.poll_interval + 5,
                        progress=progress,
                        peer=transport == "flask-sse",
                    )
                    for result in rows:
                        latency_results.append(result)
                        r = report.row(result)
                        redis_note = ""
                        if result.redis_connections:
                            redis_note = ", redis connections per stream " + ", ".join(
                                f"{c.total} ({c.subscribers} subscribing)" for c in result.redis_connections
                            )
                        progress(
                            f"  {label} {clients} clients, {result.posting} ({result.events_per_s:g}/s): "
                            f"p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, lost {r['lost']}, "
                            f"duplicates {r['duplicates']}, load {result.load_average[0]:.2f}"
                            + (f", {result.rejected} webhooks rejected" if result.rejected else "")
                            + redis_note
                        )

        if "redis" in config.transports and config.purchases:
            # Its own stream process, which makes checkouts (LICENSE_KEY_SECRET, STRIPE_PRICES and a
            # stand-in for Stripe's API), so that the rows above ran without them.
            async with checkout.fake_stripe() as stripe_base:
                stream = Server("stream", env("redis"), logs / "stream-checkout.log")
                stream.env |= checkout.stream_env(stripe_base, stream.port)
                webhook = Server("webhook", env("redis"), logs / "webhook-checkout.log")
                with running(webhook, stream):
                    progress(f"click-to-entitled: {config.purchases} purchases, one after another")
                    clicked, detail = await checkout.click_to_entitled(
                        webhook=measure.Endpoint(webhook.url, webhook.pid),
                        stream=measure.Endpoint(stream.url, stream.pid),
                        webhook_secret=WEBHOOK_SECRET,
                        purchases=config.purchases,
                        label="redis: click-to-entitled",
                    )
            latency_results.append(clicked)
            r = report.row(clicked)
            results["click_to_entitled"] = r | detail
            progress(
                f"  click-to-entitled: p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, lost {r['lost']}, "
                f"POST /api/checkout p50 {detail['checkout_response_p50_ms']} ms"
            )

        results["rows"] = [report.row(r) for r in latency_results]
        results["latency_detail"] = [
            {
                "transport": r.transport,
                "clients": r.clients,
                "posting": r.posting,
                "events_per_s": r.events_per_s,
                "load_average": list(r.load_average),
                "out_of_order": r.out_of_order,
                "webhook_response_p50_ms": report.percentile(r.webhook_response_ms, 50),
                "webhook_response_p99_ms": report.percentile(r.webhook_response_ms, 99),
                # Each license's first event (a new binding: the ingest's general path), before
                # the measured ones.
                "first_event_response_p50_ms": report.percentile(r.first_event_response_ms, 50),
                "first_event_response_p99_ms": report.percentile(r.first_event_response_ms, 99),
                # Split where the bench's own Redis subscription saw the message (plain Redis).
                "post_to_publish_p50_ms": report.percentile(r.post_to_publish_ms, 50),
                "post_to_publish_p99_ms": report.percentile(r.post_to_publish_ms, 99),
                "publish_to_client_p50_ms": report.percentile(r.publish_to_client_ms, 50),
                "publish_to_client_p99_ms": report.percentile(r.publish_to_client_ms, 99),
                "webhook_cpu_ms_per_event": r.webhook_cpu_ms_per_event,
                "stream_cpu_ms_per_event": r.stream_cpu_ms_per_event,
                "webhooks_rejected": r.rejected,
                "webhooks_not_applied": r.not_applied,
                "stream_processes": len(r.stream_pids),
                "stream_rss_kb_before_clients": r.rss_kb_before,
                "stream_rss_kb_with_clients": r.rss_kb_after,
                "redis_connections_of_stream_processes": (
                    None if r.redis_connections is None else [c.total for c in r.redis_connections]
                ),
                "redis_subscriber_connections_of_stream_processes": (
                    None if r.redis_connections is None else [c.subscribers for c in r.redis_connections]
                ),
            }
            for r in latency_results
        ]
        # The cluster row at its largest client count: what each stream process holds on the cluster.
        if clustered := [r for r in latency_results if r.transport.startswith("redis-cluster") and r.redis_connections]:
            last = clustered[-1]
            assert last.redis_connections is not None
            results["redis_cluster"] = {
                "masters": 3,
                "replicas_per_master": 1,
                "stream_processes": len(last.stream_pids),
                "clients": last.clients,
                "redis_connections_per_stream_process": [c.total for c in last.redis_connections],
                "subscriber_connections_per_stream_process": [c.subscribers for c in last.redis_connections],
            }
        most = max(config.clients, default=0)
        p50 = {
            row["transport"]: row["p50_ms"]
            for row in results["rows"]
            if row["clients"] == most and row["posting"] == measure.posting_name(config.rate)
        }
        if p50.get("redis") and p50.get("poll"):
            results["redis_vs_poll_p50"] = round(p50["poll"] / p50["redis"], 1)

        # The ceiling: bare INSERT + COMMIT at each ingest concurrency, capped at the webhook's
        # database pool (it never holds more connections than that).
        results["ceiling"] = []
        for concurrency in config.ingest_concurrency:
            connections = min(concurrency, config.db_pool_size)
            progress(f"ceiling: {config.ingest_events} bare INSERT + COMMIT over {connections} connection(s)")
            top = await measure.ceiling(database_url=database_url, events=config.ingest_events, concurrency=connections)
            top["ingest_concurrency"] = concurrency
            results["ceiling"].append(top)
            progress(f"  {top['commits_per_s']} commits/s")
        ceilings = {c["ingest_concurrency"]: c["commits_per_s"] for c in results["ceiling"]}

        results["ingest"] = []
        for workers in config.ingest_workers:
            webhook = Server(
                "webhook", env("redis"), logs / f"webhook-ingest-{workers}.log", extra_args=("--workers", str(workers))
            )
            with running(webhook):
                for concurrency in config.ingest_concurrency:
                    progress(f"ingest: {config.ingest_events} events, {workers} worker(s), concurrency {concurrency}")
                    run_ = await measure.ingest(
                        webhook_url=webhook.url,
                        webhook_pid=webhook.pid,
                        database_url=database_url,
                        webhook_secret=WEBHOOK_SECRET,
                        events=config.ingest_events,
                        concurrency=concurrency,
                        licenses=config.ingest_licenses,
                    )
                    run_["webhook_workers"] = workers
                    # Per worker process the pool caps the connections; the ceiling is per process.
                    if ceilings.get(concurrency):
                        run_["fraction_of_ceiling"] = round(run_["events_per_s"] / ceilings[concurrency], 3)
                    results["ingest"].append(run_)
                    progress(f"  {run_['events_per_s']} events/s ({run_['errors']} errors)")

        if config.everything:
            # The whole backlog replayed, not the current state that a client this far behind gets by default.
            replay_env = {**env("redis"), "STREAM_REPLAY_LIMIT": str(config.replay_events)}
            stream = Server("stream", replay_env, logs / "stream-replay.log")
            with running(stream):
                progress(f"replay: {config.replay_events} missed events, Last-Event-ID: 0")
                results["replay"] = await measure.replay(
                    stream_url=stream.url,
                    database_url=database_url,
                    token_secret=TOKEN_SECRET,
                    events=config.replay_events,
                )
                progress(f"  {results['replay']['seconds']} s")
                progress(f"idle connections: {config.idle_clients}")
                idle = await measure.idle_connections(
                    stream_url=stream.url,
                    stream_pid=stream.pid,
                    redis_url=config.redis_url,
                    token_secret=TOKEN_SECRET,
                    clients=config.idle_clients,
                    progress=progress,
                )
                results["idle_connections"] = idle
                results["redis_connections_per_stream_process"] = idle["redis_connections"]

    results["duration_s"] = round(time.monotonic() - started, 1)
    results["machine_detail"]["load_average_end"] = list(os.getloadavg())
    if config.plot is not None:
        report.plot(config.plot, latency_results, f"license-broker, {results['machine']}, {results['started_at']}")
        results["plot"] = str(config.plot)
    return results


def main(argv: list[str] | None = None) -> int:
    """Settings come from the environment (the docstring above); it takes no arguments, so that a
    mistyped option is refused rather than silently ignored for a 3-minute run."""
    args = sys.argv[1:] if argv is None else argv
    if args:
        usage = (__doc__ or "").strip()
        if args in (["-h"], ["--help"]):
            print(usage)
            return 0
        print(
            f"python -m bench takes no arguments (got {' '.join(args)}); set these instead:\n\n{usage}", file=sys.stderr
        )
        return 2
    config = BenchConfig.from_env()
    progress(f"bench ({config.scale}): transports {', '.join(config.transports)}, clients {config.clients}")
    # uvloop, as the servers use (uvicorn[standard]): the load generator should not be the bottleneck.
    import uvloop

    results = uvloop.run(run(config))
    report.write_json(config.out, results)
    print(report.summary(results))
    progress(f"wrote {config.out}" + (f" and {config.plot}" if config.plot else "") + f" in {results['duration_s']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
