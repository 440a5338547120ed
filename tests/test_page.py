"""The live page at `/` (serve mode), driven in headless Chromium, and the development-only
endpoints behind its buttons."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from license_broker.embedded import create_app
from tests.support.licenses import make_settings, new_license, post_event, token_for
from tests.support.processes import ROOT, serving
from tests.support.services import unavailable
from webhook.samples import SampleEvents

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = ROOT / "test-artifacts"
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


async def test_dev_endpoints_exist_only_in_development_mode(pg_url: str) -> None:
    license_id = new_license()
    body = {"license_id": license_id, "action": "pay"}
    async with serving(create_app(make_settings(pg_url))) as url, httpx.AsyncClient(base_url=url) as client:
        assert (await client.get("/")).status_code == 200
        assert (await client.post("/dev/token", json=body)).status_code == 404
        assert (await client.post("/dev/simulate", json=body)).status_code == 404
    async with serving(create_app(make_settings(pg_url, dev=True))) as url, httpx.AsyncClient(base_url=url) as client:
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


async def test_the_page_is_served_only_by_serve_not_by_the_stream_app(pg_url: str) -> None:
    from stream.app import create_app as create_stream_app

    async with serving(create_stream_app(make_settings(pg_url, dev=True))) as url, httpx.AsyncClient() as client:
        assert (await client.get(f"{url}/")).status_code == 404
        assert (await client.post(f"{url}/dev/token", json={"license_id": "lic_x"})).status_code == 404


@pytest.mark.browser
async def test_clicking_pay_unlocks_and_cancel_locks_the_license_live(pg_url: str, page: Any) -> None:
    from playwright.async_api import expect

    license_id = new_license()
    async with serving(create_app(make_settings(pg_url, dev=True))) as url:
        await page.goto(f"{url}/?license={license_id}")
        await expect(page.locator("#connection")).to_have_attribute("data-state", "live")
        await expect(page.locator("#badge")).to_have_text("LOCKED")
        await expect(page.locator("#status")).to_have_text("none")

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

        await page.get_by_role("button", name="Cancel", exact=True).click()
        await expect(page.locator("#badge")).to_have_text("LOCKED")
        await expect(page.locator("#badge")).to_have_attribute("data-entitled", "false")
        await expect(page.locator("#status")).to_have_text("canceled")
        await expect(page.locator("#log tr")).to_have_count(paid + 2)
        await expect(page.locator("#log tr").first).to_contain_text("customer.subscription.deleted")

        await page.get_by_role("button", name="Refund", exact=True).click()
        await expect(page.locator("#status")).to_have_text("revoked")
        await expect(page.locator("#badge")).to_have_text("LOCKED")
        await expect(page.locator("#log tr").first).to_contain_text("charge.refunded")
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
