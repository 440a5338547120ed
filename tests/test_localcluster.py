"""The local Redis Cluster's own failure path: a cluster that does not form raises, with what
each node said, instead of leaving the tests to skip or to time out without a word."""

from __future__ import annotations

import socket

import pytest

import localcluster
from localcluster import ClusterDidNotForm, ClusterUnavailable, LocalCluster
from tests.support.services import unavailable


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
