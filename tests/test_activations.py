"""Activation with a license key: the purchase shows the key, the key binds machines up to the
license's limit, each gets a machine token and a lease bound to it; bad keys get nothing, and
guessing is cut short (429)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import jwt
import pytest
from sqlalchemy.engine import make_url

from broker.licensing import keys
from broker.licensing.keys import KeyVault
from broker.licensing.machines import machine_limit
from broker.licensing.store import KeyStore
from broker.storage.db import create_engine
from broker.stripe_ledger.ledger import StripeObject
from license_broker.embedded import create_app
from tests.support.activations import (
    KEY_SECRET,
    LEASE_KEYS,
    activate,
    bearer,
    buy,
    fingerprint,
    key_of,
    keyed_settings,
    session_of,
)
from tests.support.faults import TcpProxy
from tests.support.licenses import make_settings, new_license, post_event
from tests.support.processes import serving
from webhook.samples import SampleEvents


def lease_claims(lease: str) -> dict[str, Any]:
    public = LEASE_KEYS.signing.public_key()
    claims: dict[str, Any] = jwt.decode(lease, public, algorithms=["EdDSA"])
    return claims


@pytest.fixture
async def broker(pg_url: str) -> AsyncIterator[str]:
    async with serving(create_app(keyed_settings(pg_url))) as url:
        yield url


async def test_a_purchase_shows_the_key_and_the_key_activates_a_machine_with_a_bound_lease(broker: str) -> None:
    license_id = new_license()
    async with httpx.AsyncClient() as client:
        session_id = await buy(client, broker, license_id)
        shown = (await client.get(f"{broker}/api/checkout-sessions/{session_id}/license")).json()
        assert shown["license_id"] == license_id and (shown["status"], shown["entitled"]) == ("active", True)
        assert keys.normalize(shown["key"]) and shown["key"].count("-") == 4 and shown["open_url"] is None
        fp = fingerprint()
        response = await activate(client, broker, shown["key"].lower().replace("-", " "), fp, name="Work laptop",
                                  platform="linux")  # fmt: skip
        assert response.status_code == 201, response.text
        body = response.json()
        assert set(body) == {"license_id", "machine", "token", "lease", "machines"}
        machine = body["machine"]
        assert body["license_id"] == license_id and machine["id"].startswith("mch_")
        assert (machine["name"], machine["platform"]) == ("Work laptop", "linux")
        assert body["machines"] == {"used": 1, "max": 3}
        claims = lease_claims(body["lease"])
        assert (claims["sub"], claims["entitled"], claims["machine"], claims["fingerprint"]) == (
            license_id,
            True,
            machine["id"],
            fp,
        )
        token = jwt.decode(body["token"], options={"verify_signature": False})
        assert (token["sub"], token["typ"], token["machine"]) == (license_id, "machine", machine["id"])
        assert 29 * 86400 < token["exp"] - token["iat"] <= 30 * 86400
        # The machine token reads the license and is the license's rightful party for its key.
        state = await client.get(f"{broker}/api/licenses/{license_id}", headers=bearer(body["token"]))
        assert state.status_code == 200 and state.json()["entitled"] is True
        again = await client.get(f"{broker}/api/licenses/{license_id}/key", headers=bearer(body["token"]))
        assert again.json()["key"] == shown["key"]


async def test_the_same_fingerprint_again_is_the_same_machine(broker: str) -> None:
    license_id = new_license()
    async with httpx.AsyncClient() as client:
        key = await key_of(client, broker, await buy(client, broker, license_id))
        fp = fingerprint()
        first = (await activate(client, broker, key, fp, name="old name")).json()
        again = await activate(client, broker, key, fp.upper(), name="new name")
        assert again.status_code == 200
        assert again.json()["machine"] == {"id": first["machine"]["id"], "name": "new name", "platform": None}
        assert again.json()["machines"] == {"used": 1, "max": 3}


async def test_a_typo_is_malformed_and_an_unknown_or_rotated_key_is_invalid_alike(broker: str, pg_url: str) -> None:
    license_id = new_license()
    async with httpx.AsyncClient() as client:
        key = await key_of(client, broker, await buy(client, broker, license_id))
        plain = keys.normalize(key)
        typo = plain[:3] + ("X" if plain[3] != "X" else "Y") + plain[4:]
        response = await activate(client, broker, typo)
        assert (response.status_code, response.json()) == (400, {"error": "malformed key"})
        unknown = await activate(client, broker, keys.display(keys.generate()))
        assert (unknown.status_code, unknown.json()) == (403, {"error": "invalid key"})
        engine = create_engine(make_settings(pg_url))
        try:
            fresh = await KeyStore(engine, KeyVault((KEY_SECRET,))).rotate(license_id)
        finally:
            await engine.dispose()
        assert fresh is not None
        rotated = await activate(client, broker, key)
        assert (rotated.status_code, rotated.json()) == (403, {"error": "invalid key"})
        assert (await activate(client, broker, fresh)).status_code == 201
        shown = await client.get(f"{broker}/api/checkout-sessions/{session_of(license_id)}/license")
        assert keys.normalize(shown.json()["key"]) == fresh


async def test_the_limit_answers_409_with_the_machines_to_release_from(broker: str) -> None:
    license_id = new_license()
    async with httpx.AsyncClient() as client:
        key = await key_of(client, broker, await buy(client, broker, license_id))
        fps = [fingerprint() for _ in range(4)]
        made = [(await activate(client, broker, key, fp, name=f"m{i}", platform="mac")).json() for i, fp in
                enumerate(fps[:3])]  # fmt: skip
        assert [m["machines"]["used"] for m in made] == [1, 2, 3]
        full = await activate(client, broker, key, fps[3])
        assert full.status_code == 409
        body = full.json()
        assert body["error"] == "machine limit reached" and body["max"] == 3
        assert [m["id"] for m in body["machines"]] == [m["machine"]["id"] for m in made]
        assert set(body["machines"][0]) >= {"id", "name", "platform", "last_seen_at"}
        # A machine already in is not a new one, even at the limit.
        assert (await activate(client, broker, key, fps[0])).status_code == 200
        release = await client.delete(
            f"{broker}/api/machines/{made[0]['machine']['id']}", headers=bearer(made[1]["token"])
        )
        assert release.status_code == 200
        assert (await activate(client, broker, key, fps[3])).status_code == 201


async def test_concurrent_activations_never_pass_the_limit(broker: str) -> None:
    license_id = new_license()
    async with httpx.AsyncClient(timeout=30) as client:
        key = await key_of(client, broker, await buy(client, broker, license_id))
        answers = await asyncio.gather(*(activate(client, broker, key) for _ in range(8)))
        assert sorted(r.status_code for r in answers) == [201] * 3 + [409] * 5
        listed = await client.get(f"{broker}/api/machines", headers={"authorization": f"License {key}"})
        assert listed.json()["used"] == 3


def test_the_limit_comes_from_the_session_or_subscription_then_the_price_then_the_setting() -> None:
    def obj(kind: str, **state: Any) -> StripeObject:
        return StripeObject(f"{kind}_1", kind, 1, 0, state)

    assert machine_limit([], 3) == 3
    assert machine_limit([], 0) is None
    assert machine_limit([obj("subscription", price_max_machines=5)], 3) == 5
    assert machine_limit([obj("subscription", price_max_machines=5), obj("checkout", max_machines=2)], 3) == 2
    assert machine_limit([obj("checkout", max_machines=0)], 3) is None
    assert machine_limit([obj("invoice", max_machines=9)], 3) == 3
    assert machine_limit([obj("subscription", max_machines=10**9)], 3) == 1000


async def test_metadata_max_machines_of_the_subscription_and_its_price_set_the_limit(pg_url: str) -> None:
    license_id = new_license()
    sample = SampleEvents(license_id)
    async with serving(create_app(keyed_settings(pg_url, max_machines=1))) as url, httpx.AsyncClient() as client:
        key = await key_of(client, url, await buy(client, url, license_id))
        assert (await activate(client, url, key)).json()["machines"] == {"used": 1, "max": 1}
        assert (await activate(client, url, key)).status_code == 409
        event = sample.subscription_event("customer.subscription.updated", "active", sample.tick())
        event["data"]["object"]["items"]["data"][0]["price"]["metadata"] = {"max_machines": "2"}
        assert (await post_event(client, url, event)).status_code == 200
        assert (await activate(client, url, key)).json()["machines"] == {"used": 2, "max": 2}
        event = sample.subscription_event("customer.subscription.updated", "active", sample.tick())
        event["data"]["object"]["metadata"]["max_machines"] = "1"  # lowered below the machines in use
        assert (await post_event(client, url, event)).status_code == 200
        full = await activate(client, url, key)
        assert (full.status_code, len(full.json()["machines"]), full.json()["max"]) == (409, 2, 1)


async def test_malformed_requests_are_refused_and_change_nothing(broker: str) -> None:
    license_id = new_license()
    async with httpx.AsyncClient() as client:
        key = await key_of(client, broker, await buy(client, broker, license_id))
        url = f"{broker}/api/activations"
        cases = [
            ({"key": key, "fingerprint": "raw-machine-id"}, 400, "fingerprint"),
            ({"key": key, "fingerprint": fingerprint(), "name": "x" * 201}, 400, "name"),
            ({"key": key, "fingerprint": fingerprint(), "platform": 7}, 400, "platform"),
            ({"key": 12345, "fingerprint": fingerprint()}, 400, "malformed key"),
            ([key], 400, "JSON object"),
        ]
        for body, status, why in cases:
            response = await client.post(url, json=body)
            assert response.status_code == status and why in response.json()["error"], (body, response.text)
        assert (await client.post(url, content=b'{"key":1}', headers={"content-type": "text/plain"})).status_code == 415
        huge = {"key": key, "fingerprint": fingerprint(), "name": "x" * 10_000}
        assert (await client.post(url, json=huge)).status_code == 413
        assert (await client.get(f"{broker}/api/machines", headers={"authorization": f"License {key}"})).json()[
            "used"
        ] == 0


async def test_keys_are_off_without_license_key_secret(pg_url: str) -> None:
    async with serving(create_app(make_settings(pg_url))) as url, httpx.AsyncClient() as client:
        assert (await activate(client, url, keys.display(keys.generate()))).status_code == 404
        assert (await client.get(f"{url}/api/machines")).status_code == 404
        assert (await client.get(f"{url}/api/checkout-sessions/cs_test_1/license")).status_code == 404


async def test_every_key_route_answers_503_with_retry_after_while_postgres_is_unreachable(pg_url: str) -> None:
    """Postgres away (a relay that cuts every connection and refuses new ones): each route of keys,
    machines, trials and the activation page answers `503 database unavailable` with Retry-After,
    which the clients retry, never a 500; once it is back, the same calls succeed."""
    real = make_url(pg_url)
    proxy = TcpProxy(real.port or 5432, real.host or "127.0.0.1")
    via_proxy = real.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    license_id = new_license()
    try:
        app = create_app(keyed_settings(via_proxy, trial_days=1.0))
        async with serving(app) as url, httpx.AsyncClient(timeout=30) as client:
            session_id = await buy(client, url, license_id)
            key = await key_of(client, url, session_id)
            activated = (await activate(client, url, key)).json()
            machine, token = activated["machine"]["id"], activated["token"]
            calls: list[tuple[str, str, dict[str, str] | None, dict[str, str]]] = [
                ("POST", "/api/activations", {"key": key, "fingerprint": fingerprint()}, {}),
                ("GET", "/api/machines", None, bearer(token)),
                ("GET", "/api/machines", None, {"authorization": f"License {key}"}),
                ("POST", f"/api/machines/{machine}/token", None, bearer(token)),
                ("GET", f"/api/licenses/{license_id}/key", None, bearer(token)),
                ("POST", "/api/trials", {"fingerprint": fingerprint()}, {}),
                ("GET", f"/api/checkout-sessions/{session_id}/license", None, {}),
                ("DELETE", f"/api/machines/{machine}", None, bearer(token)),
            ]

            async def answers() -> list[tuple[int, Any, str | None]]:
                out = []
                for method, path, body, headers in calls:
                    r = await client.request(method, f"{url}{path}", json=body, headers=headers)
                    out.append((r.status_code, r.json(), r.headers.get("retry-after")))
                return out

            proxy.cut()
            down = await answers()
            assert down == [(503, {"error": "database unavailable"}, "2")] * len(calls), down
            proxy.restore()
            up = await answers()
            assert [status for status, _, _ in up] == [201, 200, 200, 200, 200, 201, 200, 200], up
    finally:
        proxy.close()


def behind_proxy(app: Any) -> Any:
    """The broker behind a proxy it trusts (FORWARDED_ALLOW_IPS): X-Forwarded-For is the client."""
    return serving(app, proxy_headers=True, forwarded_allow_ips="*")


def from_address(address: str) -> dict[str, str]:
    return {"x-forwarded-for": address}


async def test_guessing_keys_gets_429_per_address_and_a_right_key_from_elsewhere_still_works(pg_url: str) -> None:
    license_id = new_license()
    async with behind_proxy(create_app(keyed_settings(pg_url))) as url, httpx.AsyncClient() as client:
        key = await key_of(client, url, await buy(client, url, license_id))
        guesser, buyer = from_address("203.0.113.9"), from_address("198.51.100.7")
        answers = []
        for _ in range(12):
            body = {"key": keys.display(keys.generate()), "fingerprint": fingerprint()}
            answers.append(await client.post(f"{url}/api/activations", json=body, headers=guesser))
        assert [r.status_code for r in answers] == [403] * 10 + [429] * 2
        assert 1 <= int(answers[-1].headers["retry-after"]) <= 60
        # Blocked whatever it sends now, even a malformed or the right key: the address is spent.
        right = {"key": key, "fingerprint": fingerprint()}
        assert (await client.post(f"{url}/api/activations", json=right, headers=guesser)).status_code == 429
        # Another address is not.
        assert (await client.post(f"{url}/api/activations", json=right, headers=buyer)).status_code == 201
        # The same /64 of IPv6 is one address.
        v6 = [from_address(f"2001:db8:1:2::{i}") for i in range(11)]
        codes = [(await client.post(f"{url}/api/activations", json={"key": "AAAA", "fingerprint": fingerprint()},
                                    headers=h)).status_code for h in v6]  # fmt: skip
        assert codes == [400] * 10 + [429]


async def test_successes_never_count_and_failures_of_one_key_are_limited_from_any_address(pg_url: str) -> None:
    license_id = new_license()
    async with behind_proxy(create_app(keyed_settings(pg_url, max_machines=1))) as url, httpx.AsyncClient() as client:
        key = await key_of(client, url, await buy(client, url, license_id))
        fp = fingerprint()
        for _ in range(25):  # a reinstall loop: each one a success
            response = await client.post(f"{url}/api/activations", json={"key": key, "fingerprint": fp},
                                         headers=from_address("192.0.2.1"))  # fmt: skip
            assert response.status_code in (200, 201)
        # The key shared too widely: its failures (limit reached) count wherever they come from.
        codes = []
        for i in range(12):
            response = await client.post(f"{url}/api/activations", json={"key": key, "fingerprint": fingerprint()},
                                         headers=from_address(f"192.0.2.{10 + i}"))  # fmt: skip
            codes.append(response.status_code)
        assert codes == [409] * 10 + [429] * 2
        # Other keys are not affected.
        other = await key_of(client, url, await buy(client, url, new_license()))
        response = await client.post(f"{url}/api/activations", json={"key": other, "fingerprint": fingerprint()},
                                     headers=from_address("192.0.2.99"))  # fmt: skip
        assert response.status_code == 201


async def test_checkout_session_lookups_are_404_until_recorded_and_limited_per_address(pg_url: str) -> None:
    license_id = new_license()
    session_id = session_of(license_id)
    async with behind_proxy(create_app(keyed_settings(pg_url))) as url, httpx.AsyncClient() as client:
        path = f"{url}/api/checkout-sessions/{session_id}/license"
        buyer = from_address("198.51.100.20")
        early = await client.get(path, headers=buyer)
        assert (early.status_code, early.json()) == (404, {"error": "checkout session not recorded yet"})
        assert (
            await client.get(f"{url}/api/checkout-sessions/not-a-session/license", headers=buyer)
        ).status_code == 400
        await buy(client, url, license_id)
        shown = await client.get(path, headers=buyer)
        assert shown.status_code == 200 and shown.json()["license_id"] == license_id
        guesser = from_address("203.0.113.50")
        guesses = [f"{url}/api/checkout-sessions/cs_test_guess{i}/license" for i in range(22)]
        codes = [(await client.get(guess, headers=guesser)).status_code for guess in guesses]
        assert codes == [404] * 20 + [429] * 2
        # The right id from the guessing address is refused too; from the buyer's it is not.
        assert (await client.get(path, headers=guesser)).status_code == 429
        assert (await client.get(path, headers=buyer)).status_code == 200


def counter(metrics: str, name: str, outcome: str) -> float:
    for line in metrics.splitlines():
        if line.startswith(f'{name}{{outcome="{outcome}"}} '):
            return float(line.split()[-1])
    raise AssertionError(f"{name}{{outcome={outcome}}} is not exported")


async def test_activation_and_lookup_outcomes_are_counted_in_metrics(broker: str) -> None:
    license_id = new_license()
    async with httpx.AsyncClient() as client:

        async def scrape() -> str:
            return (await client.get(f"{broker}/metrics")).text

        before = await scrape()
        key = await key_of(client, broker, await buy(client, broker, license_id))
        assert (await client.get(f"{broker}/api/checkout-sessions/cs_test_nothing/license")).status_code == 404
        fp = fingerprint()
        for text, fp_ in ((key, fp), (key, fp), ("AAAA", fp), (keys.display(keys.generate()), fp)):
            await activate(client, broker, text, fp_)
        after = await scrape()
    for name, outcome, delta in [
        ("license_broker_activations_total", "created", 1),
        ("license_broker_activations_total", "again", 1),
        ("license_broker_activations_total", "malformed", 1),
        ("license_broker_activations_total", "invalid", 1),
        ("license_broker_activations_total", "limit", 0),
        ("license_broker_checkout_session_lookups_total", "found", 1),
        ("license_broker_checkout_session_lookups_total", "not_found", 1),
    ]:
        assert counter(after, name, outcome) - counter(before, name, outcome) == delta, (name, outcome)
