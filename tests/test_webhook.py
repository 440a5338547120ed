"""POST /api/stripe/webhooks against a real database (Postgres and the embedded SQLite)."""

from __future__ import annotations

import asyncio
import time

import httpx
import orjson
import sqlalchemy as sa

from broker.db import create_engine
from broker.schema import licenses, stripe_events, subscription_event_logs
from broker.settings import Settings
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
    async with serving(create_app(make_settings(db_url))) as url, httpx.AsyncClient() as client:
        responses = await asyncio.gather(*(post_event(client, url, event) for _ in range(12)))
    assert [r.status_code for r in responses] == [200] * 12
    assert sorted(r.json()["outcome"] for r in responses) == ["applied"] + ["duplicate"] * 11
    assert await log_of(db_url, license_id) == [(1, "active")]


async def test_concurrent_events_of_one_license_get_consecutive_seqs(db_url: str) -> None:
    license_id = new_license()
    sample = SampleEvents(license_id)
    now = int(time.time())
    statuses = ["active", "past_due"] * 5
    events = [sample.subscription_event("customer.subscription.updated", s, now) for s in statuses]
    async with serving(create_app(make_settings(db_url))) as url, httpx.AsyncClient() as client:
        responses = await asyncio.gather(*(post_event(client, url, e) for e in events))
    assert all(r.status_code == 200 for r in responses)
    seqs = [seq for seq, _ in await log_of(db_url, license_id)]
    assert seqs == list(range(1, len(seqs) + 1))


async def test_bad_input_is_400_and_writes_nothing(db_url: str) -> None:
    event = SampleEvents(new_license()).checkout_completed(int(time.time()))
    payload, headers = signed(event)
    stale_payload, stale_headers = signed(event, timestamp=int(time.time()) - 3600)
    garbage = b'{"not": "an event"'
    garbage_headers = {"stripe-signature": sign(garbage, WEBHOOK_SECRET)}
    cases = {
        "missing signature": (payload, {"content-type": "application/json"}),
        "forged signature": (payload, signed(event, secret="whsec_forged")[1]),
        "stale timestamp": (stale_payload, stale_headers),
        "tampered body": (payload.replace(b'"paid"', b'"no_payment_required"'), headers),
        "malformed body": (garbage, garbage_headers),
    }
    async with serving(create_app(make_settings(db_url))) as url, httpx.AsyncClient() as client:
        for name, (body, hdrs) in cases.items():
            response = await client.post(f"{url}/api/stripe/webhooks", content=body, headers=hdrs)
            assert response.status_code == 400, name
            assert "error" in response.json(), name
    assert await rows(db_url) == {"stripe_events": 0, "licenses": 0, "subscription_event_logs": 0}


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
