"""What is kept of a Stripe event: every id, so that a redelivery is a duplicate; its payload only
where something may read it again (rebuild, an operator), never for a type no rule reads."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
import sqlalchemy as sa

from broker.ingest import Ingestor
from broker.runtime import Runtime, open_runtime
from broker.storage.schema import stripe_events
from broker.stripe_ledger.ledger import LicenseRules
from broker.stripe_ledger.objects import EventFilter
from license_broker import cli
from tests.support.licenses import make_settings, new_license, post_event
from tests.support.processes import serving
from tests.support.services import psycopg_connect, truncate
from webhook.app import create_app as create_webhook_app
from webhook.samples import SampleEvents

LISTED = "acct_1ListedAccount"


def customer_created(sample: SampleEvents, size: int) -> dict[str, Any]:
    """A customer as Stripe reports one, with `size` bytes of personal data that do not compress."""
    customer = {
        "id": "cus_" + secrets.token_hex(7),
        "object": "customer",
        "name": "Ada Lovelace",
        "email": "ada@example.com",
        "address": {"line1": "12 St James's Square", "city": "London", "country": "GB"},
        "metadata": {"notes": secrets.token_hex(size // 2)},
    }
    return sample.envelope("customer.created", customer, int(time.time()))


def stripe_events_bytes(url: str) -> int:
    with psycopg_connect(url) as conn:
        row = conn.execute("SELECT pg_total_relation_size('stripe_events')").fetchone()
    assert row is not None
    return int(row[0])


async def stored(url: str) -> dict[str, tuple[str, Any]]:
    """id -> (outcome, payload as stored: None for JSON null)."""
    async with open_runtime(make_settings(url)) as runtime, runtime.engine.connect() as conn:
        rows = await conn.execute(sa.select(stripe_events.c.id, stripe_events.c.outcome, stripe_events.c.payload))
        return {r.id: (r.outcome, r.payload) for r in rows}


async def test_fifty_customer_created_events_are_recorded_by_id_without_their_payloads(pg_url: str) -> None:
    sample = SampleEvents(new_license())
    events = [customer_created(sample, 200_000) for _ in range(50)]  # 10 MB, as in the review
    before = stripe_events_bytes(pg_url)
    async with serving(create_webhook_app(make_settings(pg_url))) as url, httpx.AsyncClient() as client:
        for event in events:
            answer = await post_event(client, url, event)
            assert (answer.status_code, answer.json()["outcome"]) == (200, "ignored")
        # The id is what idempotency needs: a redelivery is still recognised.
        again = await post_event(client, url, events[0])
        assert (again.status_code, again.json()["outcome"]) == (200, "duplicate")
    grown = stripe_events_bytes(pg_url) - before
    assert grown < 1_000_000, f"stripe_events grew {grown} bytes for 50 events it does not use"
    rows = await stored(pg_url)
    assert {rows[e["id"]] for e in events} == {("ignored", None)}


@pytest.fixture
async def runtime(pg_url: str) -> AsyncIterator[Runtime]:
    async with open_runtime(make_settings(pg_url)) as rt:
        yield rt


def mixed_story() -> tuple[list[dict[str, Any]], dict[str, tuple[str, bool]]]:
    """Events of every outcome that changes no license, and a paid license; for each, its outcome
    and whether its payload is kept."""
    sample, other = SampleEvents(new_license()), SampleEvents(new_license())
    now = int(time.time())
    unused = customer_created(sample, 2_000)
    unlisted = other.checkout_completed(now)
    unlisted["account"] = "acct_1SomeoneElsesAccount"
    too_long = SampleEvents("lic_" + "x" * 300).checkout_completed(now)
    no_id = sample.subscription_event("customer.subscription.updated", "active", now)
    del no_id["data"]["object"]["id"]
    paid = sample.for_action("pay", now)
    for event in paid:
        event["account"] = LISTED
    expected = {
        unused["id"]: ("ignored", False),
        # The setting may be fixed (STRIPE_ACCOUNTS), then `rebuild` applies it: kept until pruned.
        unlisted["id"]: ("ignored", True),
        too_long["id"]: ("rejected", True),
        no_id["id"]: ("unmatched", True),
    }
    return [unused, unlisted, too_long, no_id, *paid], expected


async def test_both_ingest_paths_keep_the_same_payloads_and_drop_only_those_of_types_not_used(
    runtime: Runtime, pg_url: str
) -> None:
    events, expected = mixed_story()
    rules = LicenseRules(runtime.settings.entitled_statuses)
    accounts = EventFilter(accounts=frozenset({LISTED}))
    fast = Ingestor(runtime, rules, accounts, batching=True)
    general = Ingestor(runtime, rules, accounts, batching=False)
    by_path = {}
    for name, ingestor in (("general", general), ("fast", fast)):
        truncate(pg_url)
        outcomes = [(await ingestor.ingest(e, orjson.dumps(e))).kind for e in events]
        assert outcomes[:4] == ["ignored", "ignored", "rejected", "unmatched"], name
        by_path[name] = await stored(pg_url)
    assert by_path["fast"] == by_path["general"]
    rows = by_path["fast"]
    assert "applied" in {outcome for outcome, _ in rows.values()}
    for event in events:
        outcome, payload = rows[event["id"]]
        # What the ledger was folded from (rebuild reads it again) keeps its payload too.
        assert (outcome, payload is not None) == expected.get(event["id"], (outcome, True)), event["type"]
        assert payload is None or payload == event  # a kept payload is the body as sent


def test_unmatched_shows_an_event_whose_payload_was_not_kept_by_what_its_row_recorded(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    event = customer_created(SampleEvents(new_license()), 1_000)

    async def deliver() -> str:
        async with open_runtime(make_settings(sqlite_url)) as runtime:
            ingestor = Ingestor(runtime, LicenseRules(runtime.settings.entitled_statuses))
            return (await ingestor.ingest(event, orjson.dumps(event))).kind

    assert asyncio.run(deliver()) == "ignored"
    assert asyncio.run(stored(sqlite_url)) == {event["id"]: ("ignored", None)}
    monkeypatch.setenv("DATABASE_URL", sqlite_url)
    assert cli.main(["unmatched", "--json"]) == 0
    [line] = capsys.readouterr().out.splitlines()
    assert orjson.loads(line) == {
        "id": event["id"],
        "type": "customer.created",
        "created": event["created"],
        "payload": "not kept",
    }
