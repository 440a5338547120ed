"""Development mode's own checkout and portal pages in headless Chromium (no Stripe account): the
app asks for a checkout, follows its stream, the buyer presses Pay on the broker's page and the
listening app unlocks, its machine's lease with it; the portal's buttons cancel; Cancel on a
checkout removes the pending license (the app's stream ends)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import jwt
import orjson
import pytest

from broker.settings import Settings
from license_broker.embedded import create_app
from tests.support.activations import EventStream, bearer, fingerprint
from tests.support.processes import ROOT, serving
from tests.support.services import unavailable

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]  # fmt: skip
ARTIFACTS = ROOT / "test-artifacts"


@pytest.fixture
async def page() -> AsyncIterator[Any]:
    if not os.path.exists(CHROMIUM):  # noqa: ASYNC240 (one stat, before the loop does anything)
        unavailable("Chromium", FileNotFoundError(CHROMIUM))
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = await browser.new_context(viewport={"width": 900, "height": 700})
            yield await context.new_page()
        finally:
            await browser.close()


def development(tmp_path: Path) -> Settings:
    """What `make run` runs: BROKER_DEV, SQLite, and nothing else set."""
    return Settings.from_env({"BROKER_DEV": "1", "DATABASE_URL": f"sqlite:///{tmp_path / 'dev.db'}"})


async def next_state(stream: EventStream) -> dict[str, Any]:
    state: dict[str, Any] = orjson.loads(await stream.until("message"))
    return state


async def state_where(stream: EventStream, check: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """The first state the stream sends that passes `check` (one purchase is several events)."""
    while not check(state := await next_state(stream)):
        pass
    return state


@pytest.mark.browser
async def test_pay_on_the_development_checkout_page_unlocks_the_listening_app(tmp_path: Path, page: Any) -> None:
    from playwright.async_api import expect

    async with serving(create_app(development(tmp_path))) as url, httpx.AsyncClient(timeout=10) as client:
        fp = fingerprint()
        answer = await client.post(f"{url}/api/checkout", json={"fingerprint": fp, "name": "Dev laptop"})
        assert answer.status_code == 201, answer.text
        started = answer.json()
        license_id, token = started["license_id"], started["token"]
        assert started["checkout_url"].startswith(f"{url}/dev/checkout/cs_test_dev_")
        events_url = f"{url}/api/licenses/{license_id}/events"
        async with EventStream(client, events_url, bearer(token)) as stream:
            assert (await next_state(stream))["entitled"] is False
            response = await page.goto(started["checkout_url"])
            assert "script-src 'self'" in response.headers["content-security-policy"]
            await expect(page.locator("#what")).to_contain_text("a subscription")
            ARTIFACTS.mkdir(exist_ok=True)
            await page.screenshot(path=str(ARTIFACTS / "dev-checkout.png"), full_page=True)
            await page.get_by_role("button", name="Pay").click()
            # The app, listening all along, unlocks; its lease names its machine.
            state = await state_where(stream, lambda s: s["entitled"])
            assert (state["status"], state["state"]["kind"]) == ("active", "subscription")
            lease = jwt.decode(orjson.loads(await stream.until("lease"))["lease"], options={"verify_signature": False})
            assert (lease["machine"], lease["fingerprint"], lease["entitled"]) == (started["machine_id"], fp, True)
            # The browser went on to the success page, which shows the key for the next computer.
            await page.wait_for_url(f"{url}/activate?session_id=*")
            await expect(page.locator("#ready")).to_be_visible()
            key = await page.locator("#key").text_content()
            shown = await client.get(f"{url}/api/licenses/{license_id}/key", headers=bearer(token))
            assert key == shown.json()["key"]
            # Managing it: the portal's buttons cancel at the period's end, then at once.
            portal = await client.post(f"{url}/api/portal", headers=bearer(token))
            assert portal.json() == {"url": f"{url}/dev/portal/{license_id}"}
            await page.goto(portal.json()["url"])
            await expect(page.locator("#summary")).to_contain_text("active")
            assert await page.locator("#return").get_attribute("href") == f"{url}/activate"
            await page.get_by_role("button", name="Cancel at the end of the period").click()
            state = await state_where(stream, lambda s: s["state"]["cancel_at_period_end"])
            assert state["entitled"] is True and state["state"]["cancels_at"]
            await expect(page.locator("#summary")).to_contain_text("It ends on")
            await page.get_by_role("button", name="Cancel now").click()
            state = await state_where(stream, lambda s: not s["entitled"])
            assert state["status"] == "canceled"
            await page.screenshot(path=str(ARTIFACTS / "dev-portal.png"), full_page=True)


@pytest.mark.browser
async def test_cancel_on_the_development_checkout_page_removes_the_pending_license(tmp_path: Path, page: Any) -> None:
    from playwright.async_api import expect

    async with serving(create_app(development(tmp_path))) as url, httpx.AsyncClient(timeout=10) as client:
        started = (await client.post(f"{url}/api/checkout", json={"fingerprint": fingerprint(), "price":
                                      "price_dev_lifetime"})).json()  # fmt: skip
        events_url = f"{url}/api/licenses/{started['license_id']}/events"
        async with EventStream(client, events_url, bearer(started["token"])) as stream:
            await next_state(stream)
            await page.goto(started["checkout_url"])
            await expect(page.locator("#what")).to_contain_text("a one-time purchase")
            await page.get_by_role("button", name="Cancel").click()
            await expect(page.locator("#done-text")).to_contain_text("Checkout canceled")
            # The pending license and its machine are gone: the app's stream ends, its token is refused.
            while (event := await stream.next(within=5)) is not None:
                if event[0] == "message":
                    assert orjson.loads(event[1])["entitled"] is False
        refused = await client.get(f"{url}/api/machines", headers=bearer(started["token"]))
        assert (refused.status_code, refused.json()) == (401, {"error": "machine released"})
        again = await client.post(f"{started['checkout_url']}/pay", json={})
        assert again.status_code == 404
        trial = await client.post(f"{url}/api/trials", json={"fingerprint": fingerprint()})
        assert trial.status_code == 201 and trial.json()["trial_end"]  # and a 14-day trial, with nothing set
