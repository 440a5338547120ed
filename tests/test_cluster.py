"""Redis Cluster with sharded pub/sub, and several stream processes: a real local cluster
(three masters, one replica each) started by the test, real webhook and stream processes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from license_broker_client import LicenseClient

from broker.settings import ClusterAddress, Settings, SettingsError, parse_cluster_url
from broker.storage.db import create_engine
from broker.transports.base import channel
from broker.transports.redis_cluster import RedisClusterTransport
from tests.support.cluster import LocalCluster
from tests.support.licenses import new_license, post_event, token_for
from tests.support.processes import Process, process_env
from tests.support.transports import Harness
from tests.support.waiting import async_wait_until, free_port, wait_until
from webhook.samples import SampleEvents

pytestmark = pytest.mark.slow


def licenses_on_every_master(cluster: LocalCluster, per_master: int) -> list[str]:
    """License ids whose channels spread over every master, `per_master` on each."""
    by_master: dict[int, list[str]] = {}
    while len(by_master) < cluster.masters or any(len(ids) < per_master for ids in by_master.values()):
        license_id = new_license()
        ids = by_master.setdefault(cluster.master_of(channel(license_id)), [])
        if len(ids) < per_master:
            ids.append(license_id)
    return [license_id for ids in by_master.values() for license_id in ids]


@pytest.mark.parametrize("harness", ["redis-cluster"], indirect=True)
async def test_one_subscriber_connection_per_master_however_many_licenses(
    shared_cluster: LocalCluster, harness: Harness
) -> None:
    ids = licenses_on_every_master(shared_cluster, 4)
    for license_id in ids:
        await harness.transport.listen(license_id)
    transport = harness.transport
    assert isinstance(transport, RedisClusterTransport)
    assert {int(name.rsplit(":", 1)[1]) for name in transport._shards} == shared_cluster.master_ports()
    for license_id in ids:
        await harness.commit_and_publish(license_id)
    assert {(await harness.next()).license_id for _ in ids} == set(ids)
    # Each subscriber connection holds only the channels its master owns (SSUBSCRIBE, not SUBSCRIBE).
    for port in shared_cluster.master_ports():
        subscribed = {name.decode() for name in shared_cluster.command(port, "PUBSUB", "SHARDCHANNELS", "license:*")}
        assert subscribed == {channel(i) for i in ids if shared_cluster.master_of(channel(i)) == port}


async def test_a_master_failover_resubscribes_on_the_new_master_and_reports_the_gap(
    cluster: LocalCluster, pg_url: str
) -> None:
    engine = create_engine(Settings(database_url=pg_url))
    transport = RedisClusterTransport(cluster.url, max_backoff=0.5)
    h = Harness(transport, engine)
    await transport.start(h.on_message, h.on_gap)
    ids = licenses_on_every_master(cluster, 1)
    try:
        for license_id in ids:
            await transport.listen(license_id)
            await h.commit_and_publish(license_id)
            assert (await h.next()).seq == 1
        victim = ids[0]
        killed = cluster.master_of(channel(victim))
        cluster.kill(killed)
        deadline = time.monotonic() + 20
        while h.gaps == 0:
            assert time.monotonic() < deadline, "no resubscription after the failover"
            await asyncio.sleep(0.02)
        assert cluster.master_of(channel(victim)) != killed
        for license_id in ids:  # resubscribed without a new listen(), the others never lost
            await h.commit_and_publish(license_id)
        assert sorted((e.license_id, e.seq) for e in [await h.next() for _ in ids]) == sorted((i, 2) for i in ids)
    finally:
        await transport.close()
        await engine.dispose()


async def collect(client: LicenseClient, until: int, into: list[int]) -> None:
    async with contextlib.aclosing(aiter(client)) as events:
        async for event in events:
            into.append(event["seq"])
            if event["seq"] >= until:
                return


async def test_every_client_of_two_stream_processes_gets_every_event_across_a_master_failover(
    cluster: LocalCluster, pg_url: str, spawn: Callable[..., Process]
) -> None:
    # A sweep interval longer than the test: events before the failover can only arrive through
    # the cluster, and those lost during it only through the resubscription's on_gap sweep or the
    # stream's gap fetch, never through a periodic sweep.
    env = process_env(pg_url, REDIS_URL=cluster.url, BROKER_POLL_INTERVAL="60")
    webhook, streams = spawn("webhook", env), [spawn("stream", env), spawn("stream", env)]
    async with httpx.AsyncClient() as http:
        metrics = [(await http.get(f"{stream.url}/metrics")).text for stream in streams]
    for text in metrics:
        assert 'license_broker_transport_up{transport="redis-cluster"} 1.0' in text
    ids = licenses_on_every_master(cluster, 2)
    rounds = 12
    received: dict[tuple[str, int], list[int]] = {(i, s): [] for i in ids for s in range(len(streams))}
    tasks = [
        asyncio.create_task(
            collect(LicenseClient(streams[s].url, i, token_for(i), min_backoff=0.05, max_backoff=0.5), rounds, seqs)
        )
        for (i, s), seqs in received.items()
    ]
    try:
        await _all_have(received, 0, 15)  # connected: the current state, seq 0
        samples = {i: SampleEvents(i) for i in ids}
        created = int(time.time())
        victim = cluster.master_of(channel(ids[0]))
        async with httpx.AsyncClient(timeout=10) as http:
            for n in range(1, rounds + 1):
                if n == 4:
                    cluster.kill(victim)  # mid-traffic; its replica takes over after node-timeout
                for i in ids:
                    status = "active" if n % 2 else "past_due"
                    event = samples[i].subscription_event("customer.subscription.updated", status, created + n)
                    response = await post_event(http, webhook.url, event)
                    assert response.status_code == 200, response.text
                    assert response.json()["seq"] == n
                if n == 3:
                    # Before the failover everything came through the cluster (the sweep sleeps).
                    await _all_have(received, 3, 5)
        await _all_have(received, rounds, 30)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for (license_id, s), seqs in received.items():
        assert seqs == list(range(rounds + 1)), f"{license_id} on stream {s}: {seqs}"
    assert cluster.master_of(channel(ids[0])) != victim


async def _all_have(received: dict[Any, list[int]], seq: int, deadline: float) -> None:
    def done() -> bool:
        return all(seqs and seqs[-1] >= seq for seqs in received.values())

    try:
        await async_wait_until(done, deadline, f"every client to reach seq {seq}")
    except TimeoutError as exc:
        behind = {client: seqs[-1:] for client, seqs in received.items() if not (seqs and seqs[-1] >= seq)}
        raise TimeoutError(f"{exc}; the last seq of each client behind: {behind}") from None


def _worker_pids(supervisor: int) -> list[int]:
    """uvicorn's worker processes (multiprocessing spawn), not its resource tracker."""
    pids = [
        int(pid)
        for task in Path(f"/proc/{supervisor}/task").iterdir()
        for pid in (task / "children").read_text().split()
    ]
    workers = []
    for pid in pids:
        with contextlib.suppress(FileNotFoundError):
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                workers.append(pid)
    return workers


def _connections_by_pid(pids: list[int], port: int) -> dict[int, int]:
    """How many established TCP connections to `port` each process holds (Linux /proc)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01":  # ESTABLISHED
                    inodes.add(fields[9])
    counts: dict[int, int] = {}
    for pid in pids:
        with contextlib.suppress(FileNotFoundError, PermissionError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if target.startswith("socket:[") and target[8:-1] in inodes:
                        counts[pid] = counts.get(pid, 0) + 1
    return counts


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux /proc to tell the workers apart")
async def test_clients_spread_over_two_workers_of_one_stream_command_all_get_their_events(
    shared_cluster: LocalCluster, pg_url: str, tmp_path: Path
) -> None:
    env = process_env(pg_url, REDIS_URL=shared_cluster.url, BROKER_POLL_INTERVAL="60")
    webhook = Process(["webhook"], env, free_port(), tmp_path / "webhook.log")
    stream = Process(["stream", "--workers", "2"], env, free_port(), tmp_path / "stream.log")
    tasks: list[asyncio.Task[None]] = []
    try:
        webhook.wait_ready()
        stream.wait_ready()
        wait_until(lambda: len(_worker_pids(stream.proc.pid)) == 2, what="two workers")
        received: dict[str, list[int]] = {}
        spread: dict[int, int] = {}
        # Which worker accepts a connection is the kernel's choice: add clients (one HTTP
        # connection each) until both workers hold some.
        while len(spread) < 2 and len(received) < 48:
            for i in [new_license() for _ in range(6)]:
                received[i] = []
                client = LicenseClient(stream.url, i, token_for(i), min_backoff=0.05, max_backoff=0.5)
                tasks.append(asyncio.create_task(collect(client, 2, received[i])))
            await _all_have(received, 0, 15)
            spread = _connections_by_pid(_worker_pids(stream.proc.pid), stream.port)
        # At least one per client: a just-closed /healthz connection may still count for a moment.
        assert len(spread) == 2 and sum(spread.values()) >= len(received), spread
        ids = list(received)
        async with httpx.AsyncClient(timeout=10) as http:
            for n, status in enumerate(("active", "past_due"), start=1):
                for i in ids:
                    event = SampleEvents(i).subscription_event(
                        "customer.subscription.updated", status, int(time.time())
                    )
                    assert (await post_event(http, webhook.url, event)).json()["seq"] == n
        await _all_have(received, 2, 10)  # through the cluster: the sweep sleeps
        assert all(seqs == [0, 1, 2] for seqs in received.values()), received
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        stream.stop()
        webhook.stop()


def test_a_cluster_url_names_its_seed_nodes_and_credentials() -> None:
    settings = Settings.from_env({"REDIS_URL": "redis+cluster://u:p%40ss@10.0.0.1:7000,10.0.0.2:7001"})
    assert (settings.transport, settings.redis_cluster) == ("redis", True)
    assert parse_cluster_url(settings.redis_url or "") == ClusterAddress(
        (("10.0.0.1", 7000), ("10.0.0.2", 7001)), "u", "p@ss", ssl=False
    )
    assert parse_cluster_url("rediss+cluster://redis.internal:6379").ssl
    assert not Settings.from_env({"REDIS_URL": "redis://127.0.0.1:6379/0"}).redis_cluster


@pytest.mark.parametrize("url", ["redis+cluster://", "redis+cluster://host", "redis+cluster://h:1,h2:x"])
def test_a_malformed_cluster_url_stops_start_up_naming_redis_url(url: str) -> None:
    with pytest.raises(SettingsError, match=r"^REDIS_URL: "):
        Settings.from_env({"REDIS_URL": url})
