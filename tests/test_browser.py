"""Headless Chromium's own EventSource across a restart of the stream process: every event once."""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Callable

import httpx
import pytest

from tests.support.licenses import new_license, signed, token_for
from tests.support.processes import ROOT, Process, process_env
from tests.support.services import CI
from tests.support.waiting import wait_until
from webhook.samples import SampleEvents

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]  # fmt: skip

# What a web app does with EventSource: the browser resumes by itself (sending Last-Event-ID)
# after `retry:`; if it gives up (the server was down), the page reopens from the last id.
PAGE = """<!doctype html><meta charset="utf-8"><title>es</title><pre id="log">ids received:</pre><script>
window.seen = []; window.opens = 0;
function open(last) {
  const q = new URLSearchParams({token: TOKEN});
  if (last !== null) q.set("lastEventId", last);
  const es = new EventSource(`/api/licenses/${LICENSE}/events?${q}`);
  es.onopen = () => { window.opens++; };
  es.onmessage = (e) => { window.seen.push(Number(e.lastEventId));
    document.getElementById("log").textContent += `\n${e.lastEventId} ${JSON.parse(e.data).status}`; };
  es.onerror = () => { if (es.readyState === EventSource.CLOSED) {
    const s = window.seen; setTimeout(() => open(s.length ? s[s.length - 1] : null), 300); } };
}
open(null);
</script>"""


@pytest.mark.browser
def test_chromium_eventsource_receives_every_event_once_across_a_stream_restart(
    pg_url: str, redis_url: str, spawn: Callable[..., Process]
) -> None:
    if not shutil.which(CHROMIUM):
        if CI:
            pytest.fail("chromium is not installed (.ci/run installs it)")
        pytest.skip("chromium is not installed")
    from playwright.sync_api import sync_playwright

    env = process_env(pg_url, REDIS_URL=redis_url, STREAM_RETRY_MS="200")
    webhook, stream = spawn("webhook", env), spawn("stream", env)
    license_id = new_license()
    sample = SampleEvents(license_id)
    statuses = ["active", "past_due", "active", "canceled", "active", "past_due"]

    def post(status: str) -> None:
        payload, headers = signed(sample.subscription_event("customer.subscription.updated", status, sample.tick()))
        assert httpx.post(f"{webhook.url}/api/stripe/webhooks", content=payload, headers=headers).status_code == 200

    page_html = PAGE.replace("TOKEN", f'"{token_for(license_id)}"').replace("LICENSE", f'"{license_id}"')
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page()
            page.route(f"{stream.url}/es.html", lambda route: route.fulfill(body=page_html, content_type="text/html"))
            page.goto(f"{stream.url}/es.html")
            page.wait_for_function("window.seen.length === 1", timeout=10_000)
            for status in statuses[:3]:
                post(status)
            page.wait_for_function("window.seen.length === 4", timeout=10_000)
            stream.stop(signal.SIGTERM)  # the streams end; the browser starts reconnecting
            for status in statuses[3:5]:
                post(status)  # committed while no stream process runs
            restarted = spawn("stream", env, port=stream.port)
            wait_until(lambda: restarted.proc.poll() is None)
            page.wait_for_function("window.seen.length === 6", timeout=20_000)
            post(statuses[5])
            page.wait_for_function("window.seen.length === 7", timeout=10_000)
            seen = page.evaluate("window.seen")
            opens = page.evaluate("window.opens")
            os.makedirs(ROOT / "test-artifacts", exist_ok=True)
            page.screenshot(path=str(ROOT / "test-artifacts" / "eventsource-restart.png"))
        finally:
            browser.close()
    assert seen == [0, 1, 2, 3, 4, 5, 6]
    assert opens >= 2


# The Electron example's window (examples/electron/index.html), as its sandboxed renderer loads it
# (a file: URL, its own Content-Security-Policy), with the preload's `window.license` stubbed as
# the main process answers: no machine activated here, a key whose limit is reached (one machine,
# its name chosen by whoever activated it), then released and activated here.
PRELOAD_STUB = """
window.violations = [];
document.addEventListener("securitypolicyviolation", (e) => window.violations.push(e.violatedDirective));
window.calls = [];
const unlocked = { screen: "app", released: false, entitled: true, status: "active", features: [], expiresAt: null,
                   connection: "live" };
window.license = {
  get: async () => ({ screen: "key", released: false, entitled: false, status: "unknown", features: [],
                      expiresAt: null, connection: "inactive" }),
  onChange: (callback) => { window.change = callback; return () => {}; },
  activate: async (key) => {
    window.calls.push(["activate", key]);
    return { ok: false, error: "machine_limit_reached", message: "machine limit reached", max: 1, machines: [
      { id: "mch_1", name: "<img src=x onerror=window.pwned=1>", platform: "darwin", lastSeenAt: null }] };
  },
  replace: async (machineId, key) => {
    window.calls.push(["replace", machineId, key]);
    setTimeout(() => window.change(unlocked));
    return { ok: true };
  },
  deactivate: async () => { window.calls.push(["deactivate"]); return { ok: true }; },
  startTrial: async () => {
    window.calls.push(["startTrial"]);
    return { ok: false, error: "trial_used", message: "this machine has had its trial" };
  },
  use: async (feature) => {
    window.calls.push(["use", feature]);
    return { ok: true, result: "made by the main process" };
  },
};
"""


@pytest.mark.browser
def test_the_electron_examples_window_offers_a_trial_buy_or_a_key_offers_the_machines_to_release_and_unlocks() -> None:
    if not shutil.which(CHROMIUM):
        if CI:
            pytest.fail("chromium is not installed (.ci/run installs it)")
        pytest.skip("chromium is not installed")
    from playwright.sync_api import sync_playwright

    badge = "getComputedStyle(document.getElementById('badge')).backgroundColor"
    key = "PY9W9-WM8F2-WT0QD-EYJKS-7YMED"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page()
            page.add_init_script(PRELOAD_STUB)
            page.goto((ROOT / "examples" / "electron" / "index.html").as_uri())
            # The first run: a trial, Buy, or "I have a key"; the app itself is not shown (styles.css,
            # under the page's policy), nor the key form before "I have a key"
            page.wait_for_selector("#key-screen", state="visible")
            assert page.is_hidden("#app-screen") and page.is_hidden("#pro") and page.is_hidden("#key")
            choices = [page.text_content(f"#{b}") for b in ("trial", "buy", "have-key")]
            page.click("#trial")
            page.wait_for_selector("#offer-error:has-text('had its trial')")
            page.click("#have-key")
            page.fill("#key", key)
            page.click("#activate")
            page.wait_for_selector("#machines li")
            refusal, listed = page.text_content("#key-error"), page.text_content("#machines li")
            assert page.evaluate("document.querySelectorAll('#machines img').length") == 0  # text, never HTML
            page.click("#machines li button")
            page.wait_for_selector("#app-screen", state="visible")
            assert page.is_hidden("#key-screen") and page.text_content("#badge") == "UNLOCKED"
            unlocked = (page.evaluate(badge), page.is_disabled("#pro"))
            page.click("#pro")
            page.wait_for_function("document.getElementById('result').textContent !== ''")
            page.evaluate("window.change({screen: 'app', released: false, entitled: false, status: 'revoked', "
                          "features: [], expiresAt: null, connection: 'live'})")  # fmt: skip
            locked = (page.evaluate(badge), page.is_disabled("#pro"), page.text_content("#why"))
            page.evaluate("window.change({screen: 'app', released: false, entitled: true, status: 'trialing', "
                          "features: [], expiresAt: null, connection: 'live', manageable: false, "
                          "trial: {daysLeft: 3, endsAt: '2030-01-01T00:00:00Z', ended: false}})")  # fmt: skip
            trial = (page.text_content("#trial-left"), page.is_visible("#buy-now"), page.is_visible("#manage"))
            page.evaluate("window.change({screen: 'key', released: true, entitled: false, status: 'unknown', "
                          "features: [], expiresAt: null, connection: 'unauthorized'})")  # fmt: skip
            page.wait_for_selector("#key-screen", state="visible")
            released = page.text_content("#key-why")
            result, calls, violations, pwned = page.evaluate(
                "[document.getElementById('result').textContent, window.calls, window.violations, window.pwned]"
            )
        finally:
            browser.close()
    assert violations == [] and pwned is None
    assert refusal is not None and "Release one" in refusal
    assert listed is not None and "<img src=x onerror=window.pwned=1> (darwin)" in listed
    assert calls == [["startTrial"], ["activate", key], ["replace", "mch_1", key], ["use", "pro-report"]]
    assert choices == ["Start a 14-day trial", "Buy", "I have a key"]
    assert trial[0] is not None and trial[0].startswith("Trial: 3 days left") and trial[1:] == (True, False)
    assert unlocked == ("rgb(220, 252, 231)", False) and result == "made by the main process"
    assert locked[:2] == ("rgb(254, 226, 226)", True) and "refunded" in (locked[2] or "")
    assert released is not None and "deactivated" in released
