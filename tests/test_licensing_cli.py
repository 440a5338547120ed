"""`license-broker key` and `license-broker machines`, run as the seller runs them: processes of
their own against the database (and Redis) the servers use."""

from __future__ import annotations

import asyncio
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import orjson

from broker.licensing import keys
from tests.support.activations import KEY_SECRET, EventStream, activate, bearer, buy, key_of, keyed_env
from tests.support.licenses import new_license
from tests.support.processes import Process, process_env, run_module
from tests.support.waiting import async_wait_until


async def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(run_module, "license_broker", *args, env=env, timeout=60)


async def test_key_shows_and_rotates_a_licenses_key(pg_url: str, spawn: Callable[..., Process]) -> None:
    env = process_env(pg_url, **keyed_env())
    server = spawn("serve", env)
    license_id = new_license()
    async with httpx.AsyncClient(timeout=10) as client:
        session_key = await key_of(client, server.url, await buy(client, server.url, license_id))
        shown = await cli("key", license_id, env=env)
        assert (shown.returncode, shown.stdout.strip()) == (0, session_key)
        assert (await activate(client, server.url, session_key)).status_code == 201
        rotated = await cli("key", license_id, "--rotate", env=env)
        assert rotated.returncode == 0 and "no longer activates" in rotated.stderr
        fresh = rotated.stdout.strip()
        assert keys.normalize(fresh) != keys.normalize(session_key)
        assert (await activate(client, server.url, session_key)).status_code == 403
        assert (await activate(client, server.url, fresh)).status_code == 201
        missing = await cli("key", "lic_nobody", env=env)
        assert missing.returncode == 1 and "no license 'lic_nobody'" in missing.stderr
        # A rotation of LICENSE_KEY_SECRET: the new secret first; --reseal, then the old one can go.
        rotated_env = env | {"LICENSE_KEY_SECRET": f"{'n' * 40},{KEY_SECRET}"}
        assert (await cli("key", "--reseal", env=rotated_env)).returncode == 0
        after = await cli("key", license_id, env=env | {"LICENSE_KEY_SECRET": "n" * 40})
        assert (after.returncode, after.stdout.strip()) == (0, fresh)
    off = await cli("key", license_id, env={k: v for k, v in env.items() if k != "LICENSE_KEY_SECRET"})
    assert off.returncode == 2
    [line] = off.stderr.strip().splitlines()
    assert line.startswith("license-broker: LICENSE_KEY_SECRET: required by key and machines")


async def test_machines_lists_and_release_ends_the_stream_of_another_process(
    pg_url: str, redis_url: str, spawn: Callable[..., Process]
) -> None:
    env = process_env(pg_url, REDIS_URL=redis_url, BROKER_POLL_INTERVAL="30", **keyed_env())
    webhook, stream_process = spawn("webhook", env), spawn("stream", env)
    license_id = new_license()
    async with httpx.AsyncClient(timeout=10) as client:
        key = await key_of(client, stream_process.url, await buy(client, webhook.url, license_id))
        machine = (await activate(client, stream_process.url, key, name="build box", platform="linux")).json()
        listed = await cli("machines", license_id, "--json", env=env)
        body = orjson.loads(listed.stdout)
        assert (body["used"], body["max"], body["machines"][0]["name"]) == (1, 3, "build box")
        text = await cli("machines", license_id, env=env)
        assert machine["machine"]["id"] in text.stdout and "1 of 3 machine(s)" in text.stderr
        url = f"{stream_process.url}/api/licenses/{license_id}/events"
        async with EventStream(client, url, bearer(machine["token"])) as stream:
            await stream.until("message")
            started = time.monotonic()
            released = await cli("machines", "release", machine["machine"]["id"], env=env)
            assert released.returncode == 0, released.stderr
            await stream.end(within=5)
            # The stream process sweeps every 30 s here: an end this soon is the command's notice
            # (the command's own start-up is most of the time).
            took = time.monotonic() - started
        again = await cli("machines", "release", machine["machine"]["id"], env=env)
        assert again.returncode == 1 and "no machine" in again.stderr
    assert took < 25  # well inside the 30 s sweep, whatever the machine's load


async def test_make_run_needs_none_of_the_new_settings_and_prints_where_the_key_shows(
    tmp_path: Path, spawn: Callable[..., Process]
) -> None:
    env = {"BROKER_DEV": "1", "DATABASE_URL": f"sqlite:///{tmp_path / 'demo.db'}", "STRIPE_WEBHOOK_SECRET": "",
           "STREAM_TOKEN_SECRET": "", "REDIS_URL": "", "BROKER_TRANSPORT": "", "LICENSE_KEY_SECRET": ""}  # fmt: skip
    server = spawn("serve", env)
    await async_wait_until(lambda: "/activate?session_id=" in server.log.read_text(), what="the banner")
    page = re.search(r"^\s+(http://\S+/activate\?session_id=(cs_test_\w+))$", server.log.read_text(), re.M)
    assert page is not None, server.log.read_text()
    async with httpx.AsyncClient(timeout=10) as client:
        assert (await client.get(page.group(1))).status_code == 200
        json_url = f"{server.url}/api/checkout-sessions/{page.group(2)}/license"
        assert (await client.get(json_url)).status_code == 404  # not paid yet
        banner = server.log.read_text()
        exports = dict(re.findall(r"^\s+export (STRIPE_WEBHOOK_SECRET)=(\S+)$", banner, re.M))
        paid = await cli("send", "pay", "lic_demo", "--url", server.url, env=exports)
        assert paid.returncode == 0, paid.stdout + paid.stderr
        shown = (await client.get(json_url)).json()
        assert (shown["license_id"], shown["entitled"]) == ("lic_demo", True)
        activated = await activate(client, server.url, shown["key"])
        assert activated.status_code == 201 and activated.json()["lease"] is not None
