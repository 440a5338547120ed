"""`license-broker send`, the demo's Stripe: it says what each action is, why an event changed
nothing (what a "pending" one waits for), and has the customer portal's default cancellation
(at the period's end) beside the immediate one."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from broker.stripe_ledger.objects import report
from license_broker import cli
from license_broker.embedded import create_app
from tests.support.licenses import WEBHOOK_SECRET, make_settings, new_license, token_for
from tests.support.processes import ROOT, serving
from webhook.sample_actions import ACTION_HELP, ACTIONS
from webhook.samples import SampleEvents, explain

STRIPE_EXAMPLE = ROOT / "tests" / "fixtures" / "stripe" / "customer.subscription.updated.cancel_at_period_end.json"


@pytest.fixture(autouse=True)
def settings_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """`send` signs with STRIPE_WEBHOOK_SECRET: the one the servers below verify with."""
    for name in ("STRIPE_WEBHOOK_SECRET", "STREAM_TOKEN_SECRET", "DATABASE_URL", "REDIS_URL", "BROKER_DEV"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("STRIPE_WEBHOOK_SECRET", WEBHOOK_SECRET)


async def send(capsys: pytest.CaptureFixture[str], url: str, action: str, license_id: str) -> list[str]:
    """`license-broker send ACTION LICENSE --url URL` (in a thread: the server runs on this loop);
    its output lines."""
    code = await asyncio.to_thread(cli.main, ["send", action, license_id, "--url", url])
    out = capsys.readouterr().out
    assert code == 0, out
    return out.splitlines()


async def state(url: str, license_id: str) -> dict[str, Any]:
    headers = {"authorization": f"Bearer {token_for(license_id)}"}
    async with httpx.AsyncClient() as client:
        response = await client.get(f"{url}/api/licenses/{license_id}", headers=headers)
    assert response.status_code == 200, response.text
    found: dict[str, Any] = response.json()["state"]
    return found


async def test_cancel_at_period_end_keeps_the_license_until_the_period_ends_then_cancel_ends_it(
    sqlite_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    license_id = new_license()
    async with serving(create_app(make_settings(sqlite_url))) as url:
        await send(capsys, url, "pay", license_id)
        paid = await state(url, license_id)
        assert (paid["status"], paid["entitled"], paid["cancel_at_period_end"], paid["cancels_at"]) == (
            "active", True, False, None
        )  # fmt: skip

        out = await send(capsys, url, "cancel_at_period_end", license_id)
        assert out[0] == f"cancel_at_period_end: {ACTION_HELP['cancel_at_period_end']}"
        assert out[1].startswith("customer.subscription.updated evt_") and '"outcome":"applied"' in out[1]
        ending = await state(url, license_id)
        # Still unlocked, and the app can say until when.
        assert (ending["status"], ending["entitled"], ending["cancel_at_period_end"]) == ("active", True, True)
        assert ending["cancels_at"] is not None and ending["cancels_at"] == ending["current_period_end"]

        await send(capsys, url, "cancel", license_id)  # the period is over: Stripe deletes the subscription
        ended = await state(url, license_id)
        assert (ended["status"], ended["entitled"]) == ("canceled", False)


async def test_send_says_what_each_pending_event_waits_for_and_which_event_brings_it(
    sqlite_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    license_id = new_license()
    sample = SampleEvents(license_id)
    invoice, payment_intent, charge = sample.period(1)
    async with serving(create_app(make_settings(sqlite_url))) as url:
        out = await send(capsys, url, "pay", license_id)
        assert (await state(url, license_id))["entitled"] is True
    assert out[0] == f"pay: {ACTION_HELP['pay']}"
    assert out[1].startswith("charge.succeeded ") and out[1].endswith('{"received":true,"outcome":"pending"}')
    assert out[2] == (
        f"  pending: kept, not counted yet: the charge {charge} names no license, and neither it nor "
        f"{payment_intent} (which it names) is bound to one yet; it counts as soon as an event links one of them "
        "to a license (in this action: invoice_payment.paid, below)"
    )
    assert out[3].startswith("invoice_payment.paid ") and out[3].endswith('"outcome":"pending"}')
    assert f"neither it nor {invoice}, {payment_intent} (which it names)" in out[4]
    assert out[4].endswith("(in this action: invoice.paid, below)")
    assert out[-2].startswith("checkout.session.completed ") and '"outcome":"unchanged"' in out[-2]
    assert out[-1] == "  unchanged: recorded; the license already held what it reports"
    # Applied events need no note.
    assert not any(line.startswith("  applied") for line in out)


def test_a_pending_event_that_nothing_after_it_links_points_at_unmatched() -> None:
    charge_event = SampleEvents("lic_alone").for_action("pay")[0]
    assert charge_event["type"] == "charge.succeeded"
    note = explain("pending", charge_event, [])
    assert note is not None and note.endswith("(`license-broker unmatched` lists it meanwhile)")
    assert explain("applied", charge_event) is None


def test_the_sample_cancellation_changes_what_stripes_own_example_changes() -> None:
    """Stripe's example of the portal's cancellation (tests/fixtures/stripe): the same fields
    change, to the same kind of values, and the broker reads the same state from both."""
    stripe = json.loads(STRIPE_EXAMPLE.read_text())
    ours = SampleEvents("lic_portal").for_action("cancel_at_period_end")
    assert [e["type"] for e in ours] == [stripe["type"]]
    sample = ours[0]
    assert set(sample["data"]["previous_attributes"]) == set(stripe["data"]["previous_attributes"])
    for obj in (stripe["data"]["object"], sample["data"]["object"]):
        assert obj["status"] == "active" and obj["cancel_at_period_end"] is True
        assert obj["canceled_at"] is not None and obj["cancellation_details"]["reason"] == "cancellation_requested"
        period_end = max(item["current_period_end"] for item in obj["items"]["data"])
        assert obj["cancel_at"] == period_end
    read = [report(e) for e in (stripe, sample)]
    assert all(r is not None for r in read)
    states = [r.primary.state for r in read if r is not None]
    for s in states:
        assert (s["status"], s["cancel_at_period_end"], s["cancel_at"]) == ("active", True, s["current_period_end"])


async def test_the_live_page_simulates_the_portal_cancellation_and_notes_pending_events(sqlite_url: str) -> None:
    license_id = new_license()
    assert "cancel_at_period_end" in ACTIONS
    async with (
        serving(create_app(make_settings(sqlite_url, dev=True))) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        paid = (await client.post("/dev/simulate", json={"license_id": license_id, "action": "pay"})).json()
        assert paid["events"][0]["outcome"] == "pending"
        assert paid["events"][0]["note"].startswith("kept, not counted yet: the charge ")
        assert "note" not in paid["events"][2]  # invoice.paid: applied
        body = {"license_id": license_id, "action": "cancel_at_period_end"}
        simulated = await client.post("/dev/simulate", json=body)
        assert simulated.status_code == 200
        assert [e["outcome"] for e in simulated.json()["events"]] == ["applied"]
        ending = await state(url, license_id)
    assert (ending["entitled"], ending["cancel_at_period_end"]) == (True, True)


def test_send_help_lists_the_portal_cancellation(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["send", "--help"])
    assert "cancel_at_period_end: the customer cancels in Stripe's customer portal" in " ".join(
        capsys.readouterr().out.split()
    )
