"""Postgres at scale: event log and Stripe payload retention (`license-broker prune`) and
PgBouncer-safe connections."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from broker.ingest import Ingestor
from broker.runtime import open_runtime
from broker.settings import Settings, SettingsError
from broker.storage.db import create_engine
from broker.storage.eventlog import EventLog
from broker.storage.retention import prune_event_log, prune_event_payloads
from broker.storage.schema import licenses, stripe_events, subscription_event_logs
from broker.stripe_ledger.ledger import LicenseRules
from broker.stripe_ledger.objects import EventFilter
from license_broker.rebuild import rebuild
from tests.support.licenses import append, make_settings, new_license
from tests.support.processes import run_module
from webhook.samples import SampleEvents


@pytest.fixture
async def engine(pg_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(Settings(database_url=pg_url))
    try:
        yield engine
    finally:
        await engine.dispose()


async def history(engine: AsyncEngine, license_id: str, events: int, days_old: list[float]) -> None:
    """`events` events for the license, the i-th recorded days_old[i] days ago."""
    for _ in range(events):
        await append(engine, license_id)
    t = subscription_event_logs
    async with engine.begin() as conn:
        for seq, age in enumerate(days_old, start=1):
            recorded = sa.func.now() - sa.text(f"interval '{age * 86400:f} seconds'")
            await conn.execute(
                t.update().where(t.c.license_id == license_id, t.c.seq == seq).values(recorded_at=recorded)
            )


async def seqs(engine: AsyncEngine, license_id: str) -> list[int]:
    return [event.seq for event in await EventLog(engine).read(license_id, 0)]


async def test_prune_deletes_old_rows_but_always_keeps_each_licenses_latest(engine: AsyncEngine) -> None:
    all_old, mixed, single, recent = new_license(), new_license(), new_license(), new_license()
    await history(engine, all_old, 5, [90, 80, 70, 60, 50])
    await history(engine, mixed, 4, [90, 80, 40, 1])
    await history(engine, single, 1, [365])
    await history(engine, recent, 3, [3, 2, 1])

    deleted = await prune_event_log(engine, timedelta(days=30))

    assert deleted == 4 + 3
    assert await seqs(engine, all_old) == [5]  # older than the cutoff, but the current state
    assert await seqs(engine, mixed) == [4]
    assert await seqs(engine, single) == [1]
    assert await seqs(engine, recent) == [1, 2, 3]
    current = await EventLog(engine).current(all_old)
    assert current.seq == 5
    # A client resuming from a pruned seq replays from the oldest row kept: the current state.
    assert [event.seq async for event in EventLog(engine).replay(all_old, 1)] == [5]
    assert await prune_event_log(engine, timedelta(days=30)) == 0


async def test_prune_works_in_batches_of_short_transactions(engine: AsyncEngine) -> None:
    license_id = new_license()
    await history(engine, license_id, 7, [10] * 7)
    assert await prune_event_log(engine, timedelta(days=1), batch=2) == 6
    assert await seqs(engine, license_id) == [7]


def run_cli(pg_url: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return run_module(
        "license_broker",
        "prune",
        *args,
        env={**os.environ, "DATABASE_URL": pg_url, "EVENT_LOG_RETENTION_DAYS": "", **env},
        timeout=60,
    )


async def test_prune_command_uses_the_retention_setting_and_refuses_without_one(
    engine: AsyncEngine, pg_url: str
) -> None:
    license_id = new_license()
    await history(engine, license_id, 3, [40, 20, 10])

    refused = run_cli(pg_url)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        "license-broker: EVENT_LOG_RETENTION_DAYS: required by prune (or --older-than-days)"
    ]

    done = run_cli(pg_url, EVENT_LOG_RETENTION_DAYS="30")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("pruned 1 event log rows older than 30 days")
    assert await seqs(engine, license_id) == [2, 3]

    done = run_cli(pg_url, "--older-than-days", "15", EVENT_LOG_RETENTION_DAYS="30")
    assert done.returncode == 0, done.stderr
    assert await seqs(engine, license_id) == [3]


def test_retention_setting_is_off_by_default_and_validated() -> None:
    assert Settings.from_env({}).event_log_retention_days is None
    assert Settings.from_env({"EVENT_LOG_RETENTION_DAYS": "90"}).event_log_retention_days == 90
    with pytest.raises(SettingsError, match=r"^EVENT_LOG_RETENTION_DAYS: "):
        Settings.from_env({"EVENT_LOG_RETENTION_DAYS": "-1"})


@pytest.mark.parametrize(("enabled", "prepared"), [(True, True), (False, False)])
async def test_prepared_statements_can_be_turned_off_for_pgbouncer_transaction_mode(
    pg_url: str, enabled: bool, prepared: bool
) -> None:
    assert Settings.from_env({"DATABASE_PREPARED_STATEMENTS": str(enabled).lower()}).db_prepared_statements is enabled
    engine = create_engine(Settings(database_url=pg_url, db_pool_size=1, db_prepared_statements=enabled))
    try:
        async with engine.connect() as conn:
            for _ in range(10):  # psycopg prepares a statement on its 6th execution by default
                await conn.execute(sa.select(subscription_event_logs.c.seq).where(subscription_event_logs.c.seq > 0))
            count = await conn.scalar(sa.text("SELECT count(*) FROM pg_prepared_statements"))
        assert bool(count) is prepared
    finally:
        await engine.dispose()


LISTED = "acct_1ListedAccount"


def events_that_change_no_license() -> list[dict[str, Any]]:
    """Ignored (an account not listed), rejected (a license id too long), unmatched (no object id)."""
    now = int(time.time())
    unlisted = SampleEvents(new_license()).checkout_completed(now)
    unlisted["account"] = "acct_1SomeoneElsesAccount"
    too_long = SampleEvents("lic_" + "x" * 300).checkout_completed(now)
    no_id = SampleEvents(new_license()).subscription_event("customer.subscription.updated", "active", now)
    del no_id["data"]["object"]["id"]
    return [unlisted, too_long, no_id]


async def ingest(url: str, events: list[dict[str, Any]]) -> list[str]:
    async with open_runtime(make_settings(url)) as runtime:
        rules = LicenseRules(runtime.settings.entitled_statuses)
        ingestor = Ingestor(runtime, rules, EventFilter(accounts=frozenset({LISTED})))
        return [(await ingestor.ingest(e, orjson.dumps(e))).kind for e in events]


async def received_days_ago(engine: AsyncEngine, ids: list[str], days: float) -> None:
    async with engine.begin() as conn:
        received = datetime.now(UTC) - timedelta(days=days)
        await conn.execute(stripe_events.update().where(stripe_events.c.id.in_(ids)).values(received_at=received))


async def payloads(engine: AsyncEngine) -> dict[str, Any]:
    async with engine.connect() as conn:
        return dict((await conn.execute(sa.select(stripe_events.c.id, stripe_events.c.payload))).all())


async def test_prune_drops_old_payloads_of_events_that_changed_no_license_and_keeps_every_id(
    engine: AsyncEngine, pg_url: str
) -> None:
    license_id = new_license()
    paid = SampleEvents(license_id).for_action("pay", int(time.time()))
    for event in paid:
        event["account"] = LISTED
    old, recent = events_that_change_no_license(), events_that_change_no_license()
    assert await ingest(pg_url, [*old, *recent]) == ["ignored", "rejected", "unmatched"] * 2
    assert "applied" in await ingest(pg_url, paid)
    # All of the license's events are old too: their payloads are what rebuild folds the ledger from.
    await received_days_ago(engine, [e["id"] for e in old + paid], 40)
    before = await payloads(engine)

    done = run_cli(pg_url, EVENT_LOG_RETENTION_DAYS="30")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[1].startswith("dropped the payloads of 3 Stripe events older than 30 days")

    after = await payloads(engine)
    assert after.keys() == before.keys()  # every id stays: a redelivery is still a duplicate
    assert [after[e["id"]] for e in old] == [None] * 3
    assert all(after[e["id"]] == e for e in recent + paid)
    assert await prune_event_payloads(engine, timedelta(days=30)) == 0
    assert await ingest(pg_url, old) == ["duplicate"] * 3
    # Rebuild refills the ledger from what is left and finds every license as it was.
    async with engine.connect() as conn:
        state = await conn.scalar(sa.select(licenses.c.state).where(licenses.c.id == license_id))
    assert state["entitled"] is True
    assert await rebuild(make_settings(pg_url, stripe_accounts=frozenset({LISTED}))) == []


async def test_prune_drops_payloads_in_batches_of_short_transactions(db_url: str) -> None:
    events = events_that_change_no_license()
    await ingest(db_url, events)
    engine = create_engine(Settings(database_url=db_url))
    try:
        await received_days_ago(engine, [e["id"] for e in events], 10)
        assert await prune_event_payloads(engine, timedelta(days=1), batch=2) == 3
        assert await prune_event_payloads(engine, timedelta(days=1), batch=2) == 0
        assert set((await payloads(engine)).values()) == {None}
    finally:
        await engine.dispose()
