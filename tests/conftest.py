"""The suite's fixtures, one module per concern under tests/support/, loaded as plugins."""

from __future__ import annotations

import os

import pytest

pytest_plugins = [
    "tests.support.services",
    "tests.support.processes",
    "tests.support.faults",
    "tests.support.cluster",
    "tests.support.transports",
    "tests.support.stripe_api",
]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Under `make mutants` (docs/testing.md) the tests that run the broker in processes of their
    # own are left out: mutmut sees which functions a test reaches only inside the test's process.
    if "MUTANT_UNDER_TEST" not in os.environ:
        return
    spawning = [item for item in items if "spawn" in getattr(item, "fixturenames", ())]
    if spawning:
        config.hook.pytest_deselected(items=spawning)
        items[:] = [item for item in items if item not in spawning]
