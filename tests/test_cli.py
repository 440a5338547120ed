"""The `license-broker` command, and the `make run` experience end to end."""

from __future__ import annotations

import asyncio
import re
import shlex
import subprocess
import sys
import uuid
from collections.abc import Callable

import httpx
from license_broker_client import LicenseClient

from broker.settings import Settings
from broker.signing import tokens
from broker.signing.leases import LeaseKeys, public_pems
from tests.support.licenses import TOKEN_SECRET
from tests.support.processes import ROOT, Process, run_module
from tests.support.services import ADMIN_URL, psycopg_connect
from tests.support.waiting import wait_until


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return run_module("license_broker", *args, env=env, timeout=60)


def test_migrate_creates_the_schema_and_is_idempotent(postgres_url: str) -> None:
    name = f"lb_migrate_{uuid.uuid4().hex[:8]}"
    with psycopg_connect(ADMIN_URL) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = postgres_url.rsplit("/", 1)[0] + f"/{name}"
    try:
        first = cli("migrate", env={"DATABASE_URL": url})
        second = cli("migrate", env={"DATABASE_URL": url})
        assert first.returncode == 0, first.stderr
        assert second.returncode == 0, second.stderr
        with psycopg_connect(url) as conn:
            tables = {r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
            version = conn.execute("SELECT version_num FROM alembic_version").fetchone()
        assert {"licenses", "stripe_events", "subscription_event_logs", "alembic_version"} <= tables
        assert version is not None
    finally:
        with psycopg_connect(ADMIN_URL) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_migrate_against_an_unreachable_database_fails_with_one_line() -> None:
    result = cli("migrate", env={"DATABASE_URL": "postgresql://127.0.0.1:1/none"})
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("license-broker: migrate: DATABASE_URL is not reachable: ")


def test_token_prints_a_jwt_for_the_license() -> None:
    result = cli("token", "lic_42", "--ttl", "60", env={"STREAM_TOKEN_SECRET": TOKEN_SECRET})
    assert result.returncode == 0
    assert tokens.verify(TOKEN_SECRET, result.stdout.strip()).license_id == "lic_42"


def test_token_mints_what_the_stream_accepts_with_an_audience_an_issuer_and_a_maximum_lifetime() -> None:
    env = {"STREAM_TOKEN_SECRET": TOKEN_SECRET, "STREAM_TOKEN_AUDIENCE": "licenses", "STREAM_TOKEN_ISSUER": "shop",
           "STREAM_TOKEN_MAX_TTL": "600"}  # fmt: skip
    result = cli("token", "lic_42", "--ttl", "600", env=env)
    assert result.returncode == 0, result.stderr
    settings = Settings.from_env(env)
    assert tokens.verify_for(settings, result.stdout.strip()).license_id == "lic_42"
    too_long = cli("token", "lic_42", "--ttl", "601", env=env)
    assert too_long.returncode == 2
    assert too_long.stderr.strip() == "license-broker: token: --ttl must be between 0 and STREAM_TOKEN_MAX_TTL (600 s)"


def test_token_without_a_secret_names_the_setting() -> None:
    result = cli("token", "lic_42")
    assert result.returncode == 2
    assert result.stderr.strip() == "license-broker: STREAM_TOKEN_SECRET: required by token (the stream's secret)"


def test_make_run_prints_a_try_it_command_that_makes_an_event_appear(
    tmp_path,
    spawn: Callable[..., Process],  # type: ignore[no-untyped-def]
) -> None:
    """What a new user does: serve in development mode, follow the printed curl, run the printed
    send (and token) with the printed secrets, generated for this run."""
    env = {"BROKER_DEV": "1", "DATABASE_URL": f"sqlite:///{tmp_path / 'demo.db'}", "STRIPE_WEBHOOK_SECRET": "",
           "STREAM_TOKEN_SECRET": "", "REDIS_URL": "", "BROKER_TRANSPORT": "", "LICENSE_SIGNING_KEY": ""}  # fmt: skip
    server = spawn("serve", env)
    wait_until(lambda: "Then try:" in server.log.read_text(), what="the banner")
    banner = server.log.read_text()
    token = re.search(r"Authorization: Bearer (\S+)'", banner)
    send = re.search(r"^\s+(\.venv/bin/license-broker send pay lic_demo --url \S+)$", banner, re.M)
    exports = dict(re.findall(r"^\s+export (STRIPE_WEBHOOK_SECRET|STREAM_TOKEN_SECRET)=(\S+)$", banner, re.M))
    assert token and send and len(exports) == 2, banner
    assert "development_only_do_not_use" not in banner and "secret-do-not-use" not in banner
    # `token` with the printed secret mints what this server accepts.
    minted = cli("token", "lic_other", env=exports)
    assert minted.returncode == 0, minted.stderr
    other = httpx.get(
        f"{server.url}/api/licenses/lic_other", headers={"authorization": f"Bearer {minted.stdout.strip()}"}
    )
    assert other.status_code == 200
    # The key this run signs with, as `keys public` prints one, for an app to pin.
    pem = httpx.get(f"{server.url}/dev/public-key.pem")
    assert pem.status_code == 200 and "-----BEGIN PUBLIC KEY-----" in pem.text
    kid = re.search(r"lease key: kid (\S+)", banner)
    assert kid and pem.text.startswith(f"# kid {kid.group(1)} (signs)\n"), (banner, pem.text)

    async def follow() -> list[dict[str, object]]:
        stream = LicenseClient(server.url, "lic_demo", token.group(1)).connect_once()
        first = await asyncio.wait_for(anext(stream), 10)
        command = shlex.split(send.group(1))
        command[0] = sys.executable
        command[1:1] = ["-m", "license_broker"]
        result = await asyncio.to_thread(
            subprocess.run, command, cwd=ROOT, capture_output=True, text=True, timeout=30,
            env={"PATH": "/usr/bin:/bin", **exports},
        )  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
        events = [first, await asyncio.wait_for(anext(stream), 10)]
        await stream.aclose()  # type: ignore[attr-defined]
        return events

    first, paid = asyncio.run(follow())
    assert (first["status"], first["entitled"]) == ("none", False)
    assert (paid["status"], paid["entitled"], paid["seq"]) == ("active", True, 1)


def test_keys_public_prints_the_configured_key_whatever_else_the_environment_says(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """As a seller's or the Electron example's shell has it: BROKER_DEV exported, no secrets, a
    database that is not there. `keys` reads LICENSE_SIGNING_KEY and nothing else."""
    generated = cli("keys", "generate")
    assert generated.returncode == 0, generated.stderr
    keys = LeaseKeys.from_pem(generated.stdout)
    for extra in ({}, {"BROKER_DEV": "1"}, {"BROKER_DEV": "1", "DATABASE_URL": "postgresql://127.0.0.1:1/x"},
                  {"BROKER_POLL_INTERVAL": "-1", "STREAM_TOKEN_SECRET": "short"}):  # fmt: skip
        public = cli("keys", "public", env={"LICENSE_SIGNING_KEY": generated.stdout, **extra})
        assert public.returncode == 0, (extra, public.stderr)
        assert public.stdout == public_pems(keys)
        pem = tmp_path / "public-key.pem"
        pem.write_text(public.stdout)
        assert "-----BEGIN PUBLIC KEY-----" in pem.read_text()
    missing = cli("keys", "public", env={"BROKER_DEV": "1"})
    assert (missing.returncode, missing.stdout) == (2, "")
    assert missing.stderr.strip() == "license-broker: LICENSE_SIGNING_KEY: required by keys public"
