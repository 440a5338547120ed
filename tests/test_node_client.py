"""The npm package clients/js (license-broker-client), built by `make test` (npm ci, tsc), runs its
own tests with `node --test` against real servers started here: four deployments on one
database, for the lease, the rotation and the reconnect tests (clients/js/test/server.test.mjs);
two brokers on Postgres and Redis with license keys on (clients/js/test/keys-server.test.mjs);
brokers that sell through the fake Stripe API (buy, trials, the portal:
clients/js/test/purchase-server.test.mjs), whose checkout page a test "pays" as a buyer's browser
would, which sends the broker Stripe's signed webhooks. Then the Electron example's main-process
code (examples/electron/license.js) runs the same way, with the built package installed beside it,
against a broker with keys on and brokers that sell."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
from license_broker_client import MachineIdUnavailable, machine_fingerprint
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

from broker.licensing import keys
from broker.signing.leases import LeaseKeys, private_pem, public_pem
from license_broker.embedded import create_app
from tests.support.activations import KEY_SECRET, LEASE_KEYS, buy, key_of, keyed_settings
from tests.support.licenses import TOKEN_SECRET, WEBHOOK_SECRET, make_settings, new_license, post_event
from tests.support.processes import ROOT, run_module, serving
from tests.support.services import unavailable
from tests.support.stripe_api import FakeStripeApi

JS = ROOT / "clients" / "js"
EXAMPLE = ROOT / "examples" / "electron"


def node_tests() -> list[str]:
    node = shutil.which("node")
    if node is None:
        unavailable("node", FileNotFoundError("node"))
    if not (JS / "dist" / "esm" / "index.js").exists() or not (JS / "dist" / "cjs" / "index.js").exists():
        unavailable("the built JS client", FileNotFoundError(f"{JS}/dist (make test runs npm ci, which builds it)"))
    tests = sorted(str(p.relative_to(JS)) for p in (JS / "test").glob("*.test.*js"))
    expected = {"test/server.test.mjs", "test/cjs.test.cjs", "test/fake-broker.test.mjs", "test/purchase.test.mjs"}
    assert expected | {KEYS_TESTS, PURCHASE_TESTS} <= set(tests)
    return tests


KEYS_TESTS = "test/keys-server.test.mjs"
PURCHASE_TESTS = "test/purchase-server.test.mjs"
MONTHLY, LIFETIME = "price_1Monthly", "price_1Lifetime"
# 5 s: a trial the tests see running, then ended (the settings take fractions of a day on purpose).
SHORT_TRIAL_DAYS = 5 / 86400
# Unpaid checkouts are swept every TTL / 8: an expired session's license goes within 2 s (60 s with
# the default day), early enough for a test to see its app told.
QUICK_PENDING_TTL = 16.0


class Shop:
    """The fake Stripe API (tests/support/stripe_api.py), with the buyer's side of its checkout
    page: `POST <checkout_url>` pays the session as a buyer would, and Stripe's signed webhooks for
    it go to the broker that made it (its success_url's origin); `POST /expire/<session>` expires
    it unpaid, as Stripe does at `expires_at`, and sends `checkout.session.expired`."""

    def __init__(self) -> None:
        self.api = FakeStripeApi()
        self.api.add_price(MONTHLY, recurring=True)
        self.api.add_price(LIFETIME, recurring=False)
        self.http = httpx.AsyncClient(timeout=15)

    async def _send(self, session_id: str, events: list[dict[str, object]]) -> JSONResponse:
        success = urlsplit(self.api.session(session_id)["success_url"])
        broker = f"{success.scheme}://{success.netloc}"
        for event in events:
            answer = await post_event(self.http, broker, event)
            if answer.status_code != 200:
                return JSONResponse({"error": answer.text}, status_code=502)
        return JSONResponse({"events": [event["type"] for event in events]})

    async def pay(self, request: Request) -> JSONResponse:
        session_id = request.path_params["session_id"]
        if f"/v1/checkout/sessions/{session_id}" not in self.api.objects:
            return JSONResponse({"error": "no such session"}, status_code=404)
        if self.api.session(session_id)["status"] != "open":
            return JSONResponse({"error": "this checkout is not open"}, status_code=409)
        return await self._send(session_id, self.api.payment_webhooks(session_id))

    async def expire(self, request: Request) -> JSONResponse:
        session_id = request.path_params["session_id"]
        if f"/v1/checkout/sessions/{session_id}" not in self.api.objects:
            return JSONResponse({"error": "no such session"}, status_code=404)
        return await self._send(session_id, [self.api.expired_webhook(session_id)])

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/pay/{session_id}", self.pay, methods=["POST"]),
                Route("/expire/{session_id}", self.expire, methods=["POST"]),
                Mount("/", app=self.api.app()),
            ]
        )


@contextlib.asynccontextmanager
async def shop_and_brokers(pg_url: str) -> AsyncIterator[dict[str, str]]:
    """The shop, a broker selling through it with 14-day trials, and one whose trials last 5 s and
    whose unpaid checkouts are swept every 2 s: what the node tests get in their environment."""
    shop = Shop()
    key = LeaseKeys.generate()
    async with serving(shop.app()) as shop_url:
        shop.api.base_url = shop_url
        selling = keyed_settings(
            pg_url, lease_keys=key, stripe_api_key="sk_test_node", stripe_api_base=shop_url,
            stripe_prices=(MONTHLY, LIFETIME), trial_days=14.0,
        )  # fmt: skip
        short = dataclasses.replace(selling, trial_days=SHORT_TRIAL_DAYS, checkout_pending_ttl=QUICK_PENDING_TTL)
        async with serving(create_app(selling)) as url, serving(create_app(short)) as short_url:
            yield {
                "SHOP_URL": shop_url,
                "BUY_URL": url,
                "SHORT_TRIAL_URL": short_url,
                "PRICES": f"{MONTHLY},{LIFETIME}",
                "LEASE_PUBLIC_KEY": public_pem(key.signing.public_key()),
            }
    await shop.http.aclose()


async def test_the_js_client_passes_its_node_tests_against_running_servers(sqlite_url: str, tmp_path: Path) -> None:
    tests = [name for name in node_tests() if name not in (KEYS_TESTS, PURCHASE_TESTS)]  # others run those
    key_a, key_b = LeaseKeys.generate(), LeaseKeys.generate()
    rotating = key_b.with_published(key_a.signing.public_key())
    # What an operator pins during the rotation: exactly what `keys public` prints for its setting.
    setting = private_pem(key_b.signing) + public_pem(key_a.signing.public_key())
    printed = run_module("license_broker", "keys", "public", env={"LICENSE_SIGNING_KEY": setting})
    assert printed.returncode == 0, printed.stderr
    async with (
        serving(create_app(make_settings(sqlite_url, dev=True, lease_keys=key_a))) as url,
        serving(create_app(make_settings(sqlite_url, dev=True, lease_keys=rotating))) as url_rotating,
        serving(create_app(make_settings(sqlite_url, dev=True, lease_keys=key_b))) as url_rotated,
        serving(
            create_app(make_settings(sqlite_url, dev=True, lease_keys=key_a, max_connection_lifetime=0.3, retry_ms=100))
        ) as url_short,
    ):
        env = {
            **os.environ,
            "BROKER_URL": url,
            "BROKER_URL_ROTATING": url_rotating,
            "BROKER_URL_ROTATED": url_rotated,
            "BROKER_URL_SHORT": url_short,
            "LEASE_PUBLIC_KEY_A": public_pem(key_a.signing.public_key()),
            "LEASE_KEYS_PUBLIC": printed.stdout,
        }
        report = await run_node_tests(tests, JS, env)
    (tmp_path / "node-test.txt").write_text(report)
    assert "\n# skipped 0" in report, report  # the server tests ran: BROKER_URL was set


def own_redis_db(redis_url: str) -> str:
    # Failed attempts are counted in Redis per client address (127.0.0.1 for every test on this
    # machine): a database of their own keeps other suites' failures out of these tests' limits.
    return redis_url.rsplit("/", 1)[0] + "/13"


def key_cases(path: Path) -> Path:
    """Every single-character typo of 20 keys, and what the broker reads each as (None: malformed)."""
    cases: list[tuple[str, str | None]] = []
    for _ in range(20):
        key = keys.generate()
        cases.append((keys.display(key).lower(), keys.display(key)))
        for i in range(len(key)):
            for c in keys.ALPHABET + "OILU- ":
                typed = key[:i] + c + key[i + 1 :]
                try:
                    cases.append((typed, keys.display(keys.normalize(typed))))
                except keys.MalformedKey:
                    cases.append((typed, None))
    path.write_text(json.dumps(cases))
    return path


async def test_the_js_client_activates_with_keys_against_postgres_and_redis(
    pg_url: str, redis_url: str, tmp_path: Path
) -> None:
    node_tests()
    settings = keyed_settings(pg_url, redis_url=own_redis_db(redis_url), transport="redis", max_machines=2,
                              machine_token_ttl=60.0, poll_interval=30.0)  # fmt: skip
    try:
        here = machine_fingerprint("com.example.draw")
    except MachineIdUnavailable:
        here = ""
    cli_env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "DATABASE_URL": pg_url,
        "STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "STREAM_TOKEN_SECRET": TOKEN_SECRET,
        "LICENSE_KEY_SECRET": KEY_SECRET,
    }
    async with serving(create_app(settings)) as url, serving(create_app(settings)) as url_2:
        prepaid = []
        async with httpx.AsyncClient(timeout=10) as http:
            for _ in range(4):  # paid through signed webhooks; the key from the JSON route
                license_id = new_license()
                key = await key_of(http, url, await buy(http, url, license_id))
                prepaid.append({"license_id": license_id, "key": key})
        env = {
            **os.environ,
            "KEYS_URL": url,
            "KEYS_URL_2": url_2,
            "LEASE_PUBLIC_KEY": public_pem(LEASE_KEYS.signing.public_key()),
            "TOKEN_SECRET": TOKEN_SECRET,
            "BROKER_PYTHON": sys.executable,
            "BROKER_ROOT": str(ROOT),
            "CLI_ENV": json.dumps(cli_env),
            "PREPAID": json.dumps(prepaid),
            "UNISSUED_KEY": keys.display(keys.generate()),
            "KEY_CASES": str(key_cases(tmp_path / "key-cases.json")),
            "PY_FINGERPRINT": here,
        }
        report = await run_node_tests([KEYS_TESTS], JS, env)
    (tmp_path / "node-test.txt").write_text(report)
    assert "\n# pass 7" in report and "\n# skipped 0" in report, report


async def test_the_js_client_buys_tries_and_manages_against_a_broker_and_the_fake_stripe_api(
    pg_url: str, tmp_path: Path
) -> None:
    node_tests()
    async with shop_and_brokers(pg_url) as shop:
        report = await run_node_tests([PURCHASE_TESTS], JS, {**os.environ, **shop})
    (tmp_path / "node-test.txt").write_text(report)
    assert "\n# pass 6" in report and "\n# skipped 0" in report, report


async def run_node_tests(tests: list[str], cwd: Path, env: dict[str, str]) -> str:
    """`node --test` (TAP); the report, once every test passed."""
    proc = await asyncio.create_subprocess_exec(
        "node",
        "--test",
        "--test-reporter=tap",
        *tests,
        cwd=cwd,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        output, _ = await asyncio.wait_for(proc.communicate(), 100)
    except TimeoutError:
        proc.kill()
        output, _ = await proc.communicate()
        raise AssertionError(f"node --test timed out:\n{output.decode()}") from None
    report = output.decode()
    assert proc.returncode == 0, report
    assert "\n# fail 0" in report, report
    return report


async def test_the_electron_examples_main_process_code_activates_buys_tries_unlocks_gates_and_holds_offline(
    sqlite_url: str, pg_url: str, tmp_path: Path
) -> None:
    node_tests()
    app = tmp_path / "electron"
    app.mkdir()
    for name in ("package.json", "main.js", "config.js", "config.test.mjs", "license.js", "license.test.mjs"):
        shutil.copy(EXAMPLE / name, app / name)
    # What `npm install` of "file:../../clients/js" makes: a link to the built package.
    (app / "node_modules").mkdir()
    (app / "node_modules" / "license-broker-client").symlink_to(JS, target_is_directory=True)
    key = LeaseKeys.generate()
    settings = keyed_settings(sqlite_url, dev=True, lease_keys=key, max_machines=1)
    async with serving(create_app(settings)) as url, shop_and_brokers(pg_url) as shop:
        env = {**os.environ, **shop, "BROKER_URL": url, "LEASE_PUBLIC_KEY_A": public_pem(key.signing.public_key())}
        report = await run_node_tests(["config.test.mjs", "license.test.mjs"], app, env)
    assert "\n# pass 11" in report and "\n# skipped 0" in report, report
