"""The binding walks (broker.stripe_ledger.binding) are written once and run on two kinds of rows:
MemoryRows (the property tests, rebuild) and SqlRows (the webhook). On the same rows, in real
Postgres, both answer every read the same; the same walk leaves the same rows on both; and the SQL
rows lock what the walk reaches before reading its binding."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
import sqlalchemy as sa
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from broker.settings import Settings
from broker.storage.db import create_engine
from broker.storage.schema import stripe_bindings, stripe_links, stripe_objects
from broker.stripe_ledger import binding
from broker.stripe_ledger.binding import Folded, MemoryLedger, MemoryRows, run, run_async
from broker.stripe_ledger.ledger import StripeObject
from broker.stripe_ledger.objects import report
from broker.stripe_ledger.store import LedgerStore, LocksBusy, SqlRows
from tests.stripe_objects import SHAPES, Shape
from tests.stripe_scenario import Scenario
from tests.support.services import truncate
from tests.test_ledger import PROPERTY_STORIES, with_line_items
from webhook.samples import SampleEvents

T = 1_800_000_000


def corpus(shape: Shape) -> list[dict[str, Any]]:
    """Every property story in one account, with a customer holding two licenses and entitlements
    (customer-level objects shared by both), and a Payment Link claim on another customer's license."""
    s = Scenario(shape)
    for build in PROPERTY_STORIES:
        build(s)
    bob = s.customer()
    s.subscribe(bob, "lic_rows_sub")
    s.buy(bob, "lic_rows_lifetime")
    s.entitlements(bob, ["feature_a", "feature_b"])
    events = with_line_items(s.take())
    sample = SampleEvents("lic_rows_taken")
    theirs = sample.checkout_completed(T + 100, "sub_theirs", "in_theirs")
    theirs["data"]["object"].update(id="cs_theirs", metadata={}, customer="cus_intruder")
    return [*events, *sample.for_action("pay", T), theirs]


CORPUS = {shape: corpus(shape) for shape in SHAPES}


def events_of(shape: Shape, rng: random.Random) -> list[dict[str, Any]]:
    """A random order of a random part of the corpus: some objects stay pending (unbound), some
    licenses are found only through links, some customer-level objects wait for their license."""
    events = [e for e in CORPUS[shape] if rng.random() < 0.8]
    rng.shuffle(events)
    return events


def same(value: Any) -> Any:
    """As JSON: what both rows hold, whatever container types the rules built."""
    return orjson.loads(orjson.dumps(value, default=sorted, option=orjson.OPT_SORT_KEYS))


def rows_of(objects: dict[str, StripeObject]) -> Any:
    return same({i: {**o.row(), "links": sorted(o.links)} for i, o in objects.items()})


@pytest.fixture
async def engine(postgres_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(Settings(database_url=postgres_url))
    try:
        yield engine
    finally:
        await engine.dispose()


def on_postgres(postgres_url: str, test: Callable[[AsyncEngine], Any]) -> None:
    """Run `test` on an emptied database (hypothesis examples cannot use function fixtures)."""
    truncate(postgres_url)

    async def main() -> None:
        engine = create_engine(Settings(database_url=postgres_url))
        try:
            await test(engine)
        finally:
            await engine.dispose()

    asyncio.run(main())


async def write_rows(conn: AsyncConnection, ledger: MemoryLedger) -> None:
    now = datetime.now(UTC)
    objects = [{**o.row(), "updated_at": now} for o in ledger.objects.values()]
    links = [{"object_id": a, "linked_id": b} for a, b in sorted(ledger.links())]
    bindings = [{"stripe_id": k, "license_id": v, "bound_at": now} for k, v in ledger.bindings.items()]
    for table, rows in ((stripe_objects, objects), (stripe_links, links), (stripe_bindings, bindings)):
        if rows:
            await conn.execute(table.insert(), rows)


async def bindings(conn: AsyncConnection) -> dict[str, str]:
    t = stripe_bindings
    return {row.stripe_id: row.license_id for row in await conn.execute(sa.select(t.c.stripe_id, t.c.license_id))}


@settings(max_examples=8, deadline=None)
@given(st.sampled_from(SHAPES), st.randoms(use_true_random=False))
def test_memory_and_sql_rows_answer_every_read_the_same_on_the_same_rows(
    postgres_url: str, shape: Shape, rng: random.Random
) -> None:
    ledger = MemoryLedger()
    for event in events_of(shape, rng):
        ledger.apply(event)
    memory = MemoryRows(ledger)
    ids = {i for o in ledger.objects.values() for i in (o.id, *o.links)} | {"sub_unknown"}
    licenses = {*ledger.bindings.values(), "lic_unknown"}
    customers = {c for o in ledger.objects.values() if (c := o.customer)} | {"cus_unknown"}
    some = [set(rng.sample(sorted(ids), k)) for k in (1, 1, 1, 2, 2, 5, len(ids) // 2)]
    assert ledger.bindings and set(ledger.bindings) != ids  # bound and pending ids both

    async def check(engine: AsyncEngine) -> None:
        async with engine.begin() as conn:
            await write_rows(conn, ledger)
        async with engine.begin() as conn:
            sql = SqlRows(conn)
            for wanted in (ids, set(), *some):
                assert await sql.bindings(wanted) == memory.bindings(wanted)
                assert await sql.neighbours(wanted) == memory.neighbours(wanted)
                assert rows_of(await sql.objects(wanted)) == rows_of(memory.objects(wanted))
            for license_id in sorted(licenses):
                assert await sql.customers_of(license_id) == memory.customers_of(license_id)
                # Links aside: derive reads none, and SqlRows leaves them out.
                derived_from = {i: replace(o, links=frozenset()) for i, o in memory.license_objects(license_id).items()}
                assert rows_of(await sql.license_objects(license_id)) == rows_of(derived_from)
            for customer in sorted(customers):
                assert await sql.licenses_of_customer(customer) == memory.licenses_of_customer(customer)

    on_postgres(postgres_url, check)


@settings(max_examples=4, deadline=None)
@given(st.sampled_from(SHAPES), st.randoms(use_true_random=False))
def test_the_walk_leaves_the_same_rows_in_memory_and_in_postgres(
    postgres_url: str, shape: Shape, rng: random.Random
) -> None:
    """The events one after the other, as the webhook's general path applies them (its locks
    included; in one transaction, which sees its own writes as the next would see them committed)."""
    events = events_of(shape, rng)
    ledger = MemoryLedger()

    async def check(engine: AsyncEngine) -> None:
        async with engine.begin() as conn:
            for event in events:
                reported = report(event)
                assert reported is not None
                in_memory: Folded | None = run(binding.apply(reported), ledger.rows)
                await LedgerStore.lock_ids(conn, reported.ids)
                in_sql = await run_async(binding.apply(reported), SqlRows(conn, wait=False))
                assert in_sql == in_memory, event["type"]
        async with engine.connect() as conn:
            held = set(await conn.scalars(sa.select(stripe_objects.c.id)))
            assert rows_of(await SqlRows(conn).objects(held)) == rows_of(ledger.objects)
            assert await bindings(conn) == ledger.bindings

    on_postgres(postgres_url, check)


async def waiting_for_a_lock(engine: AsyncEngine) -> None:
    """Until another transaction waits for an advisory lock (polled, 10 s at most)."""
    query = sa.text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")
    deadline = time.monotonic() + 10
    async with engine.connect() as conn:
        while time.monotonic() < deadline:
            if await conn.scalar(query):
                return
            await conn.rollback()
            await asyncio.sleep(0.01)
    raise AssertionError("nobody waits for the lock")


@pytest.mark.parametrize("wait", [False, True])
async def test_the_sql_rows_lock_what_the_walk_reaches_before_reading_its_binding(
    pg_url: str, engine: AsyncEngine, wait: bool
) -> None:
    """An invoice pending on a subscription that another transaction is binding right now (its
    lock held, not committed): the walk from the invoice gives up (wait=False: LocksBusy, the
    webhook starts again holding that lock from the start) or waits, and then leaves the
    subscription to the license that took it."""
    invoice = StripeObject("in_pending", "invoice", T, 4, {"status": "paid"}, "cus_x", frozenset({"sub_taken"}))
    async with engine.begin() as conn:
        await LedgerStore.save(conn, invoice, new_links=invoice.links)
    async with engine.connect() as holder:
        await holder.begin()
        await LedgerStore.lock_ids(holder, ["sub_taken"])
        await LedgerStore.write_bindings(holder, "lic_first", ["sub_taken"])

        async def walk() -> set[str]:
            async with engine.begin() as conn:
                return await LedgerStore.bind(conn, "lic_second", ["in_pending"], {}, wait=wait)

        if not wait:
            with pytest.raises(LocksBusy):
                await walk()
            await holder.commit()
            return
        walking = asyncio.create_task(walk())
        await waiting_for_a_lock(engine)
        assert not walking.done()
        await holder.commit()
        assert await asyncio.wait_for(walking, 10) == {"in_pending"}
    async with engine.connect() as conn:
        assert await bindings(conn) == {"sub_taken": "lic_first", "in_pending": "lic_second"}
