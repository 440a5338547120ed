"""The suite's fixtures, one module per concern under tests/support/, loaded as plugins."""

from __future__ import annotations

pytest_plugins = [
    "tests.support.services",
    "tests.support.processes",
    "tests.support.faults",
    "tests.support.cluster",
    "tests.support.transports",
    "tests.support.stripe_api",
]
