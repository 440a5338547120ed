"""`make bench` at a tiny scale, against the real Postgres and Redis: the pieces fit together, the
JSON has the promised shape, and no event is lost or duplicated. No timing assertions."""

from __future__ import annotations

from pathlib import Path

import orjson
import psycopg
import pytest

from bench.__main__ import BenchConfig, main, run
from bench.report import COLUMNS, against_peer, markdown_table, summary, write_json
from tests.support.services import ADMIN_URL, psycopg_connect, unavailable

pytestmark = pytest.mark.slow


@pytest.fixture
def admin_url() -> str:
    try:
        psycopg_connect(ADMIN_URL).close()
    except psycopg.OperationalError as exc:
        unavailable("Postgres", exc)
    return ADMIN_URL


@pytest.mark.timeout(240)
async def test_tiny_bench_writes_the_promised_json_with_nothing_lost_or_duplicated(
    admin_url: str, redis_url: str, tmp_path: Path
) -> None:
    config = BenchConfig(
        admin_database_url=admin_url,
        redis_url=redis_url,
        out=tmp_path / "bench.json",
        plot=tmp_path / "bench.png",
        transports=("redis", "poll", "redis-cluster", "flask-sse"),
        clients=(2,),
        events={2: 5},
        rate=50.0,
        poll_interval=0.2,
        ingest_events=20,
        ingest_concurrency=(2,),
        ingest_workers=(1,),
        ingest_licenses=5,
        replay_events=50,
        idle_clients=5,
        purchases=3,
    )
    results = await run(config)
    write_json(config.out, results)
    written = orjson.loads(config.out.read_bytes())

    assert isinstance(written["machine"], str) and written["machine"]
    assert [(r["transport"], r["posting"], r["clients"]) for r in written["rows"]] == [
        ("redis", "50/s", 2),
        ("redis", "back to back", 2),
        ("poll", "50/s", 2),
        ("redis-cluster (2 streams)", "50/s", 2),
        ("flask-sse", "50/s", 2),
        ("flask-sse", "back to back", 2),
        ("redis: click-to-entitled", "one purchase at a time", 1),
    ]
    # The project against Flask-SSE, per posting: printed, and in the README's Markdown table.
    assert [line.split(":")[0] for line in against_peer(written["rows"])] == [
        "redis vs flask-sse, 2 clients, 50/s",
        "redis vs flask-sse, 2 clients, back to back",
    ]
    table = markdown_table(written["rows"]).splitlines()
    assert table[0].startswith("| transport | posting | clients |") and len(table) == 2 + len(written["rows"])
    assert any(line.startswith("| flask-sse | back to back | 2 | 5 |") for line in table)
    click = written["click_to_entitled"]
    assert (click["events"], click["lost"], click["rejected"]) == (3, 0, 0)
    assert "click-to-entitled" in summary(written)
    for row in written["rows"]:
        assert set(row) == set(COLUMNS)
        assert row["events"] == (3 if row["transport"].endswith("click-to-entitled") else 5)
        assert (row["lost"], row["duplicates"]) == (0, 0)
        assert row["p50_ms"] is not None and row["p50_ms"] <= row["p99_ms"] <= row["max_ms"]
    for detail in written["latency_detail"]:
        assert detail["out_of_order"] == 0
        assert len(detail["load_average"]) == 3 and detail["events_per_s"] > 0
        assert detail["webhooks_rejected"] == detail["webhooks_not_applied"] == 0

    (ingest,) = written["ingest"]
    assert ingest["committed"] == ingest["ok"] == 20 and ingest["errors"] == 0
    assert ingest["events_per_s"] > 0

    replay = written["replay"]
    assert (replay["events"], replay["lost"], replay["duplicates"], replay["in_order"]) == (50, 0, 0, True)

    idle = written["idle_connections"]
    assert idle["clients"] == 5 and idle["rss_kb_after"] > 0
    # One subscriber connection (plus, at most, the publishing client) however many streams.
    assert 1 <= written["redis_connections_per_stream_process"] <= 2

    # Two stream processes on a 3-master cluster, one client each: each holds one subscriber
    # connection per master, in pub/sub mode once it follows a channel there (here the one
    # master of its one license), and the cluster client's (its readiness check pings every master).
    cluster = written["redis_cluster"]
    assert (cluster["masters"], cluster["stream_processes"], cluster["clients"]) == (3, 2, 2)
    assert cluster["subscriber_connections_per_stream_process"] == [1, 1]
    assert all(3 <= n <= 7 for n in cluster["redis_connections_per_stream_process"])
    (cluster_detail,) = (d for d in written["latency_detail"] if d["transport"].startswith("redis-cluster"))
    assert cluster_detail["stream_processes"] == 2

    assert config.plot is not None and config.plot.stat().st_size > 0
    assert "redis cluster" in summary(written)


def test_the_bench_refuses_arguments_and_says_which_settings_it_reads(capsys: pytest.CaptureFixture[str]) -> None:
    """Settings are environment variables: a mistyped option must not start a three-minute run."""
    assert main(["--scale", "full"]) == 2
    refused = capsys.readouterr().err
    assert "takes no arguments (got --scale full)" in refused and "BENCH_SCALE" in refused
    assert main(["--help"]) == 0
    assert "BENCH_TRANSPORTS" in capsys.readouterr().out
