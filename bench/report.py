"""Figures out: percentiles, the table on stdout, the JSON file, the PNG of the distributions."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import orjson

from bench.measure import LatencyResult

COLUMNS = ("transport", "posting", "clients", "events", "p50_ms", "p95_ms", "p99_ms", "max_ms", "lost", "duplicates")


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def row(result: LatencyResult) -> dict[str, Any]:
    values = sorted(result.latencies_ms)
    return {
        "transport": result.transport,
        "posting": result.posting,
        "clients": result.clients,
        "events": result.events,
        "p50_ms": _ms(percentile(values, 50)),
        "p95_ms": _ms(percentile(values, 95)),
        "p99_ms": _ms(percentile(values, 99)),
        "max_ms": _ms(values[-1] if values else None),
        "lost": result.lost,
        "duplicates": result.duplicates,
    }


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}" if value < 100 else f"{value:.0f}"
    return str(value)


def latency_table(rows: list[dict[str, Any]]) -> str:
    cells = [list(COLUMNS)] + [[_cell(r[c]) for c in COLUMNS] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    lines = [" | ".join(cell.rjust(w) for cell, w in zip(line, widths, strict=True)) for line in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


_HEADINGS = {"p50_ms": "p50 ms", "p95_ms": "p95 ms", "p99_ms": "p99 ms", "max_ms": "max ms"}
_TEXT_COLUMNS = ("transport", "posting")


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The latency rows as the README's and docs/bench.md's Markdown table (Flask-SSE's included)."""
    heads = [_HEADINGS.get(c, c) for c in COLUMNS]
    lines = [
        "| " + " | ".join(heads) + " |",
        "| " + " | ".join("---" if c in _TEXT_COLUMNS else "---:" for c in COLUMNS) + " |",
    ]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def against_peer(rows: list[dict[str, Any]], ours: str = "redis", peer: str = "flask-sse") -> list[str]:
    """Per client count and posting that both ran: the project's p50 / p99 against its peer's."""
    found = {(r["transport"], r["posting"], r["clients"]): r for r in rows}
    out = []
    for (transport, posting, clients), theirs in found.items():
        mine = found.get((ours, posting, clients))
        if transport != peer or mine is None or None in (mine["p50_ms"], theirs["p50_ms"]):
            continue
        ahead = mine["p50_ms"] < theirs["p50_ms"] and mine["p99_ms"] < theirs["p99_ms"]
        out.append(
            f"{ours} vs {peer}, {clients} clients, {posting}: p50 {mine['p50_ms']} vs {theirs['p50_ms']} ms, "
            f"p99 {mine['p99_ms']} vs {theirs['p99_ms']} ms: " + ("ahead at both" if ahead else "NOT ahead at both")
        )
    return out


def summary(results: dict[str, Any]) -> str:
    out = [f"machine: {results['machine']}", "", latency_table(results["rows"]), ""]
    out += against_peer(results["rows"])
    for top in results.get("ceiling", []):
        out.append(
            f"ceiling: {top['commits_per_s']:.0f} bare INSERT + COMMIT/s "
            f"({top['concurrency']} connection(s), for ingest concurrency {top['ingest_concurrency']})"
        )
    for run in results.get("ingest", []):
        fraction = run.get("fraction_of_ceiling")
        out.append(
            f"webhook ingest: {run['events_per_s']:.0f} events/s committed "
            f"({run['committed']} events, concurrency {run['concurrency']}, {run['webhook_workers']} webhook "
            f"worker(s), response p50 {run['response_p50_ms']} ms, p99 {run['response_p99_ms']} ms, "
            f"webhook CPU {run['webhook_cpu_ms_per_event']} ms/event, {run['errors']} errors"
            + (f", {fraction:.0%} of the ceiling" if fraction is not None else "")
            + ")"
        )
    if (replay := results.get("replay")) is not None:
        out.append(
            f"replay: {replay['events']} missed events in {replay['seconds']:.3f} s "
            f"({replay['events_per_s']}/s, lost {replay['lost']}, duplicates {replay['duplicates']})"
        )
    if (idle := results.get("idle_connections")) is not None:
        out.append(
            f"idle connections: {idle['clients']} on one stream process, "
            f"{idle['rss_kb_per_connection']:.1f} KB RSS each, {idle['redis_connections']} Redis connection(s)"
        )
    if (cluster := results.get("redis_cluster")) is not None:
        out.append(
            f"redis cluster: {cluster['masters']} masters, {cluster['stream_processes']} stream processes, "
            f"Redis connections per stream process {cluster['redis_connections_per_stream_process']} "
            f"of which subscribing {cluster['subscriber_connections_per_stream_process']} "
            f"(at {cluster['clients']} clients)"
        )
    if (click := results.get("click_to_entitled")) is not None:
        out.append(
            f"click-to-entitled: {click['events']} purchases from the app, checkout.session.completed POST -> the "
            f"app's stream holds entitled: true: p50 {click['p50_ms']} ms, p99 {click['p99_ms']} ms, lost "
            f"{click['lost']} (POST /api/checkout answered in p50 {click['checkout_response_p50_ms']} ms)"
        )
    if (ratio := results.get("redis_vs_poll_p50")) is not None:
        out.append(f"redis vs poll at p50: {ratio:.0f}x faster")
    return "\n".join(out)


def write_json(path: Path, results: dict[str, Any]) -> None:
    path.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2) + b"\n")


def plot(path: Path, results: list[LatencyResult], title: str) -> None:
    """One panel per transport: the distribution (empirical CDF) of latency, per client count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    transports = list(dict.fromkeys(r.transport for r in results))
    from matplotlib.ticker import FixedLocator, NullFormatter, ScalarFormatter

    # One shared x axis, so that the panels compare at a glance.
    fig, axes = plt.subplots(1, len(transports), figsize=(6 * len(transports), 4.2), squeeze=False, sharex=True)
    for ax, transport in zip(axes[0], transports, strict=True):
        for result in (r for r in results if r.transport == transport):
            values = sorted(v for v in result.latencies_ms if v > 0)
            if not values:
                continue
            fractions = [(i + 1) / len(values) for i in range(len(values))]
            label = f"{result.clients} client" + ("s" if result.clients != 1 else "") + f", {result.posting}"
            style = "--" if result.posting == "back to back" else "-"
            ax.step(values, fractions, where="post", label=label, linestyle=style)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(FixedLocator([1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000]))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("webhook POST sent -> SSE client holds the event (ms, log scale)")
        ax.set_ylabel("fraction of events")
        ax.set_title(transport)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="best")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """`python -m bench.report [bench-results.json]`: the latency rows of a run as Markdown (the
    README's table), then how the project compares with Flask-SSE."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    results = orjson.loads(Path(args[0] if args else "bench-results.json").read_bytes())
    load = results.get("machine_detail", {}).get("load_average") or []
    load_text = " / ".join(f"{x:.2f}" for x in load) or "?"
    print(f"{results['machine']}, {results.get('started_at', '?')}, load average at the start {load_text}\n")
    print(markdown_table(results["rows"]))
    if comparison := against_peer(results["rows"]):
        print("\n" + "\n".join(f"- {line}" for line in comparison))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
