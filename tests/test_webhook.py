"""POST /api/stripe/webhooks against a real database (Postgres and the embedded SQLite)."""

from __future__ import annotations

import asyncio
import logging
import time

import httpx
import orjson
import pytest
import sqlalchemy as sa
from prometheus_client import REGISTRY

from broker.settings import Settings
from broker.storage.db import create_engine
from broker.storage.schema import licenses, stripe_events, subscription_event_logs
from tests.support.licenses import WEBHOOK_SECRET, make_settings, new_license, post_event, signed
from tests.support.processes import serving
from tests.support.services import count_rows
from webhook.app import create_app
from webhook.samples import SampleEvents
from webhook.signature import sign


async def rows(url: str) -> dict[str, int]:
    return {t: await count_rows(url, t) for t in ("stripe_events", "licenses", "subscription_event_logs")}


async def log_of(url: str, license_id: str) -> list[tuple[int, str]]:
    engine = create_engine(Settings(database_url=url))
    try:
        async with engine.connect() as conn:
            t = subscription_event_logs
            query = sa.select(t.c.seq, t.c.status).where(t.c.license_id == license_id).order_by(t.c.seq)
            return [(row.seq, row.status) for row in await conn.execute(query)]
    finally:
        await engine.dispose()


async def test_a_signed_event_is_recorded_and_appended_with_the_next_seq(db_url: str) -> None:
    license_id = new_license()
    sample = SampleEvents(license_id)
    async with serving(create_app(make_settings(db_url))) as url, httpx.AsyncClient() as client:
        first = await post_event(client, url, sample.checkout_completed(int(time.time())))
        second = await post_event(
            client, url, sample.subscription_event("customer.subscription.deleted", "canceled", int(time.time()))
        )
    assert first.status_code == 200 and first.json() == {
        "received": True,
        "outcome": "applied",
        "license_id": license_id,
        "seq": 1,
    }
    assert second.json()["seq"] == 2
    assert await log_of(db_url, license_id) == [(1, "active"), (2, "canceled")]


async def test_a_later_event_finds_the_license_through_the_subscription_it_linked(db_url: str) -> None:
    license_id = new_license()
    sample = SampleEvents(license_id)
    checkout = sample.checkout_completed(sample.tick())
    later = sample.subscription_event("customer.subscription.updated", "past_due", sample.tick())
    later["data"]["object"]["metadata"] = {}
    async with serving(create_app(make_settings(db_url))) as url, httpx.AsyncClient() as client:
        await post_event(client, url, checkout)
        response = await post_event(client, url, later)
    assert response.json()["license_id"] == license_id
    assert await log_of(db_url, license_id) == [(1, "active"), (2, "past_due")]


async def test_a_duplicate_delivery_answers_2xx_and_changes_nothing(db_url: str) -> None:
    event = SampleEvents(new_license()).checkout_completed(int(time.time()))
    async with serving(create_app(make_settings(db_url))) as url, httpx.AsyncClient() as client:
        first = await post_event(client, url, event)
        before = await rows(db_url)
        again = await post_event(client, url, event)
    assert first.json()["outcome"] == "applied"
    assert again.status_code == 200 and again.json()["outcome"] == "duplicate"
    assert await rows(db_url) == before


async def test_concurrent_deliveries_of_one_event_apply_it_once(db_url: str) -> None:
    license_id = new_license()
    event = SampleEvents(license_id).checkout_completed(int(time.time()))
    # No deadline but pytest's: SQLite takes the writers one at a time, and on a loaded machine
    # twelve of them can take longer than httpx's default 5 s (seen under mutation runs).
    async with serving(create_app(make_settings(db_url))) as url, httpx.AsyncClient(timeout=None) as client:
        responses = await asyncio.gather(*(post_event(client, url, event) for _ in range(12)))
    assert [r.status_code for r in responses] == [200] * 12
    assert sorted(r.json()["outcome"] for r in responses) == ["applied"] + ["duplicate"] * 11
    assert await log_of(db_url, license_id) == [(1, "active")]


async def test_concurrent_events_of_one_license_get_consecutive_seqs(db_url: str) -> None:
    # Ten subscriptions of one license, each event the first of its object: whatever order they
    # commit in, every one changes the license (its list of subscriptions), so every one applies.
    license_id = new_license()
    sample = SampleEvents(license_id)
    now = int(time.time())
    subscriptions = [f"sub_{license_id[4:]}{n:02d}" for n in range(10)]
    events = [sample.subscription_event("customer.subscription.created", "active", now, s) for s in subscriptions]
    async with serving(create_app(make_settings(db_url))) as url, httpx.AsyncClient(timeout=None) as client:
        responses = await asyncio.gather(*(post_event(client, url, e) for e in events))  # as above
    assert [(r.status_code, r.json()["outcome"]) for r in responses] == [(200, "applied")] * len(events)
    assert sorted(r.json()["seq"] for r in responses) == list(range(1, len(events) + 1))
    assert [seq for seq, _ in await log_of(db_url, license_id)] == list(range(1, len(events) + 1))


def rejected() -> float:
    return REGISTRY.get_sample_value("license_broker_webhooks_total", {"outcome": "rejected"}) or 0.0


async def test_bad_input_is_400_with_a_generic_answer_counted_as_rejected_and_writes_nothing(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    event = SampleEvents(new_license()).checkout_completed(int(time.time()))
    payload, headers = signed(event)
    stale_payload, stale_headers = signed(event, timestamp=int(time.time()) - 3600)
    garbage = b'{"not": "an event"'
    garbage_headers = {"stripe-signature": sign(garbage, WEBHOOK_SECRET)}
    good = headers["stripe-signature"]
    json = ("content-type", "application/json")
    sig, body = "invalid signature", "invalid payload"
    tampered = payload.replace(b'"paid"', b'"no_payment_required"')
    cases: dict[str, tuple[bytes, list[tuple[str, str | bytes]], str]] = {
        "missing signature": (payload, [json], sig),
        "forged signature": (payload, [*signed(event, secret="whsec_forged")[1].items()], sig),
        "stale timestamp": (stale_payload, [*stale_headers.items()], sig),
        "tampered body": (tampered, [*headers.items()], sig),
        # Headers arrive as latin-1: this one broke the stripe package's compare_digest (a 500).
        "non-ASCII signature": (payload, [json, ("stripe-signature", f"{good[:-2]}\xe9\xe9".encode("latin-1"))], sig),
        "UTF-8 signature": (payload, [json, ("stripe-signature", f"t=1,v1=\u00e9{good[-63:]}".encode())], sig),
        "garbage signature": (payload, [json, ("stripe-signature", "t=,v1=,=,,,t=x")], sig),
        "huge timestamp": (payload, [json, ("stripe-signature", f"t={'9' * 5000},v1=00")], sig),
        "repeated signature": (payload, [json, ("stripe-signature", good), ("stripe-signature", good)], sig),
        "malformed body": (garbage, [*garbage_headers.items()], body),
    }
    caplog.set_level(logging.INFO, logger="webhook")
    before = rejected()
    async with serving(create_app(make_settings(db_url))) as url, httpx.AsyncClient() as client:
        for name, (content, hdrs, answer) in cases.items():
            response = await client.post(f"{url}/api/stripe/webhooks", content=content, headers=hdrs)
            assert response.status_code == 400, name
            assert response.json() == {"error": answer}, name
    assert rejected() == before + len(cases)
    assert await rows(db_url) == {"stripe_events": 0, "licenses": 0, "subscription_event_logs": 0}
    # The reasons are for the operator's log.
    reasons = [r.getMessage() for r in caplog.records if r.getMessage().startswith("webhook rejected:")]
    assert len(reasons) == len(cases)
    assert any("tolerance" in r for r in reasons) and any("2 Stripe-Signature headers" in r for r in reasons)
    assert any("not printable ASCII" in r for r in reasons) and any("not JSON" in r for r in reasons)


async def test_event_types_not_used_and_unmatched_events_are_recorded_with_2xx(db_url: str) -> None:
    sample = SampleEvents(new_license())
    unused = sample.envelope("customer.created", {"id": "cus_x", "object": "customer"}, int(time.time()))
    orphan = sample.subscription_event("customer.subscription.updated", "active", int(time.time()))
    orphan["data"]["object"].update(metadata={}, id="sub_nobody", customer="cus_nobody")
    async with serving(create_app(make_settings(db_url))) as url, httpx.AsyncClient() as client:
        ignored = await post_event(client, url, unused)
        unmatched = await post_event(client, url, orphan)
    assert (ignored.status_code, ignored.json()["outcome"]) == (200, "ignored")
    # It names a customer and a subscription a later event may link: kept as pending.
    assert (unmatched.status_code, unmatched.json()["outcome"]) == (200, "pending")
    engine = create_engine(Settings(database_url=db_url))
    try:
        async with engine.connect() as conn:
            recorded = dict((await conn.execute(sa.select(stripe_events.c.id, stripe_events.c.outcome))).all())
            payload = await conn.scalar(sa.select(stripe_events.c.payload).where(stripe_events.c.id == orphan["id"]))
            assert await conn.scalar(sa.select(sa.func.count()).select_from(licenses)) == 0
    finally:
        await engine.dispose()
    assert recorded == {unused["id"]: "ignored", orphan["id"]: "pending"}
    assert orjson.loads(orjson.dumps(payload)) == orphan


async def test_an_older_event_than_the_last_change_is_recorded_as_stale_and_not_appended(db_url: str) -> None:
    license_id = new_license()
    sample = SampleEvents(license_id)
    now = int(time.time())
    async with serving(create_app(make_settings(db_url))) as url, httpx.AsyncClient() as client:
        await post_event(client, url, sample.subscription_event("customer.subscription.deleted", "canceled", now))
        late = await post_event(
            client, url, sample.subscription_event("customer.subscription.updated", "active", now - 10)
        )
    assert late.json()["outcome"] == "stale"
    assert await log_of(db_url, license_id) == [(1, "canceled")]


async def test_the_database_unreachable_answers_503_so_that_stripe_retries(unused_port: int) -> None:
    # Nothing listens on the port: the pool's first connect fails as it would in an outage.
    app = create_app(make_settings(f"postgresql+psycopg://127.0.0.1:{unused_port}/broker"))
    event = SampleEvents(new_license()).checkout_completed(int(time.time()))
    async with serving(app) as url, httpx.AsyncClient() as client:
        response = await post_event(client, url, event)
        ready = await client.get(f"{url}/readyz")
    assert response.status_code == 503
    assert response.json() == {"error": "database unavailable, retry later"}
    assert ready.status_code == 503 and ready.json()["database"] == "unavailable"


async def test_well_signed_events_with_odd_content_are_answered_2xx_and_change_nothing(db_url: str) -> None:
    license_id = new_license()
    sample = SampleEvents(license_id)
    now = int(time.time())
    long_license = sample.checkout_completed(now)
    long_license["data"]["object"]["metadata"] = {"license_id": "x" * 300}
    long_id = sample.subscription_event("customer.subscription.updated", "active", now)
    long_id["data"]["object"]["id"] = "sub_" + "y" * 400
    wrong_types = sample.invoice_event("invoice.paid", now)
    wrong_types["data"]["object"].update(customer=["cus"], created="yesterday", parent={"subscription_details": 7})
    huge_created = sample.subscription_event("customer.subscription.updated", "active", 2**62)
    async with serving(create_app(make_settings(db_url))) as url, httpx.AsyncClient() as client:
        answers = [await post_event(client, url, e) for e in (long_license, long_id, wrong_types, huge_created)]
        again = await post_event(client, url, sample.checkout_completed(now + 1))
    assert [(a.status_code, a.json()["outcome"]) for a in answers] == [
        (200, "rejected"),
        (200, "unmatched"),
        (200, "unmatched"),
        (200, "unmatched"),
    ]
    assert again.json()["outcome"] == "applied"  # the webhook keeps answering
    assert await log_of(db_url, license_id) == [(1, "active")]
