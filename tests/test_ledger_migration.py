"""Migration 0003 fills the ledger from the events already stored; `license-broker rebuild`
derives the licenses from it, appending an event only where a license's state changes."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command

from broker.settings import Settings
from broker.storage.db import _alembic_config, create_engine, migrate
from broker.storage.schema import licenses, stripe_bindings, stripe_events, stripe_objects, subscription_event_logs
from license_broker import cli
from webhook.samples import SampleEvents

T = 1_800_000_000


def test_the_migration_fills_the_ledger_and_rebuild_derives_changed_licenses_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'old.db'}"
    asyncio.run(an_old_database_migrated(url))
    monkeypatch.setenv("DATABASE_URL", url)
    assert cli.main(["rebuild"]) == 0
    assert capsys.readouterr().out.split() == ["lic_migrated", "seq=4"]
    assert cli.main(["rebuild", "lic_migrated"]) == 0  # nothing left to change
    assert capsys.readouterr().out == ""
    state, log = asyncio.run(license_and_log(url))
    assert (state["status"], state["entitled"]) == ("active", True)
    assert log == [(4, "rebuild")]


async def license_and_log(url: str) -> tuple[dict[str, Any], list[tuple[int, str]]]:
    engine = create_engine(Settings(database_url=url))
    t = subscription_event_logs
    try:
        async with engine.connect() as conn:
            state = await conn.scalar(sa.select(licenses.c.state).where(licenses.c.id == "lic_migrated"))
            log = [tuple(r) for r in await conn.execute(sa.select(t.c.seq, t.c.stripe_event_type))]
    finally:
        await engine.dispose()
    return dict(state), log  # type: ignore[return-value]


async def an_old_database_migrated(url: str) -> None:
    engine = create_engine(Settings(database_url=url))
    sample = SampleEvents("lic_migrated")
    events = [e for i, a in enumerate(("pay", "resubscribe", "cancel")) for e in sample.for_action(a, T + 100 * i)]
    try:
        async with engine.begin() as conn:
            # A database as the single-slot model left it: events stored, a license canceled by
            # the old subscription's end although a second subscription pays for it.
            await conn.run_sync(lambda c: command.upgrade(_alembic_config(c), "0002"))
            rows = [
                {
                    "id": e["id"],
                    "type": e["type"],
                    "created": e["created"],
                    "livemode": False,
                    "outcome": "applied",
                    "payload": e,
                    "received_at": datetime.fromtimestamp(e["created"], UTC),
                }
                for e in events
            ]
            await conn.execute(stripe_events.insert(), rows)
            old = {"status": "canceled", "entitled": False}
            await conn.execute(
                licenses.insert().values(id="lic_migrated", seq=3, status="canceled", entitled=False, state=old)
            )
        await migrate(engine)
        async with engine.connect() as conn:
            objects = {
                row.id: row.kind for row in await conn.execute(sa.select(stripe_objects.c.id, stripe_objects.c.kind))
            }
            bound = set(await conn.scalars(sa.select(stripe_bindings.c.license_id).distinct()))
        assert objects[sample.subscription] == objects[sample.second_subscription] == "subscription"
        assert bound == {"lic_migrated"}

    finally:
        await engine.dispose()
