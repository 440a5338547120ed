"""The suite's fixtures, one module per concern under tests/support/, loaded as plugins."""

from __future__ import annotations

import importlib

pytest_plugins = [
    "tests.support.services",
    "tests.support.processes",
    "tests.support.faults",
    "tests.support.cluster",
    "tests.support.transports",
]


def __getattr__(name: str) -> object:
    # Test modules written before the split import their helpers from here. Looked up on use:
    # importing the plugins above here would keep pytest from rewriting their asserts.
    for module in (
        "tests.support.licenses",
        "tests.support.processes",
        "tests.support.services",
        "tests.support.waiting",
        "tests.support.faults",
        "tests.support.cluster",
        "tests.support.transports",
    ):
        if hasattr(found := importlib.import_module(module), name):
            return getattr(found, name)
    raise AttributeError(name)
