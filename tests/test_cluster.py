"""Redis Cluster with sharded pub/sub, and several stream processes: a real local cluster
(three masters, one replica each) started by the test, real webhook and stream processes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from redis.crc import key_slot

from broker.db import create_engine
from broker.settings import ClusterAddress, Settings, SettingsError, parse_cluster_url
from broker.transports.base import channel
from broker.transports.redis_cluster import RedisClusterTransport
from stream.client import LicenseClient
from tests.conftest import (
    Process,
    async_wait_until,
    free_port,
    new_license,
    post_event,
    process_env,
    token_for,
    unavailable,
    wait_until,
)

# The shared transport suite, run here against the cluster by overriding its `harness` fixture.
from tests.test_transports import (  # noqa: F401
    Harness,
    test_a_message_published_after_listen_reaches_the_handler,
    test_close_is_safe_twice_and_check_reports_health,
    test_many_licenses_share_the_transport,
    test_messages_of_one_license_arrive_in_publish_order,
    test_nothing_arrives_after_unlisten,
    test_only_listened_licenses_are_delivered,
)
from webhook.samples import SampleEvents

pytestmark = pytest.mark.slow


class LocalCluster:
    """Six redis-server processes on free ports, joined by `redis-cli --cluster create`."""

    def __init__(self, masters: int = 3, replicas: int = 1, node_timeout_ms: int = 1000) -> None:
        self.masters, self.replicas, self.node_timeout_ms = masters, replicas, node_timeout_ms
        self.ports = [free_port() for _ in range(masters * (1 + replicas))]
        self.dir = tempfile.mkdtemp(prefix="lb-cluster-")
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{port}" for port in self.ports)

    def client(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, socket_connect_timeout=0.5, socket_timeout=2)

    def start(self) -> None:
        server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
        if server is None or cli is None:
            unavailable("redis-server and redis-cli", FileNotFoundError("redis-server/redis-cli"))
        assert server is not None and cli is not None
        for port in self.ports:
            # An explicit bus port: the default (port + 10000) may not exist for a high free port.
            self.procs[port] = subprocess.Popen(
                [
                    *(server, "--port", str(port), "--cluster-port", str(free_port()), "--bind", "127.0.0.1"),
                    *("--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf"),
                    *("--cluster-node-timeout", str(self.node_timeout_ms), "--save", "", "--appendonly", "no"),
                ],
                cwd=self.dir,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        for port in self.ports:
            wait_until(lambda port=port: self._pings(port), what=f"redis-server on {port}")  # type: ignore[misc]
        subprocess.run(
            [
                *(cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports)),
                *("--cluster-replicas", str(self.replicas), "--cluster-yes"),
            ],
            check=True,
            capture_output=True,
            timeout=30,
        )
        wait_until(self.healthy, timeout=30, what="the cluster to be ok with every replica in sync")

    def _pings(self, port: int) -> bool:
        try:
            return bool(self.client(port).ping())
        except redis.RedisError:
            return False

    def alive(self) -> list[int]:
        return [port for port, proc in self.procs.items() if proc.poll() is None]

    def healthy(self) -> bool:
        """Every live node says cluster_state:ok, and every master with slots has a replica in sync."""
        try:
            masters = 0
            for port in self.alive():
                node = self.client(port)
                if b"cluster_state:ok" not in node.execute_command("CLUSTER", "INFO"):
                    return False
                info = node.info("replication")
                if info["role"] == "master":
                    masters += 1
                elif info.get("master_link_status") != "up":
                    return False
            return masters == self.masters
        except redis.RedisError:
            return False

    def master_of(self, name: str) -> int:
        """The port of the master that owns the channel's slot, as the cluster sees it now."""
        slot = key_slot(name.encode())
        for port in self.alive():
            with contextlib.suppress(redis.RedisError):
                for start, end, master, *_ in self.client(port).execute_command("CLUSTER", "SLOTS"):
                    if start <= slot <= end:
                        return int(master[1])
        raise LookupError(f"no master for slot {slot}")

    def master_ports(self) -> set[int]:
        return {self.master_of(f"{{{tag}}}") for tag in range(200)}

    def kill(self, port: int) -> None:
        self.procs[port].send_signal(signal.SIGKILL)
        self.procs[port].wait()

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def cluster() -> Iterator[LocalCluster]:
    local = LocalCluster()
    try:
        local.start()
        yield local
    finally:
        local.stop()


@pytest.fixture(scope="module")
def shared_cluster() -> Iterator[LocalCluster]:
    """For the tests that do not break it."""
    local = LocalCluster()
    try:
        local.start()
        yield local
    finally:
        local.stop()


@pytest.fixture
async def harness(shared_cluster: LocalCluster, pg_url: str) -> AsyncIterator[Harness]:
    engine = create_engine(Settings(database_url=pg_url))
    transport = RedisClusterTransport(shared_cluster.url)
    h = Harness(transport, engine)
    await transport.connect()
    await transport.start(h.on_message, h.on_gap)
    try:
        yield h
    finally:
        await transport.close()
        await engine.dispose()


def licenses_on_every_master(cluster: LocalCluster, per_master: int) -> list[str]:
    """License ids whose channels spread over every master, `per_master` on each."""
    by_master: dict[int, list[str]] = {}
    while len(by_master) < cluster.masters or any(len(ids) < per_master for ids in by_master.values()):
        license_id = new_license()
        ids = by_master.setdefault(cluster.master_of(channel(license_id)), [])
        if len(ids) < per_master:
            ids.append(license_id)
    return [license_id for ids in by_master.values() for license_id in ids]


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
        subscribed = {
            name.decode()
            for name in shared_cluster.client(port).execute_command("PUBSUB", "SHARDCHANNELS", "license:*")
        }
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
    async for event in client:
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

    await async_wait_until(done, deadline, f"every client to reach seq {seq}")


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
