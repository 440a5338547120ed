"""Buying from the app: POST /api/checkout makes the Checkout Session (a fake of Stripe's API built
from Stripe's published objects), the app follows its stream with the machine token it got, and
the payment's signed webhooks unlock it there with a lease bound to its machine. Stripe down or
refusing leaves nothing behind; unpaid checkouts are removed after CHECKOUT_PENDING_TTL; one
address's checkouts are bounded. And the portal."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from typing import Any

import httpx
import jwt
import orjson
import pytest

from broker.licensing import pending
from broker.licensing.checkout import MAX_PENDING_PER_ADDRESS
from broker.settings import Settings
from broker.signing.leases import private_pem
from license_broker.embedded import create_app
from tests.support.activations import (
    LEASE_KEYS,
    EventStream,
    activate,
    bearer,
    fingerprint,
    key_of,
    keyed_env,
    keyed_settings,
)
from tests.support.licenses import post_event, token_for
from tests.support.processes import Process, process_env, serving
from tests.support.services import count_rows
from tests.support.stripe_api import FakeStripeApi
from tests.support.waiting import free_port

API_KEY = "sk_test_checkout"
MONTHLY, LIFETIME = "price_1Monthly", "price_1Lifetime"
PUBLIC = "http://127.0.0.1:8765"
ROWS = ("licenses", "machines", "checkouts", "subscription_event_logs", "stripe_bindings")


def claims_of(lease: str) -> dict[str, Any]:
    found: dict[str, Any] = jwt.decode(lease, LEASE_KEYS.signing.public_key(), algorithms=["EdDSA"])
    return found


def buy_settings(pg_url: str, base: str, **changes: Any) -> Settings:
    return keyed_settings(
        pg_url,
        stripe_api_key=API_KEY,
        stripe_api_base=base,
        stripe_prices=(MONTHLY, LIFETIME),
        public_url=PUBLIC,
        **changes,
    )


def with_prices(api: FakeStripeApi) -> FakeStripeApi:
    api.add_price(MONTHLY, recurring=True)
    api.add_price(LIFETIME, recurring=False)
    return api


async def checkout(client: httpx.AsyncClient, url: str, token: str | None = None, **body: Any) -> httpx.Response:
    body.setdefault("fingerprint", fingerprint()) if token is None else None
    return await client.post(f"{url}/api/checkout", json=body, headers=bearer(token) if token else {})


async def rows(url: str) -> dict[str, int]:
    return {table: await count_rows(url, table) for table in ROWS}


async def pay(client: httpx.AsyncClient, webhook_url: str, events: list[dict[str, Any]]) -> None:
    for event in events:
        response = await post_event(client, webhook_url, event)
        assert response.status_code == 200, response.text


async def test_a_buy_from_the_app_unlocks_its_stream_across_processes_with_a_lease_bound_to_its_machine(
    pg_url: str, redis_url: str, fake_api: tuple[FakeStripeApi, str], spawn: Callable[..., Process]
) -> None:
    """The app is an HTTP client: it asks for a checkout, follows its stream with the token it got,
    and the payment's webhooks (the fake's, signed) reach a webhook process; the stream process,
    another one, pushes entitled: true and a lease bound to the app's machine."""
    api, base = fake_api
    with_prices(api)
    port = free_port()
    env = process_env(
        pg_url,
        REDIS_URL=redis_url,
        STRIPE_API_KEY=API_KEY,
        STRIPE_API_BASE=base,
        STRIPE_PRICES=f"{MONTHLY},{LIFETIME}",
        PUBLIC_URL=f"http://127.0.0.1:{port}",
        LICENSE_SIGNING_KEY=private_pem(LEASE_KEYS.signing),
        **keyed_env(),
    )
    webhook, stream_app = spawn("webhook", env), spawn("stream", env, port=port)
    fp = fingerprint()
    async with httpx.AsyncClient(timeout=15) as client:
        answer = await checkout(client, stream_app.url, fingerprint=fp, name="Work laptop", platform="darwin")
        assert answer.status_code == 201, answer.text
        started = answer.json()
        assert set(started) == {"license_id", "machine_id", "token", "checkout_url", "expires_at"}
        license_id, machine_id, token = started["license_id"], started["machine_id"], started["token"]
        (session,) = api.sessions
        assert started["checkout_url"] == session["url"]
        form = session["_form"]
        assert (form["mode"], form["line_items"], form["client_reference_id"]) == (
            "subscription",
            [{"price": MONTHLY, "quantity": "1"}],
            license_id,
        )
        assert form["metadata"] == form["subscription_data"]["metadata"] == {"license_id": license_id}
        assert "payment_intent_data" not in form
        assert form["success_url"] == f"http://127.0.0.1:{port}/activate?session_id={{CHECKOUT_SESSION_ID}}"
        claims = jwt.decode(token, options={"verify_signature": False})
        assert (claims["sub"], claims["typ"], claims["machine"], claims["fingerprint"]) == (
            license_id,
            "machine",
            machine_id,
            fp,
        )
        events_url = f"{stream_app.url}/api/licenses/{license_id}/events"
        async with EventStream(client, events_url, bearer(token)) as stream:
            waiting = orjson.loads(await stream.until("message"))
            assert (waiting["status"], waiting["entitled"]) == ("none", False)
            await pay(client, webhook.url, api.payment_webhooks(session["id"]))
            while not (state := orjson.loads(await stream.until("message")))["entitled"]:
                pass
            assert (state["status"], state["state"]["kind"]) == ("active", "subscription")
            lease = claims_of(orjson.loads(await stream.until("lease"))["lease"])
            assert (lease["sub"], lease["entitled"], lease["machine"], lease["fingerprint"]) == (
                license_id,
                True,
                machine_id,
                fp,
            )
        # The buyer's browser lands on the success page, which shows the key for the next computer.
        key = await key_of(client, stream_app.url, session["id"])
        listed = (await client.get(f"{stream_app.url}/api/machines", headers=bearer(token))).json()
        assert [(m["id"], m["name"], m["current"]) for m in listed["machines"]] == [(machine_id, "Work laptop", True)]
        assert (await activate(client, stream_app.url, key)).json()["machines"] == {"used": 2, "max": 3}
        # A second checkout reads no price again (cached per process).
        assert (await checkout(client, stream_app.url, price=MONTHLY)).status_code == 201
    assert api.requests.count(f"/v1/prices/{MONTHLY}") == 1


async def test_a_one_time_price_is_bought_in_payment_mode_as_its_own_customer(
    pg_url: str, fake_api: tuple[FakeStripeApi, str]
) -> None:
    api, base = fake_api
    with_prices(api)
    async with serving(create_app(buy_settings(pg_url, base))) as url, httpx.AsyncClient(timeout=10) as client:
        started = (await checkout(client, url, price=LIFETIME)).json()
        (session,) = api.sessions
        form = session["_form"]
        assert (form["mode"], form["customer_creation"]) == ("payment", "always")
        assert form["metadata"] == form["payment_intent_data"]["metadata"] == {"license_id": started["license_id"]}
        assert "subscription_data" not in form
        await pay(client, url, api.payment_webhooks(session["id"]))
        state = await client.get(f"{url}/api/licenses/{started['license_id']}", headers=bearer(started["token"]))
        assert (state.json()["status"], state.json()["state"]["kind"], state.json()["entitled"]) == (
            "paid",
            "perpetual",
            True,
        )


async def test_buying_from_a_trial_keeps_the_license_and_its_machine(
    pg_url: str, fake_api: tuple[FakeStripeApi, str]
) -> None:
    api, base = fake_api
    with_prices(api)
    settings = buy_settings(pg_url, base, trial_days=14.0)
    async with serving(create_app(settings)) as url, httpx.AsyncClient(timeout=10) as client:
        fp = fingerprint()
        trial = (await client.post(f"{url}/api/trials", json={"fingerprint": fp})).json()
        started = await checkout(client, url, trial["token"], fingerprint=fp)
        assert started.status_code == 201, started.text
        body = started.json()
        assert (body["license_id"], body["machine_id"]) == (trial["license_id"], trial["machine_id"])
        (session,) = api.sessions
        assert session["_form"]["metadata"] == {"license_id": trial["license_id"]}
        other = await checkout(client, url, trial["token"], fingerprint=fingerprint())
        assert (other.status_code, other.json()) == (400, {"error": "fingerprint: not the machine of this token"})
        await pay(client, url, api.payment_webhooks(session["id"]))
        state = (await client.get(f"{url}/api/licenses/{trial['license_id']}", headers=bearer(body["token"]))).json()
        assert (state["status"], state["state"]["kind"], state["entitled"]) == ("active", "subscription", True)
        assert "trial_end" not in claims_of(state["lease"])  # the lease is the subscription's now
        again = await checkout(client, url, body["token"])
        assert (again.status_code, again.json()["error"]) == (
            409,
            "this license is paid for already: manage it with POST /api/portal",
        )
        listed = (await client.get(f"{url}/api/machines", headers=bearer(body["token"]))).json()
        assert [m["id"] for m in listed["machines"]] == [trial["machine_id"]]
    assert await count_rows(pg_url, "licenses") == 1


async def test_stripe_unreachable_is_503_and_refusing_is_502_with_nothing_left_behind(
    pg_url: str, fake_api: tuple[FakeStripeApi, str]
) -> None:
    api, base = fake_api
    with_prices(api)
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    async with serving(create_app(buy_settings(pg_url, down))) as url, httpx.AsyncClient(timeout=30) as client:
        response = await checkout(client, url)
        assert response.status_code == 503 and response.headers["retry-after"]
        assert response.json() == {"error": "Stripe is not reachable, try again later"}
    async with serving(create_app(buy_settings(pg_url, base))) as url, httpx.AsyncClient(timeout=30) as client:
        api.failing = True
        refused = await checkout(client, url)
        assert refused.status_code == 502 and refused.json()["error"].startswith("Stripe refused: ")
        api.failing = False
        del api.objects[f"/v1/prices/{LIFETIME}"]  # a price the account does not have
        unknown = await checkout(client, url, price=LIFETIME)
        assert unknown.status_code == 502 and "No such object" in unknown.json()["error"]
        bad = await checkout(client, url, price="price_not_listed")
        assert (bad.status_code, bad.json()) == (400, {"error": f"price: one of {MONTHLY}, {LIFETIME}"})
    assert await rows(pg_url) == dict.fromkeys(ROWS, 0)
    assert api.sessions == []


async def test_checkout_refuses_bad_input_and_is_off_without_stripe_prices(
    pg_url: str, fake_api: tuple[FakeStripeApi, str]
) -> None:
    api, base = fake_api
    with_prices(api)
    settings = buy_settings(pg_url, base, trial_days=14.0)
    async with serving(create_app(settings)) as url, httpx.AsyncClient(timeout=10) as client:
        for body, message in [
            ({"fingerprint": "x"}, "fingerprint: 64 hex characters"),
            ({"fingerprint": fingerprint(), "name": "\x00"}, "name: at most 200 printable characters"),
            ({"fingerprint": fingerprint(), "price": 7}, "price: one of"),
        ]:
            answer = await client.post(f"{url}/api/checkout", json=body)
            assert answer.status_code == 400 and answer.json()["error"].startswith(message), answer.text
        for path in ("/api/checkout", "/api/trials"):
            huge = await client.post(f"{url}{path}", json={"fingerprint": fingerprint(), "name": "n" * 5000})
            assert huge.status_code == 413, path
            plain = await client.post(f"{url}{path}", content=b"{}", headers={"content-type": "text/plain"})
            assert plain.status_code == 415, path
        # A subscriber token (the seller's web app) names no machine to buy for.
        assert (await checkout(client, url, token_for("lic_x"))).status_code == 403
        assert (await checkout(client, url, "not a token")).status_code == 401
    settings = dataclasses.replace(buy_settings(pg_url, base), stripe_prices=())
    async with serving(create_app(settings)) as url, httpx.AsyncClient(timeout=10) as client:
        off = await checkout(client, url)
    assert (off.status_code, off.json()) == (
        404,
        {"error": "buying from the app is off on this server (STRIPE_PRICES is not set)"},
    )
    assert await rows(pg_url) == dict.fromkeys(ROWS, 0) and api.sessions == []


async def test_a_thousand_checkouts_from_one_address_make_ten_and_nothing_grows(
    pg_url: str, fake_api: tuple[FakeStripeApi, str]
) -> None:
    api, base = fake_api
    with_prices(api)
    async with serving(create_app(buy_settings(pg_url, base))) as url, httpx.AsyncClient(timeout=30) as client:
        codes: list[int] = []
        for _ in range(10):
            codes += [r.status_code for r in await asyncio.gather(*(checkout(client, url) for _ in range(100)))]
    assert codes.count(201) == MAX_PENDING_PER_ADDRESS and codes.count(429) == 1000 - MAX_PENDING_PER_ADDRESS
    # Made at Stripe: one per checkout (another process's burst could make a few more, which are
    # expired at once: never more than the address's attempts, CHECKOUTS.attempts).
    assert len(api.sessions) == MAX_PENDING_PER_ADDRESS
    counted = await rows(pg_url)
    assert counted["licenses"] == counted["machines"] == counted["checkouts"] == MAX_PENDING_PER_ADDRESS


async def wait_for(predicate: Callable[[], Any], within: float, what: str) -> None:
    """Poll with a deadline (the cleanup runs in the server's own task; nothing to wait on here)."""
    async with asyncio.timeout(within):
        while not await predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.1)


async def test_an_unpaid_checkout_is_removed_after_the_ttl_its_stream_ends_and_its_token_is_refused(
    pg_url: str, fake_api: tuple[FakeStripeApi, str]
) -> None:
    """CHECKOUT_PENDING_TTL 2 s: the session is expired at Stripe, its expired webhook arrives, and
    the pending license goes with its machine (the app's stream ends; its token is refused). A paid
    checkout of the same age keeps its license; an unpaid one of a trial keeps the trial."""
    api, base = fake_api
    with_prices(api)
    settings = buy_settings(pg_url, base, checkout_pending_ttl=2.0, trial_days=14.0)
    async with serving(create_app(settings)) as url, httpx.AsyncClient(timeout=10) as client:
        unpaid = (await checkout(client, url)).json()
        paid = (await checkout(client, url)).json()
        trial = (await client.post(f"{url}/api/trials", json={"fingerprint": fingerprint()})).json()
        from_trial = (await checkout(client, url, trial["token"])).json()
        sessions = {s["_form"]["client_reference_id"]: s["id"] for s in api.sessions}
        await pay(client, url, api.payment_webhooks(sessions[paid["license_id"]]))
        events_url = f"{url}/api/licenses/{unpaid['license_id']}/events"
        async with EventStream(client, events_url, bearer(unpaid["token"])) as stream:
            await stream.until("message")

            async def expired_at_stripe() -> bool:
                return all(
                    api.session(sessions[lid])["status"] == "expired"
                    for lid in (unpaid["license_id"], from_trial["license_id"])
                )

            await wait_for(expired_at_stripe, 10, "the sessions expired at Stripe")
            for lid in (unpaid["license_id"], from_trial["license_id"]):
                await pay(client, url, [api.expired_webhook(sessions[lid])])
            await stream.end(within=5)
        refused = await client.get(f"{url}/api/licenses/{unpaid['license_id']}", headers=bearer(unpaid["token"]))
        assert (refused.status_code, refused.json()) == (401, {"error": "machine released"})
        kept = await client.get(f"{url}/api/licenses/{paid['license_id']}", headers=bearer(paid["token"]))
        assert kept.status_code == 200 and kept.json()["entitled"] is True
        still = await client.get(f"{url}/api/licenses/{trial['license_id']}", headers=bearer(trial["token"]))
        assert still.status_code == 200 and still.json()["status"] == "trialing"
    counted = await rows(pg_url)
    assert (counted["licenses"], counted["machines"], counted["checkouts"]) == (2, 2, 0)


async def test_a_session_stripe_expires_on_its_own_ends_the_waiting_app_within_seconds(
    pg_url: str, fake_api: tuple[FakeStripeApi, str]
) -> None:
    """The default CHECKOUT_PENDING_TTL (24 h): the buyer closed the tab and Stripe expired the
    session itself. Its webhook reaches a webhook process, which cannot wake the stream's sweep:
    the next pass (every 5 s at most) removes the pending license, and the app's stream ends."""
    api, base = fake_api
    with_prices(api)
    settings = buy_settings(pg_url, base)
    assert pending.sweep_interval(settings.checkout_pending_ttl) <= 5.0
    async with serving(create_app(settings)) as url, httpx.AsyncClient(timeout=10) as client:
        started = (await checkout(client, url)).json()
        events_url = f"{url}/api/licenses/{started['license_id']}/events"
        async with EventStream(client, events_url, bearer(started["token"])) as stream:
            await stream.until("message")
            await pay(client, url, [api.expired_webhook(api.sessions[0]["id"])])
            await stream.end(within=15)
        refused = await client.get(f"{url}/api/machines", headers=bearer(started["token"]))
        assert (refused.status_code, refused.json()) == (401, {"error": "machine released"})
    assert await rows(pg_url) == dict.fromkeys(ROWS, 0)


async def test_buy_pressed_again_keeps_the_pending_license_until_its_last_checkout_is_over(
    pg_url: str, fake_api: tuple[FakeStripeApi, str]
) -> None:
    """A second checkout asked for with the token of the first (still unpaid): the first one's
    expiry leaves the license, its machine and the second checkout; paying the second unlocks that
    machine. Had the first expiry taken the license, the payment would find no machine."""
    api, base = fake_api
    with_prices(api)
    settings = buy_settings(pg_url, base)
    async with serving(create_app(settings)) as url, httpx.AsyncClient(timeout=10) as client:
        first = (await checkout(client, url)).json()
        second = (await checkout(client, url, first["token"])).json()
        assert (second["license_id"], second["machine_id"]) == (first["license_id"], first["machine_id"])
        sessions = [s["id"] for s in api.sessions]
        await pay(client, url, [api.expired_webhook(sessions[0])])

        async def first_closed() -> bool:
            return await count_rows(pg_url, "checkouts") == 1

        await wait_for(first_closed, 15, "the first checkout closed")
        assert (await count_rows(pg_url, "licenses"), await count_rows(pg_url, "machines")) == (1, 1)
        await pay(client, url, api.payment_webhooks(sessions[1]))
        state = await client.get(f"{url}/api/licenses/{first['license_id']}", headers=bearer(second["token"]))
        assert state.status_code == 200 and state.json()["entitled"] is True, state.text
        machines = await client.get(f"{url}/api/machines", headers=bearer(second["token"]))
        assert [m["id"] for m in machines.json()["machines"]] == [first["machine_id"]]


async def test_a_checkout_whose_expired_webhook_never_comes_is_removed_after_the_grace(
    pg_url: str, fake_api: tuple[FakeStripeApi, str]
) -> None:
    api, base = fake_api
    with_prices(api)
    settings = buy_settings(pg_url, base, checkout_pending_ttl=1.0)
    async with serving(create_app(settings)) as url, httpx.AsyncClient(timeout=10) as client:
        started = (await checkout(client, url)).json()

        async def gone() -> bool:
            return await count_rows(pg_url, "licenses") == 0

        await wait_for(gone, 15, "the pending license removed")
        assert api.sessions[0]["status"] == "expired"
        refused = await client.get(f"{url}/api/machines", headers=bearer(started["token"]))
        assert refused.status_code == 401
    assert await rows(pg_url) == dict.fromkeys(ROWS, 0)


async def test_the_portal_opens_for_the_license_customer_and_is_409_before_a_purchase(
    pg_url: str, fake_api: tuple[FakeStripeApi, str]
) -> None:
    api, base = fake_api
    with_prices(api)
    settings = buy_settings(pg_url, base, trial_days=14.0)
    async with serving(create_app(settings)) as url, httpx.AsyncClient(timeout=10) as client:
        trial = (await client.post(f"{url}/api/trials", json={"fingerprint": fingerprint()})).json()
        before = await client.post(f"{url}/api/portal", headers=bearer(trial["token"]))
        assert before.status_code == 409 and before.json()["error"].startswith("this license has no Stripe customer")
        assert (await client.post(f"{url}/api/portal")).status_code == 401
        body = (await checkout(client, url, trial["token"])).json()
        await pay(client, url, api.payment_webhooks(api.sessions[0]["id"]))
        opened = await client.post(f"{url}/api/portal", headers=bearer(body["token"]))
        assert opened.status_code == 200, opened.text
        (path, form) = api.posts[-1]
        assert path == "/v1/billing_portal/sessions"
        assert form == {"customer": api.sessions[0]["customer"], "return_url": f"{PUBLIC}/activate"}
        assert opened.json() == {
            "url": api.objects[f"/v1/billing_portal/sessions/{opened.json()['url'].split('/')[-1]}"]["url"]
        }
    returning = dataclasses.replace(settings, portal_return_url="https://acme.example/account")
    async with serving(create_app(returning)) as url, httpx.AsyncClient(timeout=10) as client:
        assert (await client.post(f"{url}/api/portal", headers=bearer(body["token"]))).status_code == 200
        assert api.posts[-1][1]["return_url"] == "https://acme.example/account"
        api.failing = True
        assert (await client.post(f"{url}/api/portal", headers=bearer(body["token"]))).status_code == 502


@pytest.mark.parametrize("missing", ["STRIPE_API_KEY", "PUBLIC_URL", "LICENSE_KEY_SECRET"])
def test_stripe_prices_needs_a_key_a_public_url_and_license_keys(missing: str) -> None:
    from broker.settings import SettingsError

    env = {"STRIPE_PRICES": MONTHLY, "STRIPE_API_KEY": API_KEY, "PUBLIC_URL": PUBLIC, **keyed_env()}
    assert Settings.from_env(env).stripe_prices == (MONTHLY,)
    with pytest.raises(SettingsError) as error:
        Settings.from_env({k: v for k, v in env.items() if k != missing})
    assert str(error.value).startswith(f"STRIPE_PRICES: needs {missing}")
    for bad in ("prod_1", "price_a,price_a", "price_ä"):
        with pytest.raises(SettingsError, match=r"^STRIPE_PRICES: "):
            Settings.from_env({**env, "STRIPE_PRICES": bad})
