"""The buyer's /activate page (Checkout's success_url) in headless Chromium: it waits live for
Stripe's webhook, shows the key, copies it and links to the app."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from license_broker.embedded import create_app
from tests.support.activations import activate, keyed_settings, session_of
from tests.support.licenses import make_settings, new_license, post_event
from tests.support.processes import ROOT, serving
from tests.support.services import unavailable
from webhook.samples import SampleEvents

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]  # fmt: skip
ARTIFACTS = ROOT / "test-artifacts"


@pytest.fixture
async def page(request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    if not os.path.exists(CHROMIUM):  # noqa: ASYNC240 (one stat, before the loop does anything)
        unavailable("Chromium", FileNotFoundError(CHROMIUM))
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = await browser.new_context(viewport={"width": 900, "height": 700})
            await context.grant_permissions(["clipboard-read", "clipboard-write"])
            yield await context.new_page()
        finally:
            await browser.close()


async def test_the_page_waits_for_the_webhook_then_shows_copies_and_links_the_key(pg_url: str, page: Any) -> None:
    from playwright.async_api import expect

    license_id = new_license()
    session_id = session_of(license_id)
    settings = keyed_settings(pg_url, app_name="Acme <Draw>", app_url_scheme="acmedraw")
    async with serving(create_app(settings)) as url, httpx.AsyncClient() as client:
        response = await page.goto(f"{url}/activate?session_id={session_id}")
        assert response.headers["cache-control"] == "no-store"
        assert response.headers["referrer-policy"] == "no-referrer"
        assert "script-src 'self'" in response.headers["content-security-policy"]
        assert await page.title() == "Activate Acme <Draw>"  # escaped in the HTML, shown as typed
        # The buyer got here before Stripe's webhook: the page waits, live.
        await expect(page.locator("#waiting")).to_be_visible()
        await expect(page.locator("#ready")).to_be_hidden()
        await page.evaluate("window.notReloaded = true")
        for event in SampleEvents(license_id).for_action("pay"):
            assert (await post_event(client, url, event)).status_code == 200
        await expect(page.locator("#ready")).to_be_visible()
        await expect(page.locator("#status")).to_have_attribute("data-entitled", "true")
        assert await page.evaluate("window.notReloaded") is True
        key = await page.locator("#key").text_content()
        shown = (await client.get(f"{url}/api/checkout-sessions/{session_id}/license")).json()
        assert key == shown["key"] and len(key.split("-")) == 5
        await page.get_by_role("button", name="Copy").click()
        await expect(page.locator("#copied")).to_have_text("Copied to the clipboard.")
        assert await page.evaluate("navigator.clipboard.readText()") == key
        link = page.get_by_role("link", name="Open Acme <Draw>")
        assert await link.get_attribute("href") == f"acmedraw://activate?key={key}"
        # The key the page shows is the one that activates.
        assert (await activate(client, url, key)).status_code == 201
        ARTIFACTS.mkdir(exist_ok=True)
        await page.screenshot(path=str(ARTIFACTS / "activate-page.png"), full_page=True)


async def test_the_page_says_what_is_wrong_with_a_bad_link(pg_url: str, page: Any) -> None:
    from playwright.async_api import expect

    async with serving(create_app(keyed_settings(pg_url))) as url:
        await page.goto(f"{url}/activate?session_id=not-a-session")
        await expect(page.locator("#problem-text")).to_contain_text("does not name a checkout")
        await page.goto(f"{url}/activate")
        await expect(page.locator("#problem-text")).to_contain_text("open it from the link at the end of your checkout")
        await expect(page.locator("#open-row")).to_be_hidden()
    async with serving(create_app(make_settings(pg_url))) as url:
        await page.goto(f"{url}/activate?session_id=cs_test_abc")
        await expect(page.locator("#problem-text")).to_contain_text("does not issue license keys")


async def test_the_live_page_buys_shows_the_key_activates_machines_and_ends_a_released_ones_stream(
    sqlite_url: str, page: Any
) -> None:
    """`make run`'s page: Pay, the key and its /activate link, machines that each hold a stream,
    the limit, and a release whose stream ends."""
    from playwright.async_api import expect

    from broker.settings import Settings

    license_id = new_license()
    settings = Settings.from_env({"BROKER_DEV": "1", "DATABASE_URL": sqlite_url, "STREAM_RETRY_MS": "200"})
    async with serving(create_app(settings)) as url:
        await page.goto(f"{url}/?license={license_id}")
        await expect(page.locator("#connection")).to_have_attribute("data-state", "live")
        await expect(page.locator("#keys")).to_be_visible()
        await expect(page.locator("#no-key")).to_be_visible()
        await page.get_by_role("button", name="Pay", exact=True).click()
        await expect(page.locator("#badge")).to_have_text("UNLOCKED")
        await expect(page.locator("#key-box")).to_be_visible()
        key = await page.locator("#license-key").text_content()
        assert key is not None and len(key.split("-")) == 5
        assert (
            await page.locator("#activate-link").get_attribute("href")
            == f"/activate?session_id={session_of(license_id)}"
        )
        for n in (1, 2, 3):
            await page.get_by_role("button", name="Activate a machine").click()
            await expect(page.locator("#machines tr")).to_have_count(n)
        await expect(page.locator("#machines .stream-state")).to_have_text(["live", "live", "live"])
        await page.get_by_role("button", name="Activate a machine").click()
        await expect(page.locator("#activation-result")).to_have_text("machine limit reached (3): release one first")
        released = await page.locator("#machines tr").first.get_attribute("data-machine")
        row = page.locator(f'#machines tr[data-machine="{released}"]')
        await row.get_by_role("button", name="Release").click()
        await expect(row.locator(".stream-state")).to_have_text("ended: token refused (released)")
        await expect(page.locator("#machine-count")).to_have_text("2 of 3 machines in use.")
        await expect(page.locator("#machines .stream-state")).to_have_text(
            ["live", "live", "ended: token refused (released)"]
        )
        ARTIFACTS.mkdir(exist_ok=True)
        await page.screenshot(path=str(ARTIFACTS / "live-page-machines.png"), full_page=True)
        await page.goto("about:blank")  # its streams closed before the server stops
