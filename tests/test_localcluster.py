"""The local Redis Cluster's own failure path: a cluster that does not form raises, with what
each node said, instead of leaving the tests to skip or to time out without a word."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import localcluster
from localcluster import ClusterDidNotForm, ClusterUnavailable, LocalCluster
from tests.support.services import unavailable
from tests.support.waiting import wait_until


def test_a_cluster_that_cannot_form_raises_with_each_nodes_log(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port: int = taken.getsockname()[1]
        monkeypatch.setattr(localcluster, "free_port", lambda: port)  # every node on a port in use
        cluster = LocalCluster(masters=1, replicas=0, deadline=5)
        try:
            with pytest.raises(ClusterDidNotForm) as failed:
                cluster.start()
        except ClusterUnavailable as exc:
            unavailable("redis-server and redis-cli", exc)
        finally:
            cluster.stop()
    report = str(failed.value)
    assert "did not form within 5 s" in report
    assert f"-- node 127.0.0.1:{port} (exited with" in report
    assert "Address already in use" in report  # the end of the node's own log


def test_the_nodes_die_with_the_process_that_started_them(tmp_path: Path) -> None:
    """mutmut kills a hung mutant's test process, not its children: the nodes of the cluster that
    process formed must not outlive it (they did: 123 orphans in 20 minutes of one run)."""
    pids: list[int] = []
    with subprocess.Popen(
        [sys.executable, "-c", _FORM_AND_WAIT],
        cwd=Path(localcluster.__file__).parent,
        stdout=subprocess.PIPE,
        text=True,
    ) as starter:
        try:
            assert starter.stdout is not None
            line = starter.stdout.readline()  # the nodes' pids, once the cluster has formed
            if line.startswith("unavailable:"):
                unavailable("redis-server and redis-cli", line)
            pids = [int(pid) for pid in line.split()]
            assert len(pids) == 3 and all(_running(pid) for pid in pids)
            starter.send_signal(signal.SIGKILL)
            starter.wait(10)
            wait_until(lambda: not any(_running(pid) for pid in pids), 10, "the nodes to die with their starter")
        finally:
            starter.kill()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


_FORM_AND_WAIT = """
import sys, time
from localcluster import ClusterUnavailable, LocalCluster
cluster = LocalCluster(masters=3, replicas=0)
try:
    cluster.start()
except ClusterUnavailable as exc:
    print("unavailable:", exc, flush=True)
    sys.exit(0)
print(*(proc.pid for proc in cluster.procs.values()), flush=True)
time.sleep(120)
"""


def _running(pid: int) -> bool:
    """Alive and not a zombie (a node killed with its parent is reaped by init)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False
