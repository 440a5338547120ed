"""Postgres at scale: event log and Stripe payload retention (`license-broker prune`) and
PgBouncer-safe connections; the event log's own reads (bounded, in order, in batches) and the
move of a license to its next state."""

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
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from broker.ingest import Ingestor
from broker.runtime import open_runtime
from broker.settings import Settings, SettingsError
from broker.storage.db import create_engine
from broker.storage.eventlog import EventLog, log_entry
from broker.storage.licenses import LicenseState, LicenseStore, initial_state
from broker.storage.retention import prune_event_log, prune_event_payloads
from broker.storage.schema import licenses, stripe_events, subscription_event_logs
from broker.stripe_ledger.ledger import LicenseRules
from broker.stripe_ledger.objects import EventFilter
from license_broker.rebuild import rebuild
from tests.support.eventlogs import ReadCountingEventLog
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


# --- the event log's reads and writes ------------------------------------------------------------


async def logged(engine: AsyncEngine, license_id: str, count: int) -> None:
    """`count` events of the license in the log (seq 1 to count), in one statement."""
    at = datetime.now(UTC)
    rows = [
        log_entry(license_id, seq, initial_state(), stripe_event_id=None, stripe_event_type="test",
                  occurred_at=at, recorded_at=at)[0]
        for seq in range(1, count + 1)
    ]  # fmt: skip
    async with engine.begin() as conn:
        await conn.execute(subscription_event_logs.insert(), rows)


async def test_the_event_log_reads_at_most_500_events_and_replays_a_backlog_in_batches(engine: AsyncEngine) -> None:
    """`read` returns at most its limit (500 by default); `replay` reads batch after batch from
    where the last one ended, until a batch comes back short."""
    big, small = new_license(), new_license()
    await logged(engine, big, 501)
    await logged(engine, small, 5)
    log = ReadCountingEventLog(engine)
    assert [e.seq for e in await EventLog(engine).read(big, 0)] == list(range(1, 501))  # the default limit
    current, never, [last] = await log.current(big), new_license(), await EventLog(engine).read(big, 500)
    assert (current.license_id, current.seq, current.data) == (big, 501, last.data)
    assert ((await log.current(never)).license_id, (await log.current(never)).seq) == (never, 0)
    assert [e.seq async for e in log.replay(big, 0)] == list(range(1, 502))
    assert log.reads == [500, 1]
    log.reads.clear()
    assert [(e.license_id, e.seq) async for e in log.replay(small, 0, batch=2)] == [(small, s) for s in range(1, 6)]
    assert log.reads == [2, 2, 1]


async def test_the_sweeps_read_of_many_licenses_is_in_license_then_seq_order_and_bounded(engine: AsyncEngine) -> None:
    """`read_many`: the events after each license's position, ordered by license then seq, at most
    `limit` (1000 by default): the sweep reads the rest from the positions it reached."""
    a, b = sorted([new_license(), new_license()])
    await logged(engine, b, 3)
    await logged(engine, a, 1001)
    log = EventLog(engine)
    expected = [(a, seq) for seq in range(3, 1002)] + [(b, 2), (b, 3)]
    assert [(e.license_id, e.seq) for e in await log.read_many({b: 1, a: 2}, limit=2000)] == expected
    assert [(e.license_id, e.seq) for e in await log.read_many({b: 1, a: 999}, limit=3)] == expected[-4:-1]
    assert len(await log.read_many({b: 0, a: 0})) == 1000


async def test_advance_moves_the_locked_license_to_its_next_seq_and_logs_it_once(engine: AsyncEngine) -> None:
    """`EventLog.advance` (a trial's end): the license row takes the new state, the next seq and
    the state's Stripe ids; the log gets the event with what caused it; the state it already
    holds writes nothing."""
    license_id = new_license()
    at = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    active: LicenseState = {**initial_state(), "status": "active", "entitled": True, "customer": "cus_1",
                            "subscription": "sub_1"}  # fmt: skip
    ended: LicenseState = {**active, "status": "canceled", "entitled": False}
    async with engine.begin() as conn:
        row = await LicenseStore.lock(conn, license_id)
        first = await EventLog.advance(
            conn, row, active, stripe_event_id="evt_1", stripe_event_type="trial.started", occurred_at=at
        )
        again = await EventLog.advance(
            conn, row, active, stripe_event_id="evt_2", stripe_event_type="trial.started", occurred_at=at
        )
        second = await EventLog.advance(
            conn, row, ended, stripe_event_id=None, stripe_event_type="trial.ended", occurred_at=at
        )
    assert again is None
    assert first is not None and second is not None
    assert [(first.license_id, first.seq), (second.license_id, second.seq)] == [(license_id, 1), (license_id, 2)]
    async with engine.connect() as conn:
        stored = (await conn.execute(sa.select(licenses).where(licenses.c.id == license_id))).mappings().one()
    assert (stored["seq"], stored["status"], stored["entitled"], stored["state"]) == (2, "canceled", False, ended)
    assert (stored["stripe_customer_id"], stored["stripe_subscription_id"]) == ("cus_1", "sub_1")
    read = await EventLog(engine).read(license_id, 0)
    assert [(e.license_id, e.seq, e.data) for e in read] == [(e.license_id, e.seq, e.data) for e in (first, second)]
    fields = [(e.fields()["stripe_event_id"], e.fields()["stripe_event_type"], e.fields()["occurred_at"],
               e.fields()["state"]) for e in (first, second)]  # fmt: skip
    assert fields == [("evt_1", "trial.started", at.isoformat(), active), (None, "trial.ended", at.isoformat(), ended)]
    # Recorded in UTC, with its offset: the delivery lag is measured from it in any process's time zone.
    assert all(datetime.fromisoformat(e.fields()["recorded_at"] or "").utcoffset() == timedelta(0) for e in read)


async def test_the_event_log_orders_a_read_by_seq_whatever_order_the_rows_lie_in(pg_url: str) -> None:
    """Rows written newest first and read with Postgres's index scans off (a plan that returns
    rows as they lie in the table): `read` still returns them in seq order."""
    engine = create_async_engine(
        pg_url, connect_args={"options": "-c enable_indexscan=off -c enable_bitmapscan=off -c enable_indexonlyscan=off"}
    )
    license_id = new_license()
    at = datetime.now(UTC)
    try:
        async with engine.begin() as conn:
            for seq in (3, 2, 1):
                row, _ = log_entry(license_id, seq, initial_state(), stripe_event_id=None, stripe_event_type="test",
                                   occurred_at=at, recorded_at=at)  # fmt: skip
                await conn.execute(subscription_event_logs.insert().values(**row))
        log = EventLog(engine)
        assert [e.seq for e in await log.read(license_id, 0)] == [1, 2, 3]
        assert [e.seq for e in await log.read(license_id, 0, limit=2)] == [1, 2]
    finally:
        await engine.dispose()


async def test_the_current_seqs_of_many_licenses_take_one_query_per_thousand(engine: AsyncEngine) -> None:
    """`latest_seqs` (the sweep's follow): the seq of each license that exists, none for one that
    does not, one statement per thousand licenses asked about."""
    a, b = new_license(), new_license()
    for _ in range(3):
        await append(engine, a)
    await append(engine, b)
    statements: list[str] = []

    def noted(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().startswith("SELECT") and "FROM licenses" in statement:
            statements.append(statement)

    sa.event.listen(engine.sync_engine, "before_cursor_execute", noted)
    log = EventLog(engine)
    assert await log.latest_seqs([a, new_license(), b]) == {a: 3, b: 1}
    assert len(statements) == 1
    assert await log.latest_seqs([*(new_license() for _ in range(2499)), b]) == {b: 1}
    assert len(statements) == 1 + 3
