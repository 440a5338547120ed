"""The common ingest path on Postgres (webhook.fast_ingest) against the general one: same rows,
same outcomes, the raw body stored as sent, and concurrent events of one license without a gap."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
import sqlalchemy as sa

from broker.binding import MemoryLedger
from broker.ledger import LicenseRules
from broker.runtime import Runtime, open_runtime
from broker.schema import licenses, stripe_events, stripe_objects, subscription_event_logs
from tests.support.licenses import make_settings
from tests.support.services import truncate
from webhook import fast_ingest
from webhook.ingest import Ingestor, Outcome
from webhook.samples import SampleEvents

T = 1_790_000_000


@pytest.fixture
async def runtime(pg_url: str) -> AsyncIterator[Runtime]:
    async with open_runtime(make_settings(pg_url)) as rt:
        yield rt


@pytest.fixture
def fast_results(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """One entry per fast-path attempt: True when it decided the event, False when it gave up."""
    seen: list[bool] = []
    apply = fast_ingest.FastIngest.apply

    async def counted(self: fast_ingest.FastIngest, *args: Any) -> fast_ingest.Result | None:
        result = await apply(self, *args)
        seen.append(result is not None)
        return result

    monkeypatch.setattr(fast_ingest.FastIngest, "apply", counted)
    return seen


def story(license_id: str) -> list[dict[str, Any]]:
    """Checkout, a failed renewal, recovery, a second subscription, a refund and cancellation, with one delivery
    out of order and one repeated."""
    sample = SampleEvents(license_id)
    events = [
        e
        for i, a in enumerate(("pay", "fail", "recover", "resubscribe", "refund_old"))
        for e in sample.for_action(a, T + 100 * i)
    ]
    old = sample.subscription_event("customer.subscription.updated", "active", T + 150, latest=1)
    events += [old, events[-1], *sample.for_action("cancel", T + 600)]
    return events


async def ingest_all(ingestor: Ingestor, events: list[dict[str, Any]]) -> list[Outcome]:
    return [await ingestor.ingest(e, orjson.dumps(e)) for e in events]


async def rows(runtime: Runtime) -> dict[str, Any]:
    """Every row the ingest writes, but for the times it was written at."""
    t = subscription_event_logs
    async with runtime.engine.connect() as conn:
        lics = (await conn.execute(sa.select(licenses.c.id, licenses.c.seq, licenses.c.status, licenses.c.state))).all()
        log = (await conn.execute(sa.select(t.c.license_id, t.c.seq, t.c.status, t.c.data))).all()
        objects = (
            await conn.execute(sa.select(stripe_objects.c.id, stripe_objects.c.version, stripe_objects.c.state))
        ).all()
        events = (
            await conn.execute(sa.select(stripe_events.c.id, stripe_events.c.outcome, stripe_events.c.license_id))
        ).all()
        others = {
            name: sorted(tuple(r) for r in await conn.execute(sa.text(f"SELECT * FROM {name}")))
            for name in ("stripe_links",)
        }
        bindings = sorted(
            tuple(r) for r in await conn.execute(sa.text("SELECT stripe_id, license_id FROM stripe_bindings"))
        )
    entries = []
    for row in sorted(log, key=lambda r: (r.license_id, r.seq)):
        entry = orjson.loads(row.data)
        del entry["recorded_at"]
        entries.append((row.license_id, row.seq, row.status, entry))
    return {
        "licenses": sorted((r.id, r.seq, r.status, orjson.dumps(r.state)) for r in lics),
        "log": entries,
        "objects": sorted((r.id, r.version, orjson.dumps(dict(r.state), option=orjson.OPT_SORT_KEYS)) for r in objects),
        "events": sorted(tuple(r) for r in events),
        "bindings": bindings,
        **others,
    }


async def test_the_fast_path_leaves_the_rows_and_outcomes_of_the_general_path(
    runtime: Runtime, fast_results: list[bool], pg_url: str
) -> None:
    rules = LicenseRules(runtime.settings.entitled_statuses)
    fast, general = Ingestor(runtime, rules), Ingestor(runtime, rules)
    general._fast = None
    events = story("lic_same")
    by_general = await ingest_all(general, events)
    general_rows = await rows(runtime)
    truncate(pg_url)
    by_fast = await ingest_all(fast, events)

    assert True in fast_results  # the common path was taken ...
    assert False in fast_results  # ... and the first events of the license were not
    assert {"applied", "stale", "duplicate"} <= {o.kind for o in by_fast}
    assert [(o.kind, o.license_id, o.event.seq if o.event else None) for o in by_fast] == [
        (o.kind, o.license_id, o.event.seq if o.event else None) for o in by_general
    ]
    assert await rows(runtime) == general_rows


async def test_the_recorded_payload_is_the_body_as_stripe_sent_it(runtime: Runtime, fast_results: list[bool]) -> None:
    ingestor = Ingestor(runtime, LicenseRules(runtime.settings.entitled_statuses))
    events = story("lic_raw")[:4]
    # Stripe's own formatting (indented, its key order): stored byte for byte, never re-encoded.
    bodies = [orjson.dumps(e, option=orjson.OPT_INDENT_2) for e in events]
    for event, body in zip(events, bodies, strict=True):
        await ingestor.ingest(event, body)
    async with runtime.engine.connect() as conn:
        t = stripe_events
        stored = dict((await conn.execute(sa.select(t.c.id, sa.cast(t.c.payload, sa.Text)))).all())
    assert True in fast_results
    assert [stored[e["id"]].encode() for e in events] == bodies


async def test_concurrent_events_of_one_license_take_every_seq_once_and_end_in_the_same_state(
    runtime: Runtime, fast_results: list[bool]
) -> None:
    rules = LicenseRules(runtime.settings.entitled_statuses)
    ingestor = Ingestor(runtime, rules)
    sample = SampleEvents("lic_race")
    paid = await ingest_all(ingestor, sample.for_action("pay", T))
    before = max(o.event.seq for o in paid if o.event)
    # Subscription, invoice and charge events of one license at once: different objects, so
    # different id locks; the license row lock orders their log entries.
    burst = [
        e
        for i in range(1, 6)
        for e in (
            sample.subscription_event("customer.subscription.updated", ("past_due", "active")[i % 2], T + 10 * i),
            *sample.for_action(("fail", "recover")[i % 2], T + 10 * i + 5),
        )
    ]
    outcomes = await asyncio.gather(*(ingestor.ingest(e, orjson.dumps(e)) for e in burst))
    async with runtime.engine.connect() as conn:
        t = subscription_event_logs
        seqs = sorted((await conn.scalars(sa.select(t.c.seq).where(t.c.license_id == "lic_race"))).all())
        state = (await conn.execute(sa.select(licenses.c.state).where(licenses.c.id == "lic_race"))).scalar_one()
    assert True in fast_results
    assert seqs == list(range(1, len(seqs) + 1))
    assert sorted(o.event.seq for o in outcomes if o.event) == seqs[before:]
    # Whatever order they committed in, the license is the fold of all its events (broker.binding).
    ledger = MemoryLedger()
    for event in [*sample.for_action("pay", T), *burst]:
        ledger.apply(event)
    assert state == rules.derive(ledger.objects_of("lic_race"))
