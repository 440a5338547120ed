"""Local Redis Clusters (localcluster.py): one shared by the tests that do not break it, and one
of a test's own to break. Missing binaries skip (fail under CI=true); a cluster that does not
form fails the test, with what each node said."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from localcluster import ClusterDidNotForm, ClusterUnavailable, LocalCluster
from tests.support.services import unavailable

__all__ = ["LocalCluster", "cluster", "shared_cluster"]


def _running_cluster() -> Iterator[LocalCluster]:
    local = LocalCluster()
    try:
        try:
            local.start()
        except ClusterUnavailable as exc:
            unavailable("redis-server and redis-cli", exc)
        except ClusterDidNotForm as exc:
            pytest.fail(str(exc), pytrace=False)
        yield local
    finally:
        local.stop()


@pytest.fixture(scope="session")
def shared_cluster() -> Iterator[LocalCluster]:
    """For the tests that do not break it."""
    yield from _running_cluster()


@pytest.fixture
def cluster() -> Iterator[LocalCluster]:
    """A cluster of the test's own, to break (kill a master)."""
    yield from _running_cluster()
