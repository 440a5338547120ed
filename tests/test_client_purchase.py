"""The Python client (license_broker_client, installed from its wheel) buying, trying and managing
from the app, against real servers on Postgres and the fake Stripe API (tests/support/stripe_api.py)
with the real signed webhooks: buy -> checkout_url -> the payment's webhooks -> the purchase
resolves with a lease verified with the pinned key and bound to this machine; a trial, a second
one refused, buying from it; the portal and its 409; a checkout that ends unpaid; each refusal
its own error."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from license_broker_client import (
    AlreadyPaid,
    BrokerError,
    BrokerUnavailable,
    CheckoutExpired,
    LeaseVerifier,
    LicenseClient,
    MachineIdUnavailable,
    NoCustomer,
    NotActivated,
    NotOffered,
    Purchase,
    RateLimited,
    StripeRefused,
    TrialUsed,
    UnknownPrice,
    machine_fingerprint,
)

from broker.licensing.checkout import MAX_PENDING_PER_ADDRESS
from broker.licensing.keys import display, generate
from broker.settings import Settings
from broker.signing.leases import private_pem, public_pem
from license_broker.embedded import create_app
from tests.support.activations import LEASE_KEYS, keyed_env, keyed_settings
from tests.support.licenses import post_event
from tests.support.processes import ROOT, Process, process_env, serving
from tests.support.services import count_rows
from tests.support.stripe_api import FakeStripeApi
from tests.support.waiting import async_wait_until, free_port

APP = "com.example.draw"
PINNED = public_pem(LEASE_KEYS.signing.public_key())
API_KEY = "sk_test_client_purchase"
MONTHLY, LIFETIME = "price_1Monthly", "price_1Lifetime"
PUBLIC = "http://127.0.0.1:8765"


def app_on(url: str, directory: Path, os_id: str, **options: Any) -> LicenseClient:
    """The app on one computer (`os_id`: its OS machine id), its files in `directory`."""
    return LicenseClient(url, app_id=APP, machine_id=os_id, verifier=LeaseVerifier(PINNED), cache=directory / "lease",
                         min_backoff=0.05, max_backoff=0.5, **options)  # fmt: skip


def buy_settings(pg_url: str, base: str, **changes: Any) -> Settings:
    return keyed_settings(pg_url, stripe_api_key=API_KEY, stripe_api_base=base, stripe_prices=(MONTHLY, LIFETIME),
                          public_url=PUBLIC, **changes)  # fmt: skip


def with_prices(api: FakeStripeApi) -> FakeStripeApi:
    api.add_price(MONTHLY, recurring=True)
    api.add_price(LIFETIME, recurring=False)
    return api


async def pay(webhook_url: str, events: list[dict[str, Any]]) -> None:
    """Stripe's signed webhooks for the payment, posted to the broker's webhook."""
    async with httpx.AsyncClient(timeout=10) as http:
        for event in events:
            response = await post_event(http, webhook_url, event)
            assert response.status_code == 200, response.text


def session_of(api: FakeStripeApi, purchase: Purchase) -> dict[str, Any]:
    (session,) = [s for s in api.sessions if s["url"] == purchase.checkout_url]
    return session


@contextlib.asynccontextmanager
async def iterated(client: LicenseClient) -> AsyncIterator[asyncio.Task[list[dict[str, Any]]]]:
    """The app's own `async for state in client`, in a task (its states are its result)."""

    async def follow() -> list[dict[str, Any]]:
        states = []
        async for state in client:
            states.append(state)
        return states

    task = asyncio.create_task(follow())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


@pytest.mark.slow
async def test_a_buy_from_the_app_unlocks_it_with_a_lease_bound_to_its_machine_across_processes(
    pg_url: str, redis_url: str, fake_api: tuple[FakeStripeApi, str], spawn: Callable[..., Process], tmp_path: Path
) -> None:
    """The app iterates its client ("inactive": no license yet), buys, opens checkout_url; the
    payment's webhooks reach a webhook process, the stream process (another) pushes the state and
    the lease through Redis, and the purchase resolves the moment the lease is held."""
    api, base = with_prices(fake_api[0]), fake_api[1]
    port = free_port()
    env = process_env(pg_url, REDIS_URL=redis_url, STRIPE_API_KEY=API_KEY, STRIPE_API_BASE=base,
                      STRIPE_PRICES=f"{MONTHLY},{LIFETIME}", PUBLIC_URL=f"http://127.0.0.1:{port}",
                      BROKER_POLL_INTERVAL="600",  # what arrives comes through Redis, not the sweep
                      LICENSE_SIGNING_KEY=private_pem(LEASE_KEYS.signing), **keyed_env())  # fmt: skip
    webhook, stream_app = spawn("webhook", env), spawn("stream", env, port=port)
    entitlement: list[bool] = []
    client = app_on(stream_app.url, tmp_path / "app", "os-id-buyer", on_entitlement=entitlement.append)
    async with iterated(client) as following:
        await async_wait_until(lambda: client.status == "inactive", 5, "the app waiting for a license")
        purchase = await client.buy(name="Work laptop")
        session = session_of(api, purchase)
        assert purchase.checkout_url == session["url"] and not purchase.done() and purchase.pending
        assert time.time() < purchase.expires_at <= time.time() + 86400 + 5
        assert (client.activated, client.license_id, client.machine_id) == (True, purchase.license_id,
                                                                             purchase.machine_id)  # fmt: skip
        assert session["_form"]["metadata"] == {"license_id": purchase.license_id}
        assert session["_form"]["line_items"] == [{"price": MONTHLY, "quantity": "1"}]  # the first price
        # The app's own iteration follows the new license at once: its first state, "none".
        await async_wait_until(lambda: client.state is not None, 10, "the license's first state")
        assert client.state is not None and (client.state["status"], client.state["entitled"]) == ("none", False)
        assert not client.is_entitled() and not purchase.done()

        await pay(webhook.url, api.payment_webhooks(session["id"]))
        async with asyncio.timeout(15):
            lease = await purchase
        assert lease is not None and purchase.paid
        assert (lease.license_id, lease.entitled, lease.trial_end) == (purchase.license_id, True, None)
        assert lease.machine_id == purchase.machine_id
        assert lease.fingerprint == machine_fingerprint(APP, machine_id="os-id-buyer")
        assert client.is_entitled() and entitlement == [True] and not following.done()
        assert await purchase.wait() is lease  # resolved once, for good
        await async_wait_until(lambda: bool(client.state and client.state["entitled"]), 5, "the paid state")
        assert client.state is not None and client.state["state"]["kind"] == "subscription"
        # The key for the next computer, and the machine is an active one of the license.
        assert len(await client.license_key()) > 20
        machines = await client.machines()
        assert [(m.id, m.name, m.current) for m in machines] == [(purchase.machine_id, "Work laptop", True)]
        with pytest.raises(AlreadyPaid):
            await client.buy()
    # A restart: the activation and the lease were kept, so the app unlocks offline at once.
    again = app_on("http://127.0.0.1:9", tmp_path / "app", "os-id-buyer")
    assert again.activated and again.license_id == purchase.license_id and again.is_entitled()


async def test_a_trial_starts_once_per_machine_and_buying_from_it_keeps_the_license_and_machine(
    pg_url: str, fake_api: tuple[FakeStripeApi, str], tmp_path: Path
) -> None:
    """start_trial -> entitled on the trial's lease; the same computer again (a reinstall) ->
    TrialUsed; the portal is 409 before a purchase; buy() from the trial (a one-time price): the
    purchase, following the stream itself (nobody iterates the client), waits through the trial's
    own entitlement and resolves on the purchase's lease; then the portal opens."""
    api, base = with_prices(fake_api[0]), fake_api[1]
    async with serving(create_app(buy_settings(pg_url, base, trial_days=14.0))) as url:
        client = app_on(url, tmp_path / "app", "os-id-trial")
        asked = time.time()
        trial = await client.start_trial(name="Laptop")
        assert trial.entitled and client.is_entitled() and client.activated
        assert (trial.license_id, trial.machine_id) == (client.license_id, client.machine_id)
        assert trial.trial_end.tzinfo is not None and abs(trial.trial_end.timestamp() - (asked + 14 * 86400)) < 5
        ends = trial.trial_end.timestamp()
        assert (trial.days_left(), trial.days_left(ends - 86400 + 1), trial.days_left(ends)) == (14, 1, 0)
        lease = client.lease
        assert lease is not None and lease.trial_end == int(ends) and lease.expires_at <= int(ends)
        assert lease.machine_id == trial.machine_id

        reinstalled = app_on(url, tmp_path / "reinstalled", "os-id-trial")  # its files gone, same computer
        with pytest.raises(TrialUsed) as used:
            await reinstalled.start_trial()
        assert used.value.status == 409 and not reinstalled.activated
        with pytest.raises(NoCustomer):
            await client.portal()

        purchase = await client.buy(LIFETIME)
        assert (purchase.license_id, purchase.machine_id) == (trial.license_id, trial.machine_id)
        assert not purchase.pending and session_of(api, purchase)["_form"]["mode"] == "payment"
        waiting = asyncio.create_task(purchase.wait())
        await async_wait_until(lambda: client.status == "live" and client.state is not None, 10, "the stream")
        assert client.state is not None and client.state["status"] == "trialing"
        assert client.is_entitled() and not waiting.done()  # the trial's entitlement is not the purchase
        await pay(url, api.payment_webhooks(session_of(api, purchase)["id"]))
        async with asyncio.timeout(15):
            bought = await waiting
        assert bought is not None and (bought.status, bought.trial_end, bought.machine_id) == (
            "paid",
            None,
            trial.machine_id,
        )
        assert client.is_entitled() and client.license_id == trial.license_id
        await async_wait_until(lambda: client.status == "stopped", 5, "the purchase's own following to stop")

        portal = await client.portal()
        path, form = api.posts[-1]
        assert path == "/v1/billing_portal/sessions" and form["customer"] == session_of(api, purchase)["customer"]
        assert portal.startswith(f"{base}/portal/session/bps_")
    assert await count_rows(pg_url, "licenses") == 1 and await count_rows(pg_url, "machines") == 1


async def test_a_checkout_that_ends_unpaid_fails_the_purchase_and_the_app_is_back_where_it_started(
    pg_url: str, fake_api: tuple[FakeStripeApi, str], tmp_path: Path
) -> None:
    """CHECKOUT_PENDING_TTL 2 s. The broker expires the session at Stripe, Stripe's expired
    webhook comes, the pending license goes: the app's stream is refused (401 machine released),
    the purchase raises CheckoutExpired and the app's own iteration goes back to "inactive"
    (nothing raised there: nobody released a machine of a license the user had), as does the
    iteration of the app restarted meanwhile (no purchase in memory: the state "none" says it).
    From a trial, an unpaid checkout removes nothing: the purchase ends at expires_at, the trial
    stays."""
    api, base = with_prices(fake_api[0]), fake_api[1]
    async with serving(create_app(buy_settings(pg_url, base, checkout_pending_ttl=2.0, trial_days=14.0))) as url:
        client = app_on(url, tmp_path / "app", "os-id-unpaid")
        async with iterated(client) as following:
            purchase = await client.buy()
            await async_wait_until(lambda: client.state is not None, 10, "the pending license's first state")
            restarted = app_on(url, tmp_path / "app", "os-id-unpaid")  # the same files: a restart
            assert restarted.license_id == purchase.license_id
            async with iterated(restarted) as following_restarted:
                await async_wait_until(lambda: restarted.state is not None, 10, "the restarted app's first state")
                session = session_of(api, purchase)
                await async_wait_until(lambda: session["status"] == "expired", 10, "the session expired at Stripe")
                await pay(url, [api.expired_webhook(session["id"])])
                with pytest.raises(CheckoutExpired) as expired:
                    async with asyncio.timeout(10):
                        await purchase
                assert "removed" in str(expired.value) and purchase.done() and not purchase.paid
                await async_wait_until(lambda: client.status == "inactive", 5, "the app back to inactive")
                assert not client.activated and not client.is_entitled() and not following.done()
                assert not (tmp_path / "app" / "lease.machine").exists()
                await async_wait_until(lambda: restarted.status == "inactive", 5, "the restarted app too")
                assert not restarted.activated and not following_restarted.done()

            # The same app, the same iteration: a trial now, then a checkout from it left unpaid.
            trial = await client.start_trial()
            from_trial = await client.buy()
            from_trial.grace = 0.5  # a test's patience: the payment of the last moment is not waited for
            assert not from_trial.pending and from_trial.expires_at <= time.time() + 2.5
            with pytest.raises(CheckoutExpired) as ended:
                async with asyncio.timeout(10):
                    await from_trial
            assert "expires_at" in str(ended.value) and ended.value.expires_at == from_trial.expires_at
            assert client.activated and client.license_id == trial.license_id and client.is_entitled()
            assert not following.done()
    assert await count_rows(pg_url, "licenses") == 1


async def test_without_a_pinned_key_a_purchase_goes_by_the_live_state_and_another_click_makes_its_own(
    pg_url: str, fake_api: tuple[FakeStripeApi, str], tmp_path: Path
) -> None:
    """A client that pins no key trusts the unsigned live state only: its purchase resolves (with
    no lease) on the first state entitled by something other than a trial. Buy clicked twice while
    the first checkout is unpaid: the second has a license of its own (the first ends, replaced),
    since the broker removes an unpaid license with every checkout of it."""
    api, base = with_prices(fake_api[0]), fake_api[1]
    async with serving(create_app(buy_settings(pg_url, base))) as url:
        client = LicenseClient(url, app_id=APP, machine_id="os-id-unpinned", cache=tmp_path / "lease",
                               min_backoff=0.05, max_backoff=0.5)  # fmt: skip
        assert client.trust == "unverified"
        first = await client.buy()
        second = await client.buy(LIFETIME)
        assert second.license_id != first.license_id and second.pending and client.license_id == second.license_id
        with pytest.raises(BrokerError, match="replaced"):
            await first
        async with iterated(client):
            await async_wait_until(lambda: client.state is not None, 10, "the second license's first state")
            assert client.state is not None and client.state["license_id"] == second.license_id
            await pay(url, api.payment_webhooks(session_of(api, second)["id"]))
            async with asyncio.timeout(15):
                assert await second is None
            assert client.is_entitled() and client.state["entitled"] is True
    assert await count_rows(pg_url, "licenses") == 2  # the first stays until its checkout expires


async def test_each_refusal_of_buying_trying_and_managing_is_its_own_error(
    pg_url: str, fake_api: tuple[FakeStripeApi, str], tmp_path: Path
) -> None:
    api, base = with_prices(fake_api[0]), fake_api[1]
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there: Stripe unreachable
    async with serving(create_app(buy_settings(pg_url, down))) as url:
        client = app_on(url, tmp_path / "a", "os-id-a")
        with pytest.raises(BrokerUnavailable) as unreachable:
            await client.buy()
        assert (unreachable.value.status, unreachable.value.retry_after) == (503, 5.0)
        with pytest.raises(NotOffered) as no_trials:
            await client.start_trial()
        assert (no_trials.value.status, no_trials.value.feature) == (404, "trials")
        with pytest.raises(NotActivated):
            await client.portal()
        assert not client.activated
    assert await count_rows(pg_url, "licenses") == 0
    async with serving(create_app(buy_settings(pg_url, base))) as url:
        client = app_on(url, tmp_path / "b", "os-id-b")
        with pytest.raises(UnknownPrice) as unknown:
            await client.buy("price_not_listed")
        assert unknown.value.prices == (MONTHLY, LIFETIME) and not client.activated
        with pytest.raises(TypeError):
            await client.buy(7)  # type: ignore[arg-type]
        api.failing = True
        with pytest.raises(StripeRefused) as refused:
            await client.buy()
        assert refused.value.status == 502 and not client.activated
        api.failing = False
        # One address holds at most MAX_PENDING_PER_ADDRESS unpaid checkouts.
        for n in range(MAX_PENDING_PER_ADDRESS):
            await app_on(url, tmp_path / f"m{n}", f"os-id-{n}").buy()
        with pytest.raises(RateLimited) as limited:
            await client.buy()
        assert limited.value.retry_after == 600 and not client.activated
    # Buying and the portal off (no STRIPE_PRICES, no STRIPE_API_KEY); trials on.
    async with serving(create_app(keyed_settings(pg_url, trial_days=1.0))) as url:
        client = app_on(url, tmp_path / "c", "os-id-c")
        with pytest.raises(NotOffered) as no_buying:
            await client.buy()
        assert no_buying.value.feature == "checkout" and not client.activated
        await client.start_trial()
        with pytest.raises(NotOffered) as no_portal:
            await client.portal()
        assert no_portal.value.feature == "portal"
    # License keys off altogether: nothing of it is offered (still a BrokerError, as 0.3 raised it
    # for activate()).
    async with serving(create_app(buy_settings(pg_url, base, license_keys=None))) as url:
        with pytest.raises(NotOffered) as no_keys:
            await app_on(url, tmp_path / "d", "os-id-d").start_trial()
        assert (no_keys.value.feature, no_keys.value.status) == ("keys", 404)
        assert isinstance(no_keys.value, BrokerError)
        with pytest.raises(NotOffered, match="license keys are off"):
            await app_on(url, tmp_path / "e", "os-id-e").activate(display(generate()))


def readme_app() -> str:
    """The whole app of clients/python/README.md's "Buy, try and manage from the app"."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "clients" / "python" / "README.md").read_text(), re.S)
    (app,) = [b for b in blocks if "await client.buy()" in b and "asyncio.run(" in b]
    return app


async def run_app(app: Path, choice: str, cwd: Path, env: dict[str, str]) -> tuple[int, str]:
    """`python app.py <choice>` in `cwd` (the app's files), awaited: the broker is in this loop."""
    cwd.mkdir(exist_ok=True)  # noqa: ASYNC240 (one mkdir)
    out = asyncio.subprocess.PIPE
    process = await asyncio.create_subprocess_exec(sys.executable, str(app), choice, cwd=cwd, env=env, stdout=out,
                                                   stderr=asyncio.subprocess.STDOUT)  # fmt: skip
    async with asyncio.timeout(60):
        out, _ = await process.communicate()
    return await process.wait(), out.decode()


@pytest.mark.slow
async def test_the_readmes_app_buys_and_tries_against_development_mode(tmp_path: Path) -> None:
    """The README's app, as written, against what `make run` serves (development mode: the broker's
    own checkout page), the browser being a command that presses Pay on the page it is given."""
    try:
        machine_fingerprint(APP)  # the README's app uses this computer's own machine id
    except MachineIdUnavailable as exc:
        pytest.skip(f"no OS machine id here: {exc}")
    settings = Settings.from_env({"BROKER_DEV": "1", "DATABASE_URL": f"sqlite:///{tmp_path / 'dev.db'}"})
    async with serving(create_app(settings)) as url:
        app = tmp_path / "app.py"
        app.write_text(readme_app().replace("http://127.0.0.1:8000", url))
        press = tmp_path / "press_pay.py"
        press.write_text("import sys, httpx\nhttpx.post(sys.argv[1] + '/pay', json={}).raise_for_status()\n")
        env = {**os.environ, "BROWSER": f"{sys.executable} {press} %s &"}
        status, out = await run_app(app, "buy", tmp_path / "computer", env)
        assert status == 0, out
        assert f"pay in the browser: {url}/dev/checkout/cs_test_dev_" in out
        assert "paid: unlocked True" in out and f"manage the subscription: {url}/dev/portal/lic_" in out
        key = re.search(r"your key, for your next computer: (\S+)", out)
        assert key is not None and len(key.group(1)) > 20
        status, out = await run_app(app, "buy", tmp_path / "computer", env)  # the app started again
        assert (status, out.strip()) == (0, "unlocked already")
        status, out = await run_app(app, "trial", tmp_path / "reinstalled", env)  # its files gone
        assert (status, out.strip()) == (0, "trial: unlocked True, 14 days left")
        status, out = await run_app(app, "trial", tmp_path / "again", env)
        assert (status, out.strip()) == (1, "this computer has had its trial: buy")
