"""A local Redis Cluster of our own: redis-server processes on free ports, joined by
`redis-cli --cluster create`. The test suite (tests/support/cluster.py) and the bench's cluster
row both start one; it lives beside them, not inside either, so that neither imports the other,
and it is not part of the installed package.

Formation is bounded by one deadline and retried on fresh ports (a free port is only free when
chosen: another process may bind it before redis-server does). A cluster that does not form
raises ClusterDidNotForm with what each node said (CLUSTER INFO, its role, the end of its log),
so that a failure on a loaded machine can be read from the test report."""

from __future__ import annotations

import contextlib
import ctypes
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.retry import Retry


def _die_with_parent() -> None:
    """In a node's process before redis-server runs: the kernel kills it when the process that
    started it dies (prctl PR_SET_PDEATHSIG), so that a test process killed by a timeout (mutmut
    kills a hung mutant's tests so) leaves no cluster running. Linux only."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG


class ClusterUnavailable(RuntimeError):
    """redis-server or redis-cli is not installed."""


class ClusterDidNotForm(RuntimeError):
    """The nodes started but did not become one healthy cluster before the deadline."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.01)


class _NodeExited(RuntimeError):
    """A node exited while the cluster formed (typically: its port was taken meanwhile)."""


class LocalCluster:
    """`masters` masters with `replicas` replicas each, on free ports of 127.0.0.1. The deadline
    stays under the suite's per-test timeout (120 s), so that a failure reports what the nodes
    said rather than a stack dump from the timeout."""

    def __init__(
        self, masters: int = 3, replicas: int = 1, node_timeout_ms: int = 1000, deadline: float = 90.0
    ) -> None:
        self.masters, self.replicas, self.node_timeout_ms = masters, replicas, node_timeout_ms
        self.deadline = deadline
        self.ports: list[int] = []
        self.dir = ""
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{port}" for port in self.ports)

    def client(self, port: int, timeout: float = 2) -> redis.Redis:
        """A client of one node, for the caller to close. No retries: a node that does not answer
        in time is polled again by the caller."""
        return redis.Redis(port=port, socket_connect_timeout=0.5, socket_timeout=timeout, retry=Retry(NoBackoff(), 0))

    def command(self, port: int, *args: str, timeout: float = 2) -> Any:
        """One command to one node, on a connection closed after it (one left to the garbage
        collector is an unclosed socket, which a test's `-W error` turns into a failure)."""
        with self.client(port, timeout) as node:
            return node.execute_command(*args)

    def start(self) -> None:
        server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
        if server is None or cli is None:
            raise ClusterUnavailable("redis-server and redis-cli are needed for a local Redis Cluster")
        deadline = time.monotonic() + self.deadline
        reports: list[str] = []
        while True:
            try:
                self._form(server, cli, deadline)
                return
            except (_NodeExited, subprocess.CalledProcessError, subprocess.TimeoutExpired, TimeoutError) as exc:
                reports.append(f"attempt {len(reports) + 1}: {exc}\n{self.diagnostics()}")
                self.stop()
            # Another attempt on fresh ports, if there is time left for one to succeed.
            if deadline - time.monotonic() < 10:
                raise ClusterDidNotForm(
                    f"the local Redis Cluster did not form within {self.deadline:g} s\n" + "\n".join(reports)
                )

    def _form(self, server: str, cli: str, deadline: float) -> None:
        self.ports = [free_port() for _ in range(self.masters * (1 + self.replicas))]
        self.dir = tempfile.mkdtemp(prefix="lb-cluster-")
        self.procs = {}
        for port in self.ports:
            self.procs[port] = subprocess.Popen(
                [
                    # An explicit bus port: the default (port + 10000) may not exist for a high free port.
                    *(server, "--port", str(port), "--cluster-port", str(free_port()), "--bind", "127.0.0.1"),
                    *("--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf"),
                    *("--cluster-node-timeout", str(self.node_timeout_ms), "--save", "", "--appendonly", "no"),
                    # Replicas sync at once (the default waits 5 s for more replicas to share a transfer).
                    *("--repl-diskless-sync-delay", "0", "--logfile", self._log(port).name),
                ],
                cwd=self.dir,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        self._wait(lambda: all(self._pings(port) for port in self.ports), deadline, "every node to answer PING")
        subprocess.run(
            [
                *(cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports)),
                *("--cluster-replicas", str(self.replicas), "--cluster-yes"),
            ],
            check=True,
            capture_output=True,
            timeout=max(1.0, deadline - time.monotonic()),
        )
        self._wait(self.healthy, deadline, "the cluster to be ok with every replica in sync")

    def _wait(self, predicate: Callable[[], bool], deadline: float, what: str) -> None:
        def done() -> bool:
            if exited := {port: proc.returncode for port, proc in self.procs.items() if proc.poll() is not None}:
                raise _NodeExited(f"nodes exited (port: code) {exited} while waiting for {what}")
            return predicate()

        wait_until(done, max(0.0, deadline - time.monotonic()), what)

    def _log(self, port: int) -> Path:
        return Path(self.dir) / f"node-{port}.log"

    def _pings(self, port: int) -> bool:
        try:
            return bool(self.command(port, "PING", timeout=0.5))
        except redis.RedisError:
            return False

    def alive(self) -> list[int]:
        return [port for port, proc in self.procs.items() if proc.poll() is None]

    def healthy(self) -> bool:
        """Every live node says cluster_state:ok, and every master with slots has a replica in sync."""
        try:
            masters = 0
            for port in self.alive():
                if b"cluster_state:ok" not in self.command(port, "CLUSTER", "INFO"):
                    return False
                info = self.command(port, "INFO", "replication")
                if info["role"] == "master":
                    masters += 1
                elif info.get("master_link_status") != "up":
                    return False
            return masters == self.masters
        except redis.RedisError:
            return False

    def diagnostics(self) -> str:
        """What each node says about itself and the cluster, and the end of its log."""
        lines: list[str] = []
        for port, proc in self.procs.items():
            code = proc.poll()
            lines.append(f"-- node 127.0.0.1:{port} " + ("(running)" if code is None else f"(exited with {code})"))
            if code is None:
                lines.append(f"   {self._describe(port)}")
            with contextlib.suppress(OSError):
                tail = self._log(port).read_text(errors="replace").splitlines()[-8:]
                lines += [f"   | {line}" for line in tail]
        return "\n".join(lines)

    def _describe(self, port: int) -> str:
        keep = ("cluster_state", "cluster_slots_assigned", "cluster_slots_ok", "cluster_known_nodes")
        try:
            info = [i for i in self.command(port, "CLUSTER", "INFO").decode().split() if i.startswith(keep)]
            replication = self.command(port, "INFO", "replication")
        except redis.RedisError as exc:
            return f"no answer: {exc}"
        return " ".join([*info, "role", replication["role"], replication.get("master_link_status", "")]).rstrip()

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
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def local_cluster(masters: int = 3, replicas: int = 1) -> Iterator[LocalCluster]:
    cluster = LocalCluster(masters, replicas)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
