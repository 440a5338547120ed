"""What a process imports before it does anything: the command line answers `--help` and refuses
a bad setting without loading the servers' stack, and a stream process starts without the
`stripe` package (only a webhook, or a stream with STRIPE_API_KEY making checkouts, needs it) or
Alembic (only `migrate` and the embedded default). Each is a fresh interpreter: sys.modules of
this one holds everything the suite imported."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("sqlalchemy", "stripe", "httpx", "uvicorn", "starlette", "alembic", "redis", "psycopg")


def loaded_after(statement: str) -> set[str]:
    probe = f"import sys\n{statement}\nprint(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    return set(done.stdout.split())


def test_the_command_line_loads_none_of_the_servers_stack_to_parse_and_check_its_settings() -> None:
    assert loaded_after("from license_broker.cli import parser\nparser().parse_args(['token', 'lic_x'])") == set()


@pytest.mark.parametrize("app", ["stream.app", "webhook.app"])
def test_a_server_starts_without_alembic_and_a_stream_without_stripe(app: str) -> None:
    loaded = loaded_after(f"import {app}")
    assert "alembic" not in loaded
    assert ("stripe" in loaded) == (app == "webhook.app")  # the webhook checks signatures with it
    assert {"sqlalchemy", "starlette"} <= loaded  # what the probe sees: the servers do load their stack
