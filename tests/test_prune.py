"""Postgres at scale: event log retention (`license-broker prune`) and PgBouncer-safe connections."""

from __future__ import annotations

import os
import subprocess
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from broker.db import create_engine
from broker.eventlog import EventLog
from broker.retention import prune_event_log
from broker.schema import subscription_event_logs
from broker.settings import Settings, SettingsError
from tests.support.licenses import append, new_license
from tests.support.processes import run_module


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
