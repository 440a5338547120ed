"""The Python client (license_broker_client, installed from its wheel) with license keys, against
real servers on Postgres: buy -> key -> activate on N machines -> the next one gets the limit with
the list -> release one -> its stream ends and its token is refused -> the new machine activates
and unlocks live; machine tokens renewed; a lease bound to one computer refused on another; each
refusal its own error."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from license_broker_client import (
    Activation,
    BrokerUnavailable,
    InvalidLicenseKey,
    LeaseVerifier,
    LicenseClient,
    MachineLimitReached,
    MachineReleased,
    MalformedLicenseKey,
    RateLimited,
    machine_fingerprint,
    normalize_license_key,
)

from broker.licensing import keys
from broker.signing import tokens
from broker.signing.leases import private_pem, public_pem
from license_broker.embedded import create_app
from tests.support.activations import LEASE_KEYS, bearer, buy, key_of, keyed_env, keyed_settings
from tests.support.licenses import new_license, post_event
from tests.support.processes import Process, process_env, serving
from tests.support.waiting import async_wait_until
from webhook.samples import SampleEvents

APP = "com.example.draw"
PINNED = public_pem(LEASE_KEYS.signing.public_key())


def app_on(url: str, directory: Path, os_id: str, **options: Any) -> LicenseClient:
    """The app on one computer (`os_id`: its OS machine id), its files in `directory`."""
    verifier = LeaseVerifier(PINNED)
    return LicenseClient(url, app_id=APP, machine_id=os_id, verifier=verifier, cache=directory / "lease",
                         min_backoff=0.05, max_backoff=0.5, **options)  # fmt: skip


class Running:
    """`async for state in client` in a task: what it received, how it ended."""

    def __init__(self, client: LicenseClient) -> None:
        self.client = client
        self.states: list[dict[str, Any]] = []
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async for state in self.client:
            self.states.append(state)

    @property
    def error(self) -> BaseException | None:
        return self.task.exception() if self.task.done() and not self.task.cancelled() else None

    async def unlocked(self, within: float = 10) -> None:
        await async_wait_until(lambda: self.client.is_entitled() or self.task.done(), within, "unlocked")
        if self.task.done():
            self.task.result()

    async def stop(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self.task


@contextlib.asynccontextmanager
async def running(*clients: LicenseClient) -> AsyncIterator[list[Running]]:
    started = [Running(client) for client in clients]
    try:
        yield started
    finally:
        for run in started:
            await run.stop()


def own_redis_db(redis_url: str) -> str:
    # Failed attempts are counted in Redis per client address (127.0.0.1 for every test on this
    # machine): a database of their own keeps other suites' failures out of these tests' limits.
    return redis_url.rsplit("/", 1)[0] + "/13"


@pytest.mark.slow
async def test_buy_activate_up_to_the_limit_release_one_and_the_next_machine_takes_its_place(
    pg_url: str, redis_url: str, spawn: Callable[..., Process], tmp_path: Path
) -> None:
    env = process_env(pg_url, REDIS_URL=own_redis_db(redis_url), BROKER_POLL_INTERVAL="30", LICENSE_MAX_MACHINES="2",
                      LICENSE_SIGNING_KEY=private_pem(LEASE_KEYS.signing), **keyed_env())  # fmt: skip
    webhook, first, second = spawn("webhook", env), spawn("stream", env), spawn("stream", env)
    license_id = new_license()
    async with httpx.AsyncClient(timeout=10) as http:
        key = await key_of(http, first.url, await buy(http, webhook.url, license_id))  # the signed webhook's
    statuses: list[tuple[float, str]] = []
    laptop = app_on(first.url, tmp_path / "laptop", "os-id-laptop",
                    on_status=lambda status: statuses.append((time.monotonic(), status)))  # fmt: skip
    desktop = app_on(first.url, tmp_path / "desktop", "os-id-desktop")
    newcomer = app_on(second.url, tmp_path / "new", "os-id-new")
    assert not laptop.activated and laptop.status == "stopped"
    async with running(laptop, desktop) as (on_laptop, on_desktop):
        await async_wait_until(lambda: laptop.status == "inactive", 5, "waiting for a key")
        activated = await laptop.activate(key.lower(), name="old laptop")
        assert isinstance(activated, Activation) and activated.created
        assert (activated.license_id, activated.used, activated.max) == (license_id, 1, 2)
        assert laptop.is_entitled()  # the activation's own lease, before the stream says anything
        await on_laptop.unlocked()
        await desktop.activate(key, name="desktop")
        await on_desktop.unlocked()
        assert laptop.lease is not None and laptop.lease.machine_id == laptop.machine_id
        assert laptop.lease.fingerprint == machine_fingerprint(APP, machine_id="os-id-laptop")
        await async_wait_until(lambda: bool(on_laptop.states) and on_desktop.states != [], 10, "a state on each")
        assert on_laptop.states[-1]["license_id"] == license_id and on_laptop.states[-1]["entitled"] is True

        with pytest.raises(MachineLimitReached) as full:
            await newcomer.activate(key, name="new computer")
        assert full.value.max == 2 and not newcomer.activated
        assert [(m.name, m.id) for m in full.value.machines] == [("old laptop", laptop.machine_id),
                                                                   ("desktop", desktop.machine_id)]  # fmt: skip
        listed = await newcomer.machines(key=key)  # no token yet: the key lists them
        assert (listed.used, listed.max, [m.current for m in listed]) == (2, 2, [False, False])
        assert [m.current for m in await desktop.machines()] == [False, True]

        old_token = json.loads((tmp_path / "laptop" / "lease.machine").read_text())["token"]
        released_at = time.monotonic()
        await newcomer.release(full.value.machines[0].id, key=key)  # through the other stream process
        # Its stream ends at once (the broker's notice, through Redis); the client learns why when
        # it reconnects, after its backoff: 401 machine released.
        await async_wait_until(lambda: on_laptop.task.done(), 5, "the released laptop's client to stop")
        ended = [at for at, status in statuses if at > released_at and status == "reconnecting"]
        ended_after = ended[0] - released_at
        assert isinstance(on_laptop.error, MachineReleased)
        assert laptop.status == "unauthorized" and not laptop.activated and not laptop.is_entitled()
        assert not (tmp_path / "laptop" / "lease.machine").exists() and not (tmp_path / "laptop" / "lease").exists()
        assert (tmp_path / "laptop" / "lease.watermark").exists()  # no older lease comes back
        async with httpx.AsyncClient(timeout=10) as http:
            refused = await http.get(f"{second.url}/api/machines", headers=bearer(old_token))
        assert (refused.status_code, refused.json()) == (401, {"error": "machine released"})

        again = await newcomer.activate(key, name="new computer")
        assert again.created and (again.used, again.max) == (2, 2)
        async with running(newcomer) as (on_newcomer,):
            await on_newcomer.unlocked()
            assert on_desktop.error is None and desktop.is_entitled()  # the others carry on
            # A refund reaches every machine still active, through either process.
            async with httpx.AsyncClient(timeout=10) as http:
                for event in SampleEvents(license_id).for_action("refund"):
                    assert (await post_event(http, webhook.url, event)).status_code == 200
            await async_wait_until(lambda: not desktop.is_entitled() and not newcomer.is_entitled(), 10, "locked")
    assert ended_after < 1.0, ended_after


async def test_a_machine_reinstalled_is_the_same_machine_and_a_new_key_switches_the_license(
    pg_url: str, tmp_path: Path
) -> None:
    async with serving(create_app(keyed_settings(pg_url))) as url, httpx.AsyncClient(timeout=10) as http:
        first_license, second_license = new_license(), new_license()
        first_key = await key_of(http, url, await buy(http, url, first_license))
        second_key = await key_of(http, url, await buy(http, url, second_license))
        app = app_on(url, tmp_path / "app", "os-id")
        activation = await app.activate(first_key)
        # The app reinstalled: its files gone, the machine the same.
        reinstalled = app_on(url, tmp_path / "reinstalled", "os-id")
        again = await reinstalled.activate(first_key)
        assert not again.created and again.machine.id == activation.machine.id and again.used == 1
        async with running(reinstalled) as (run,):
            await run.unlocked()
            await async_wait_until(lambda: bool(run.states), 10, "a state")
            # Another key typed while live: the client follows the other license at once.
            await reinstalled.activate(second_key)
            await async_wait_until(lambda: bool(run.states) and run.states[-1]["license_id"] == second_license,
                                   10, "the second license's state")  # fmt: skip
            assert reinstalled.license_id == second_license and reinstalled.is_entitled()
            assert reinstalled.lease is not None and reinstalled.lease.license_id == second_license
            # deactivate(): this machine's place is free, and it is locked.
            await reinstalled.deactivate()
            await async_wait_until(lambda: reinstalled.status == "inactive", 5, "waiting for a key again")
            assert not reinstalled.is_entitled() and run.error is None
        seller = tokens.mint(keyed_settings(pg_url).token_secret or "", second_license, 600)
        listed = await http.get(f"{url}/api/machines", headers=bearer(seller))
        assert listed.json()["used"] == 0


async def test_the_machine_token_is_renewed_on_the_stream_and_on_request(pg_url: str, tmp_path: Path) -> None:
    settings = keyed_settings(pg_url, machine_token_ttl=60.0)
    async with serving(create_app(settings)) as url, httpx.AsyncClient(timeout=10) as http:
        license_id = new_license()
        key = await key_of(http, url, await buy(http, url, license_id))
        app = app_on(url, tmp_path, "os-id")
        await app.activate(key)
        file = tmp_path / "lease.machine"
        stored = json.loads(file.read_text())
        # The token as it was 40 s ago: more than half of its 60 s spent.
        fingerprint = machine_fingerprint(APP, machine_id="os-id")
        old, old_exp = tokens.mint_machine(
            settings, license_id, stored["machine_id"], fingerprint, now=time.time() - 40
        )
        file.write_text(json.dumps(stored | {"token": old}))
        before_connecting = app_on(url, tmp_path, "os-id")
        async with running(before_connecting) as (run,):
            await run.unlocked()
            await async_wait_until(lambda: json.loads(file.read_text())["token"] != old, 10, "renewed")
        renewed = tokens.verify_for(settings, json.loads(file.read_text())["token"])
        assert renewed.machine_id == stored["machine_id"] and renewed.expires_at > old_exp + 30

        # A renewal request that fails (the broker busy): the stream renews the token itself. A
        # token 40 s old again, minted now: the first one may have expired by now on a loaded
        # machine, and an expired token opens no stream at all (the wait would never end).
        old, old_exp = tokens.mint_machine(
            settings, license_id, stored["machine_id"], fingerprint, now=time.time() - 40
        )
        file.write_text(json.dumps(stored | {"token": old}))
        on_stream = app_on(url, tmp_path, "os-id")

        async def busy(*args: Any) -> Any:
            raise BrokerUnavailable("503: database unavailable", status=503)

        on_stream._routes.renew = busy  # type: ignore[method-assign]
        async with running(on_stream) as (run,):
            await run.unlocked()
            await async_wait_until(lambda: json.loads(file.read_text())["token"] != old, 10, "renewed on the stream")
        assert tokens.verify_for(settings, json.loads(file.read_text())["token"]).expires_at > old_exp + 30


async def test_a_genuine_lease_bound_to_one_computer_is_refused_on_another(pg_url: str, tmp_path: Path) -> None:
    async with serving(create_app(keyed_settings(pg_url))) as url, httpx.AsyncClient(timeout=10) as http:
        license_id = new_license()
        key = await key_of(http, url, await buy(http, url, license_id))
        original = app_on(url, tmp_path / "a", "os-id-a")
        activation = await original.activate(key)
        assert activation.lease is not None and original.is_entitled()
        # Every file of the app copied to computer B: the lease, the watermark, the activation
        # (with its machine token, which the broker still honours).
        (tmp_path / "b").mkdir()
        for name in ("lease", "lease.watermark", "lease.machine"):
            (tmp_path / "b" / name).write_bytes((tmp_path / "a" / name).read_bytes())
        rejected: list[Exception] = []
        copy = app_on(url, tmp_path / "b", "os-id-b", on_rejected=rejected.append)
        assert copy.activated and copy.lease is None and not copy.is_entitled()
        assert await copy.accept_lease(activation.lease) is None
        # Following the stream with the copied token: every lease names computer A.
        async with running(copy) as (run,):
            await async_wait_until(lambda: len(rejected) >= 2 and bool(run.states), 10, "the stream's lease")
            assert run.states[-1]["entitled"] is True  # the unsigned state says paid; nothing unlocks
            assert not copy.is_entitled() and copy.lease is None
        assert all("another computer" in str(error) for error in rejected)


async def test_each_refusal_reaches_the_app_as_its_own_error(pg_url: str, tmp_path: Path) -> None:
    async with serving(create_app(keyed_settings(pg_url))) as url:
        app = app_on(url, tmp_path, "os-id")
        never_issued = keys.display(keys.generate())  # well formed: only the broker can refuse it
        for _ in range(10):
            with pytest.raises(InvalidLicenseKey):
                await app.activate(never_issued)
        with pytest.raises(RateLimited) as limited:
            await app.activate(never_issued)
        assert limited.value.retry_after is not None and 0 < limited.value.retry_after <= 60
        assert not app.activated and not (tmp_path / "lease.machine").exists()


def test_the_client_reads_every_key_as_the_broker_does() -> None:
    for _ in range(40):
        key = keys.generate()
        assert normalize_license_key(key) == keys.display(key)
        for i in range(len(key)):
            for c in keys.ALPHABET + "OILU- ":
                typed = key[:i] + c + key[i + 1 :]
                try:
                    expected: str | None = keys.display(keys.normalize(typed))
                except keys.MalformedKey:
                    expected = None
                try:
                    got: str | None = normalize_license_key(typed)
                except MalformedLicenseKey:
                    got = None
                assert got == expected, typed
