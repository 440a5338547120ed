"""A local Redis Cluster of our own: redis-server processes on free ports, joined by
`redis-cli --cluster create`. The bench's cluster row and the test suite both start one."""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import redis
from redis.crc import key_slot

from bench.stack import free_port


class ClusterUnavailable(RuntimeError):
    """redis-server or redis-cli is not installed."""


def _wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.01)


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

    def command(self, port: int, *args: str) -> Any:
        return self.client(port).execute_command(*args)  # type: ignore[no-untyped-call]

    def start(self) -> None:
        # Free ports are only free when chosen: another process may take one before redis-server
        # binds it. Such a start fails as a whole; try once more on fresh ports.
        try:
            self._start()
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, TimeoutError):
            self.stop()
            self.ports = [free_port() for _ in self.ports]
            self.dir = tempfile.mkdtemp(prefix="lb-cluster-")
            self.procs = {}
            self._start()

    def _start(self) -> None:
        server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
        if server is None or cli is None:
            raise ClusterUnavailable("redis-server and redis-cli are needed for a local Redis Cluster")
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
            _wait_until(lambda port=port: self._pings(port), 10, f"redis-server on {port}")  # type: ignore[misc]
        subprocess.run(
            [
                *(cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports)),
                *("--cluster-replicas", str(self.replicas), "--cluster-yes"),
            ],
            check=True,
            capture_output=True,
            timeout=30,
        )
        _wait_until(self.healthy, 30, "the cluster to be ok with every replica in sync")

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
                if b"cluster_state:ok" not in self.command(port, "CLUSTER", "INFO"):
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
                for start, end, master, *_ in self.command(port, "CLUSTER", "SLOTS"):
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


@contextlib.contextmanager
def local_cluster(masters: int = 3, replicas: int = 1) -> Iterator[LocalCluster]:
    cluster = LocalCluster(masters, replicas)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
