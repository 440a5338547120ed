"""The live page at `/` (serve mode), driven in headless Chromium, and the development-only
endpoints behind its buttons."""

from __future__ import annotations

import base64
import os
import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
from cryptography.hazmat.primitives import serialization

from broker.settings import SettingsError
from broker.signing.leases import LeaseKeys, key_id, public_pems
from license_broker.embedded import create_app
from tests.support.licenses import make_settings, new_license, post_event, token_for
from tests.support.processes import ROOT, serving
from tests.support.services import unavailable
from webhook.samples import SampleEvents

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = ROOT / "test-artifacts"
KEYS = LeaseKeys.generate()
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    if not os.path.exists(CHROMIUM):  # noqa: ASYNC240 (one stat, before the loop does anything)
        unavailable("Chromium", FileNotFoundError(CHROMIUM))
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            await browser.close()


@pytest.fixture
async def page(browser: Any) -> AsyncIterator[Any]:
    context = await browser.new_context(viewport={"width": 1100, "height": 900})
    try:
        yield await context.new_page()
    finally:
        await context.close()


async def current_seq(url: str, license_id: str) -> int:
    headers = {"authorization": f"Bearer {token_for(license_id)}"}
    async with httpx.AsyncClient() as client:
        seq: int = (await client.get(f"{url}/api/licenses/{license_id}", headers=headers)).json()["seq"]
    return seq


async def test_dev_endpoints_exist_only_in_development_mode(sqlite_url: str) -> None:
    license_id = new_license()
    body = {"license_id": license_id, "action": "pay"}
    async with serving(create_app(make_settings(sqlite_url))) as url, httpx.AsyncClient(base_url=url) as client:
        assert (await client.get("/")).status_code == 200
        assert (await client.post("/dev/token", json=body)).status_code == 404
        assert (await client.post("/dev/simulate", json=body)).status_code == 404
    dev = make_settings(sqlite_url, dev=True)
    async with serving(create_app(dev)) as url, httpx.AsyncClient(base_url=url) as client:
        minted = await client.post("/dev/token", json=body)
        assert minted.status_code == 200
        headers = {"authorization": f"Bearer {minted.json()['token']}"}
        simulated = await client.post("/dev/simulate", json=body)
        assert simulated.status_code == 200
        posted = simulated.json()["events"]
        assert [e["type"] for e in posted] == [e["type"] for e in SampleEvents(license_id).for_action("pay")]
        assert all(e["status"] == 200 for e in posted) and "applied" in {e["outcome"] for e in posted}
        state = (await client.get(f"/api/licenses/{license_id}", headers=headers)).json()
        assert (state["status"], state["entitled"]) == ("active", True)
        assert (await client.post("/dev/simulate", json={**body, "action": "explode"})).status_code == 400
        assert (await client.post("/dev/token", json={"license_id": "no spaces"})).status_code == 400


def test_development_mode_is_refused_on_a_real_database() -> None:
    settings = make_settings("postgresql+psycopg://127.0.0.1:5432/broker", dev=True)
    with pytest.raises(SettingsError, match=r"^BROKER_DEV: development mode needs an SQLite DATABASE_URL"):
        create_app(settings)


@pytest.mark.parametrize("path", ["/dev/token", "/dev/simulate"])
async def test_dev_endpoints_answer_only_json_addressed_to_a_loopback_name(sqlite_url: str, path: str) -> None:
    """DNS rebinding (a foreign Host) and cross-site simple requests (text/plain, no preflight)."""
    body = orjson.dumps({"license_id": new_license(), "action": "cancel"})
    json = "application/json"
    async with serving(create_app(make_settings(sqlite_url, dev=True))) as url, httpx.AsyncClient() as client:
        port = url.rsplit(":", 1)[1]

        async def post(host: str | None, content_type: str | None) -> int:
            headers = {"host": host} if host is not None else {}
            if content_type is not None:
                headers["content-type"] = content_type
            return (await client.post(f"{url}{path}", content=body, headers=headers)).status_code

        for host in ("127.0.0.1", f"127.0.0.1:{port}", "localhost", f"LocalHost:{port}", "[::1]", f"[::1]:{port}"):
            assert await post(host, json) == 200, host
        assert await post(f"127.0.0.1:{port}", "application/json; charset=utf-8") == 200
        for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example", "localhost.evil", "[::2]", ""):
            assert await post(host, json) == 403, host
        for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data", None):
            assert await post(f"127.0.0.1:{port}", content_type) == 415, content_type


@pytest.mark.parametrize(
    ("method", "path"), [("POST", "/dev/token"), ("POST", "/dev/simulate"), ("GET", "/dev/public-key.pem")]
)
async def test_dev_endpoints_refuse_a_request_a_proxy_forwarded(sqlite_url: str, method: str, path: str) -> None:
    """A proxy on this machine connects from loopback and may pass (or set) `Host: 127.0.0.1`: the
    Host check alone would open these routes to whoever reaches the proxy."""
    body = orjson.dumps({"license_id": new_license(), "action": "pay"})
    app = create_app(make_settings(sqlite_url, dev=True, lease_keys=LeaseKeys.generate(ephemeral=True)))
    async with serving(app) as url, httpx.AsyncClient() as client:

        async def send(extra: dict[str, str]) -> httpx.Response:
            headers = {"host": "127.0.0.1", "content-type": "application/json", **extra}
            return await client.request(method, f"{url}{path}", content=body, headers=headers)

        assert (await send({})).status_code == 200
        for extra in (
            {"x-forwarded-for": "203.0.113.9"},
            {"x-forwarded-for": "127.0.0.1"},
            {"x-forwarded-host": "127.0.0.1"},
            {"x-forwarded-proto": "http"},
            {"forwarded": "for=203.0.113.9;host=127.0.0.1"},
            {"via": "1.1 nginx"},
            {"x-real-ip": "203.0.113.9"},
        ):
            refused = await send(extra)
            assert refused.status_code == 403, extra
            assert "proxied" in refused.json()["error"] or "loopback" in refused.json()["error"], extra


async def test_the_development_public_key_is_the_key_this_run_signs_with(sqlite_url: str) -> None:
    keys = LeaseKeys.generate(ephemeral=True)
    app = create_app(make_settings(sqlite_url, dev=True, lease_keys=keys))
    async with serving(app) as url, httpx.AsyncClient() as client:
        pem = await client.get(f"{url}/dev/public-key.pem")
        jwks = (await client.get(f"{url}/.well-known/jwks.json")).json()
    assert pem.status_code == 200
    assert pem.text == public_pems(keys)
    assert pem.text.startswith(f"# kid {jwks['keys'][0]['kid']} (signs)\n")
    loaded = serialization.load_pem_public_key(pem.text.split("\n", 1)[1].encode())
    assert key_id(loaded) == key_id(keys.signing.public_key())  # type: ignore[arg-type]


async def test_the_page_is_served_only_by_serve_not_by_the_stream_app(pg_url: str) -> None:
    from stream.app import create_app as create_stream_app

    async with serving(create_stream_app(make_settings(pg_url, dev=True))) as url, httpx.AsyncClient() as client:
        assert (await client.get(f"{url}/")).status_code == 404
        assert (await client.post(f"{url}/dev/token", json={"license_id": "lic_x"})).status_code == 404


@pytest.mark.browser
async def test_clicking_pay_unlocks_and_cancel_locks_the_license_live(sqlite_url: str, page: Any) -> None:
    from playwright.async_api import expect

    license_id = new_license()
    async with serving(create_app(make_settings(sqlite_url, dev=True, lease_keys=KEYS))) as url:
        await page.goto(f"{url}/?license={license_id}")
        await expect(page.locator("#connection")).to_have_attribute("data-state", "live")
        await expect(page.locator("#badge")).to_have_text("LOCKED")
        await expect(page.locator("#status")).to_have_text("none")
        await expect(page.locator("#lease")).to_have_text(re.compile(r"^verified \(seq 0, not entitled, kid "))

        await page.get_by_role("button", name="Pay", exact=True).click()
        await expect(page.locator("#badge")).to_have_text("UNLOCKED")
        await expect(page.locator("#badge")).to_have_attribute("data-entitled", "true")
        await expect(page.locator("#status")).to_have_text("active")
        await expect(page.locator("#period-end")).not_to_have_text("—")
        # Every event of the checkout, once: the current state, then one row per event, newest first.
        await expect(page.locator("#sim-result")).to_contain_text("Pay: ")
        paid = await current_seq(url, license_id)
        await expect(page.locator("#seq")).to_have_text(str(paid))
        await expect(page.locator("#log tr")).to_have_count(paid + 1)
        # The lease of the paid state, verified in the page against the JWKS (WebCrypto Ed25519).
        await expect(page.locator("#lease")).to_have_attribute("data-verdict", "verified")
        await expect(page.locator("#lease")).to_contain_text(f"seq {paid}, entitled")
        await expect(page.locator("#lease-expires")).to_contain_text("(in 7 days; an app offline stays unlocked")

        await page.get_by_role("button", name="Open a dispute", exact=True).click()
        await expect(page.locator("#badge")).to_have_text("LOCKED")
        await expect(page.locator("#badge")).to_have_attribute("data-entitled", "false")
        await expect(page.locator("#status")).to_have_text("revoked")
        await expect(page.locator("#log tr").first).to_contain_text("charge.dispute.created")

        await page.get_by_role("button", name="Win the dispute", exact=True).click()
        await expect(page.locator("#badge")).to_have_text("UNLOCKED")
        await expect(page.locator("#log tr").first).to_contain_text("charge.dispute.closed")

        await page.get_by_role("button", name="Cancel", exact=True).click()
        await expect(page.locator("#badge")).to_have_text("LOCKED")
        await expect(page.locator("#status")).to_have_text("canceled")
        await expect(page.locator("#log tr")).to_have_count(paid + 4)
        await expect(page.locator("#log tr").first).to_contain_text("customer.subscription.deleted")
        await expect(page.locator("#lease")).to_contain_text(f"seq {paid + 3}, not entitled")
        ARTIFACTS.mkdir(exist_ok=True)
        await page.screenshot(path=str(ARTIFACTS / "live-page.png"), full_page=True)


@pytest.mark.browser
async def test_outside_development_mode_the_page_follows_with_a_pasted_token(pg_url: str, page: Any) -> None:
    from playwright.async_api import expect

    license_id = new_license()
    async with serving(create_app(make_settings(pg_url))) as url:
        await page.goto(f"{url}/?license={license_id}")
        await expect(page.locator("#connection")).to_have_text("needs a token")
        await expect(page.locator("#token-hint")).to_be_visible()
        await expect(page.locator("#dev")).to_be_hidden()
        await expect(page.locator("#lease")).to_contain_text("none: this server signs no leases")

        await page.locator("#token").fill(token_for(license_id))
        await page.get_by_role("button", name="Follow").click()
        await expect(page.locator("#connection")).to_have_attribute("data-state", "live")
        async with httpx.AsyncClient() as client:
            for event in SampleEvents(license_id).for_action("pay"):
                assert (await post_event(client, url, event)).status_code == 200
        await expect(page.locator("#badge")).to_have_text("UNLOCKED")
        await expect(page.locator("#status")).to_have_text("active")


@pytest.mark.browser
async def test_a_token_for_another_license_is_refused_on_the_page(pg_url: str, page: Any) -> None:
    from playwright.async_api import expect

    async with serving(create_app(make_settings(pg_url))) as url:
        await page.goto(f"{url}/?license={new_license()}")
        await page.locator("#token").fill(token_for(new_license()))
        await page.get_by_role("button", name="Follow").click()
        await expect(page.locator("#connection")).to_have_text("refused: check the token")


@pytest.mark.browser
async def test_the_page_verifies_leases_rejects_forgeries_and_says_when_it_cannot_verify(
    pg_url: str, page: Any
) -> None:
    license_id = new_license()
    async with serving(create_app(make_settings(pg_url, lease_keys=KEYS))) as url:
        await page.goto(f"{url}/?license={license_id}")
        headers = {"authorization": f"Bearer {token_for(license_id)}"}
        async with httpx.AsyncClient() as client:
            for event in SampleEvents(license_id).for_action("pay"):
                assert (await post_event(client, url, event)).status_code == 200
            lease = (await client.get(f"{url}/api/licenses/{license_id}", headers=headers)).json()["lease"]
        header, payload, signature = lease.split(".")
        # A longer lease, claimed with the old signature.
        claims = orjson.loads(base64.urlsafe_b64decode(payload + "=="))
        claims["exp"] += 365 * 86400
        tampered = f"{header}.{base64.urlsafe_b64encode(orjson.dumps(claims)).rstrip(b'=').decode()}.{signature}"

        async def verdict(token: str, for_license: str = license_id) -> list[str]:
            result: dict[str, Any] = await page.evaluate("([t, l]) => verifyLease(t, l)", [token, for_license])
            return [result["verdict"], result["why"]]

        assert (await verdict(lease))[0] == "verified"
        assert await verdict(tampered) == ["invalid", "bad signature"]
        assert await verdict(lease, new_license()) == ["invalid", "for another license"]
        # A browser without Ed25519 in WebCrypto shows the lease as unverified rather than failing.
        await page.evaluate(
            "() => { crypto.subtle.importKey = async () => { throw new DOMException('no', 'NotSupportedError'); }; }"
        )
        verdict_, why = await verdict(lease)
        assert verdict_ == "unverified" and "no Ed25519 in WebCrypto (NotSupportedError)" in why
