"""The batched ingest path on Postgres (broker.ingest.batched) against the general one: same rows,
same outcomes, the raw body stored as sent, and concurrent events of one license without a gap; and
the general path's own reads and locks (broker.ingest.general._Reader), a second session holding ids."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
from collections.abc import AsyncIterator
from typing import Any

import orjson
import psycopg
import pytest
import sqlalchemy as sa
from prometheus_client import REGISTRY

from broker.ingest import Ingestor, Outcome, OutcomeKind, general, unmatched_events
from broker.ingest import batched as fast_ingest
from broker.ingest.decide import Delivery, Need, Snapshot, Wants
from broker.runtime import Runtime, open_runtime
from broker.storage.licenses import initial_state
from broker.storage.schema import licenses, stripe_bindings, stripe_events, subscription_event_logs
from broker.stripe_ledger.binding import MemoryLedger
from broker.stripe_ledger.ledger import LicenseRules, StripeObject
from broker.stripe_ledger.objects import Reported
from broker.stripe_ledger.refresh import NoRefresh
from broker.stripe_ledger.store import LocksBusy
from tests.stripe_objects import SHAPES, Shape
from tests.stripe_scenario import Scenario
from tests.support import racing
from tests.support.licenses import make_settings
from tests.support.rows import every_row
from tests.support.services import psycopg_connect, truncate
from tests.support.waiting import async_wait_until
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
    apply = fast_ingest.BatchedIngest.apply

    async def counted(self: fast_ingest.BatchedIngest, *args: Any) -> Outcome | None:
        result = await apply(self, *args)
        seen.append(result is not None)
        return result

    monkeypatch.setattr(fast_ingest.BatchedIngest, "apply", counted)
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


def both_paths(runtime: Runtime) -> tuple[Ingestor, Ingestor]:
    """An ingestor with the common path, and one with only the general path."""
    rules = LicenseRules(runtime.settings.entitled_statuses)
    fast, general = Ingestor(runtime, rules, batching=True), Ingestor(runtime, rules, batching=False)
    return fast, general


async def ingest_all(ingestor: Ingestor, events: list[dict[str, Any]]) -> list[Outcome]:
    return [await ingestor.ingest(e, orjson.dumps(e)) for e in events]


async def rows(runtime: Runtime) -> dict[str, Any]:
    """Every row the ingest writes, every column but the times it was written at
    (tests/support/rows.py)."""
    return await every_row(runtime.settings.database_url)


async def one_at_a_time_through_both(
    runtime: Runtime, pg_url: str, events: list[dict[str, Any]]
) -> tuple[list[Outcome], dict[str, Any], list[Outcome]]:
    """`events` one at a time through the general path, then, on emptied tables, through the
    common one: (the general path's outcomes, the rows it left, the common path's outcomes); the
    common path's rows are the tables as the call leaves them."""
    fast, general = both_paths(runtime)
    by_general = await ingest_all(general, events)
    general_rows = await rows(runtime)
    truncate(pg_url)
    return by_general, general_rows, await ingest_all(fast, events)


async def test_the_fast_path_leaves_the_rows_and_outcomes_of_the_general_path(
    runtime: Runtime, fast_results: list[bool], pg_url: str
) -> None:
    events = story("lic_same")
    by_general, general_rows, by_fast = await one_at_a_time_through_both(runtime, pg_url, events)

    assert True in fast_results  # the common path was taken ...
    assert False in fast_results  # ... and the first events of the license were not
    assert {"applied", "stale", "duplicate"} <= {o.kind for o in by_fast}
    assert [(o.kind, o.license_id, o.event.seq if o.event else None) for o in by_fast] == [
        (o.kind, o.license_id, o.event.seq if o.event else None) for o in by_general
    ]
    assert await rows(runtime) == general_rows


@pytest.mark.parametrize("shape", SHAPES)
async def test_both_paths_leave_the_same_rows_for_the_rules_newer_objects(
    runtime: Runtime, fast_results: list[bool], pg_url: str, shape: Shape
) -> None:
    """Payment-intent purchases, proration invoices, 3-D Secure notices (two objects of one event),
    emailed invoices, late and prevented disputes, more than 10 entitlements: the same rows either way."""
    s = Scenario(shape)
    alice, bob = s.customer(), s.customer()
    sub = s.subscribe(alice, "lic_newer")
    sub.change_quantity(2, proration_amount=1500).payment.refund()  # type: ignore[union-attr]
    sub.renewal_needs_action().pay()
    s.entitlements(alice, [f"feature_{n}" for n in range(12)])
    sub.latest_invoice.payment.dispute("prevented", case_type="block")  # type: ignore[union-attr]
    sub.invoices[0].payment.dispute("needs_response")  # type: ignore[union-attr]
    payment = s.buy_with_payment_intent(bob, "lic_newer_intent", amount=12000).payment
    payment.refund(9000)
    payment.refund(3000, same_second=True)
    s.subscribe_by_invoice(bob, "lic_newer_emailed").send_renewal_invoice().fail()
    events = s.take()
    by_general, general_rows, by_fast = await one_at_a_time_through_both(runtime, pg_url, events)
    assert True in fast_results
    assert [(o.kind, o.license_id) for o in by_fast] == [(o.kind, o.license_id) for o in by_general]
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
    # Whatever order they committed in, the license is the fold of all its events (broker.stripe_ledger.binding).
    ledger = MemoryLedger()
    for event in [*sample.for_action("pay", T), *burst]:
        ledger.apply(event)
    assert state == rules.derive(ledger.objects_of("lic_race"))


@pytest.fixture
def batches(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of events of each transaction the common path ran."""
    sizes: list[int] = []
    transaction = fast_ingest.BatchedIngest._transaction

    async def counted(self: fast_ingest.BatchedIngest, batch: list[Any]) -> Any:
        sizes.append(len(batch))
        return await transaction(self, batch)

    monkeypatch.setattr(fast_ingest.BatchedIngest, "_transaction", counted)
    return sizes


async def test_a_new_license_and_its_subscription_are_bound_in_the_common_path(
    runtime: Runtime, fast_results: list[bool], pg_url: str
) -> None:
    sample = SampleEvents("lic_new")
    events = [
        sample.subscription_event("customer.subscription.updated", s, T + i) for i, s in enumerate(("active",) * 2)
    ]
    by_general, general_rows, by_fast = await one_at_a_time_through_both(runtime, pg_url, events)

    assert fast_results == [True, True]
    assert [(o.kind, o.license_id) for o in by_fast] == [(o.kind, o.license_id) for o in by_general]
    assert by_fast[0].kind == "applied" and by_fast[0].license_id == "lic_new"
    assert await rows(runtime) == general_rows


async def test_events_arriving_together_share_a_transaction_and_end_as_one_at_a_time(
    runtime: Runtime, batches: list[int], pg_url: str
) -> None:
    fast, general = both_paths(runtime)
    ids = [f"lic_batch_{i}" for i in range(12)]
    samples = {lid: SampleEvents(lid) for lid in ids}
    # Each license's first event (a new binding), then two updates each, and repeated deliveries.
    first = [samples[lid].subscription_event("customer.subscription.updated", "active", T) for lid in ids]
    updates = [
        samples[lid].subscription_event("customer.subscription.updated", status, T + n)
        for n, status in ((1, "past_due"), (2, "active"))
        for lid in ids
    ]
    events = [*first, *updates, first[0], updates[-1]]
    by_general = await ingest_all(general, events)
    general_rows = await rows(runtime)
    truncate(pg_url)
    metric = "license_broker_ingest_batch_events"
    before = [REGISTRY.get_sample_value(f"{metric}_{x}") or 0 for x in ("count", "sum")]
    # Each license's events in order, licenses at once: one wave per step.
    by_fast = [o for wave in (first, updates[:12], updates[12:], [first[0], updates[-1]])
               for o in await asyncio.gather(*(fast.ingest(e, orjson.dumps(e)) for e in wave))]  # fmt: skip

    assert max(batches) > 1  # some transactions held several events ...
    after = [REGISTRY.get_sample_value(f"{metric}_{x}") or 0 for x in ("count", "sum")]
    assert [a - b for a, b in zip(after, before, strict=True)] == [len(batches), sum(batches)]  # (exported)
    assert [(o.kind, o.license_id, o.event.seq if o.event else None) for o in by_fast] == [
        (o.kind, o.license_id, o.event.seq if o.event else None) for o in by_general
    ]  # ... and each ended as it does alone
    assert await rows(runtime) == general_rows


async def test_an_event_the_database_refuses_does_not_take_its_batch_with_it(
    runtime: Runtime, batches: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    ingestor = Ingestor(runtime, LicenseRules(runtime.settings.entitled_statuses))
    ids = [f"lic_poison_{i}" for i in range(8)]
    events = [SampleEvents(lid).subscription_event("customer.subscription.updated", "active", T) for lid in ids]
    poisoned = events[3]["id"]
    params = fast_ingest.params

    def with_poison(writes: Any) -> dict[str, Any]:
        p = params(writes)
        # A value the database refuses (bigint out of range), carried by one event only.
        rows = orjson.loads(p["events"])
        p["events"] = orjson.dumps([{**r, "created": 2**63} if r["id"] == poisoned else r for r in rows]).decode()
        return p

    monkeypatch.setattr(fast_ingest, "params", with_poison)
    outcomes = await asyncio.gather(*(ingestor.ingest(e, orjson.dumps(e)) for e in events))

    assert max(batches) > 1
    kinds = {e["id"]: o.kind for e, o in zip(events, outcomes, strict=True)}
    assert kinds.pop(poisoned) == "unmatched"
    assert set(kinds.values()) == {"applied"}
    async with runtime.engine.connect() as conn:
        t = stripe_events
        recorded = dict((await conn.execute(sa.select(t.c.id, t.c.outcome))).all())
        seqs = dict((await conn.execute(sa.select(licenses.c.id, licenses.c.seq))).all())
    assert recorded == {e["id"]: ("unmatched" if e["id"] == poisoned else "applied") for e in events}
    assert seqs == {lid: 1 for lid in ids if lid != "lic_poison_3"}


async def test_two_processes_starting_one_license_at_once_both_count(runtime: Runtime, pg_url: str) -> None:
    """Two customers' subscriptions name one new license (metadata set by the seller's server),
    decided at the same moment by two webhook processes: different ids, so different id locks, and
    no license row to lock yet. One creates the row; the other's insert finds it, its transaction is
    rolled back and the general path decides it on the row as written: both count, no gap."""
    rules = LicenseRules(runtime.settings.entitled_statuses)
    a = SampleEvents("lic_shared").subscription_event("customer.subscription.updated", "active", T)
    b = SampleEvents("lic_elsewhere").subscription_event("customer.subscription.updated", "trialing", T)
    b["data"]["object"]["metadata"]["license_id"] = "lic_shared"
    # Two interpreters, each with its own engine and pool; both read before either writes.
    spawn = multiprocessing.get_context("spawn")
    both_read, results = spawn.Barrier(2), spawn.Queue()
    processes = [
        spawn.Process(target=racing.ingest_once_both_have_read, args=(pg_url, event, both_read, results))
        for event in (a, b)
    ]
    for process in processes:
        process.start()
    try:
        reported = [await asyncio.to_thread(results.get, True, 90) for _ in processes]
    finally:
        for process in processes:
            process.join(10)
            if process.is_alive():
                process.kill()
    for result in reported:
        assert isinstance(result, tuple), result  # else the child's traceback
    assert sorted((kind, seq) for kind, seq, _ in reported) == [("applied", 1), ("applied", 2)]
    # One decided on the fast path; the other's fast path gave up, and the general path decided it.
    assert sorted(attempts for _, _, attempts in reported) == [[False], [True]]
    ledger = MemoryLedger()
    ledger.apply(a), ledger.apply(b)
    async with runtime.engine.connect() as conn:
        state = (await conn.execute(sa.select(licenses.c.state).where(licenses.c.id == "lic_shared"))).scalar_one()
    assert state == rules.derive(ledger.objects_of("lic_shared"))


async def test_the_batched_path_is_chosen_when_the_ingestor_is_built(runtime: Runtime, sqlite_url: str) -> None:
    rules = LicenseRules(runtime.settings.entitled_statuses)
    assert Ingestor(runtime, rules).batched is not None  # Postgres: batched by default
    assert Ingestor(runtime, rules, batching=False).batched is None
    async with open_runtime(make_settings(sqlite_url)) as on_sqlite:
        assert Ingestor(on_sqlite, rules).batched is None
        with pytest.raises(ValueError, match="needs Postgres"):
            Ingestor(on_sqlite, rules, batching=True)


@pytest.mark.parametrize("shape", SHAPES)
async def test_a_binding_links_the_pending_events_of_its_own_batch(
    runtime: Runtime, batches: list[int], pg_url: str, shape: Shape
) -> None:
    """A subscription named only by its Checkout Session: its objects' events are pending until the
    session binds them. Arriving together they share one transaction, whose WRITE records those
    events as linked already: the rows the general path leaves one event at a time."""
    s = Scenario(shape)
    s.subscribe(s.customer(), "lic_wave", bind="session").renew()
    events = s.take()
    fast, general = both_paths(runtime)
    by_general = await ingest_all(general, events)
    general_rows = await rows(runtime)
    truncate(pg_url)
    by_fast = await asyncio.gather(*(fast.ingest(e, orjson.dumps(e)) for e in events))

    assert len(events) in batches  # one transaction for all
    assert "linked" in {row["outcome"] for row in general_rows["stripe_events"]}
    assert [(o.kind, o.license_id) for o in by_fast] == [(o.kind, o.license_id) for o in by_general]
    assert await rows(runtime) == general_rows


@pytest.mark.parametrize("shape", SHAPES)
async def test_the_events_of_objects_a_checkout_session_names_count_once_it_binds_them(
    runtime: Runtime, pg_url: str, shape: Shape
) -> None:
    """Stripe sends `customer.subscription.created` and the first invoice's events before (or
    without waiting for) `checkout.session.completed`: pending, no license names them yet. The
    session names the subscription and the invoice itself and binds them: their earlier events
    now count for the license ("linked"), and `license-broker unmatched` lists none of them."""
    s = Scenario(shape)
    s.subscribe(s.customer(), "lic_named", bind="session")
    events = s.take()
    session = next(i for i, e in enumerate(events) if e["type"] == "checkout.session.completed")
    by_general, general_rows, by_fast = await one_at_a_time_through_both(runtime, pg_url, events)

    assert {o.kind for o in by_general[:session]} == {OutcomeKind.PENDING}  # before the session
    named = {events[session]["data"]["object"][k] for k in ("subscription", "invoice")}
    for table in (general_rows, await rows(runtime)):
        before = [r for r in table["stripe_events"] if r["id"] in {e["id"] for e in events[:session]}]
        assert named <= {r["object_id"] for r in before}
        assert {(r["outcome"], r["license_id"]) for r in before} == {("linked", "lic_named")}
    assert await unmatched_events(runtime.engine) == []
    assert [(o.kind, o.license_id) for o in by_fast] == [(o.kind, o.license_id) for o in by_general]


async def test_a_new_license_links_the_pending_entitlements_of_its_customer_in_the_common_path(
    runtime: Runtime, fast_results: list[bool], pg_url: str
) -> None:
    """The customer's entitlement summary before any license of the customer: pending. The
    subscription's first event binds a license of that customer: the summary's event now counts."""
    s = Scenario("current")
    alice = s.customer()
    s.entitlements(alice, ["sync"])
    s.subscribe(alice, "lic_entitled")
    events = s.take()
    by_general, general_rows, by_fast = await one_at_a_time_through_both(runtime, pg_url, events)

    assert fast_results[0] is True  # the subscription's first event, decided on the common path
    assert [(o.kind, o.license_id) for o in by_fast] == [(o.kind, o.license_id) for o in by_general]
    summary = next(r for r in general_rows["stripe_events"] if r["id"] == events[0]["id"])
    assert (summary["outcome"], summary["license_id"]) == ("linked", "lic_entitled")
    assert await rows(runtime) == general_rows


def delivery(event_id: str, *objects: StripeObject, license_id: str | None = None) -> Delivery:
    event = {"id": event_id, "type": "customer.subscription.updated", "created": T}
    return Delivery(event, None, Reported(objects, license_id))


def obj(object_id: str, customer: str | None, *links: str) -> StripeObject:
    return StripeObject(object_id, "subscription", T, 0, {"status": "active"}, customer, frozenset(links))


@contextlib.asynccontextmanager
async def batched_read(runtime: Runtime, batch: list[Delivery]) -> AsyncIterator[Snapshot]:
    """The batched path's first round trip (BEGIN, LOCK, READ) on a pooled connection: its snapshot,
    the transaction open until the block ends (then rolled back)."""
    ingest = fast_ingest.BatchedIngest(runtime.engine, LicenseRules(runtime.settings.entitled_statuses), False)
    async with runtime.engine.connect() as conn:
        pooled = await conn.get_raw_connection()
        pg: Any = pooled.driver_connection
        await pg.set_autocommit(True)
        try:
            yield await ingest._read(pg, batch)
        finally:
            await pg.rollback()
            await pg.set_autocommit(False)


async def test_the_batched_read_gives_the_snapshot_of_what_its_locks_guard_and_leaves_entangled_ids_unread(
    runtime: Runtime, pg_url: str
) -> None:
    """READ (broker.ingest.batched): the events recorded before; every binding of the licenses the
    batch's ids are bound to or its events name, with their objects (links only for the events'
    own) and the customer-level objects of their customers and the events'; the license rows, those
    named that do not exist yet (absent); and, as new, the unbound ids no object or link holds (read:
    no binding, no row, no link). An unbound id an object or a link holds is left unread, the
    general path's to walk (decide.SnapshotRows raises Missing for it)."""
    s1 = {"status": "active"}
    with psycopg_connect(pg_url) as conn:
        conn.execute(
            "INSERT INTO licenses (id, seq, state) VALUES ('lic_1', 3, %s::json), ('lic_named', 0, '{}'::json),"
            " ('lic_other', 7, '{}'::json)",
            (orjson.dumps(s1).decode(),),
        )
        conn.execute(
            "INSERT INTO stripe_bindings (stripe_id, license_id) VALUES ('sub_1', 'lic_1'), ('in_1', 'lic_1'),"
            " ('pi_1', 'lic_1'),"
            " ('sub_other', 'lic_other')"
        )
        conn.execute(
            "INSERT INTO stripe_objects (id, kind, version, rank, customer, state) VALUES"
            " ('sub_1', 'subscription', 10, 2, 'cus_1', '{\"status\": \"active\"}'),"
            " ('in_1', 'invoice', 11, 0, 'cus_1', '{\"status\": \"paid\"}'),"
            " ('entitlements:cus_1', 'entitlements', 12, 0, 'cus_1', '{\"features\": [\"a\"]}'),"
            " ('entitlements:cus_2', 'entitlements', 13, 0, 'cus_2', '{\"features\": [\"b\"]}'),"
            " ('entitlements:cus_9', 'entitlements', 14, 0, 'cus_9', '{\"features\": []}'),"
            " ('in_pending', 'invoice', 15, 0, 'cus_3', '{\"status\": \"open\"}'),"
            " ('sub_other', 'subscription', 16, 0, 'cus_9', '{}')"
        )
        conn.execute(
            "INSERT INTO stripe_links (object_id, linked_id) VALUES ('sub_1', 'in_1'), ('in_1', 'ch_1'),"
            " ('pi_9', 'ch_linked'), ('in_pending', 'sub_other')"
        )
        conn.execute(
            "INSERT INTO stripe_events (id, type, created, outcome, payload) VALUES"
            " ('evt_old', 'invoice.paid', 1, 'applied', '{}'::json)"
        )

    batch = [
        delivery("evt_old", obj("sub_1", "cus_1", "in_1")),
        delivery("evt_new", obj("in_new", "cus_2", "in_pending", "ch_linked")),
        delivery("evt_3", obj("sub_fresh", "cus_2"), license_id="lic_absent"),
        delivery("evt_4", obj("cs_x", None), license_id="lic_named"),
    ]
    async with batched_read(runtime, batch) as snapshot:
        pass

    new = {"in_new", "sub_fresh", "cs_x"}
    assert snapshot.recorded == {"evt_old"}
    # pi_1: bound to lic_1 without a row, and no id of the batch.
    assert snapshot.bindings == {"sub_1": "lic_1", "in_1": "lic_1", "pi_1": "lic_1"}
    assert snapshot.binding_known == {"sub_1", "in_1", "pi_1", "in_pending", "ch_linked", *new}
    assert snapshot.licenses == {"lic_1": (3, s1), "lic_named": (0, {})}
    assert snapshot.absent == {"lic_absent"}
    assert snapshot.neighbours == {i: set() for i in new}  # in_pending and ch_linked: entangled
    assert snapshot.objects_known == {"sub_1", "in_1", "pi_1", *new}
    assert snapshot.customers_known == {"cus_1", "cus_2"}
    assert snapshot.objects == {
        "sub_1": StripeObject("sub_1", "subscription", 10, 2, {"status": "active"}, "cus_1", frozenset({"in_1"})),
        "in_1": StripeObject("in_1", "invoice", 11, 0, {"status": "paid"}, "cus_1"),
        "entitlements:cus_1": StripeObject("entitlements:cus_1", "entitlements", 12, 0, {"features": ["a"]}, "cus_1"),
        "entitlements:cus_2": StripeObject("entitlements:cus_2", "entitlements", 13, 0, {"features": ["b"]}, "cus_2"),
    }
    assert set(snapshot.by_customer) == {"cus_1", "cus_2"}


async def test_the_batched_read_holds_the_id_lock_of_every_id_and_customer_of_its_events_until_its_transaction_ends(
    runtime: Runtime, pg_url: str
) -> None:
    """LOCK takes the advisory lock of each id the batch's events report (their objects and links)
    and of their customers, as the general path does (LedgerStore.lock_ids), and holds them to the
    end of the transaction: another transaction deciding an event of one of those ids waits for it."""
    batch = [delivery("evt_1", obj("sub_1", "cus_1", "in_1")), delivery("evt_2", obj("ch_2", None), license_id="lic_2")]
    keys = ("sub_1", "in_1", "cus_1", "ch_2", "sub_elsewhere", "cus_elsewhere")

    def free() -> dict[str, bool]:
        """Whether another transaction could take each id's lock now."""
        with psycopg_connect(pg_url) as other:
            query = "SELECT pg_try_advisory_xact_lock(hashtextextended(%s, 0))"
            return {k: bool(other.execute(query, (k,)).fetchone()[0]) for k in keys}  # type: ignore[index]

    async with batched_read(runtime, batch):
        assert free() == {k: k.endswith("_elsewhere") for k in keys}
    assert free() == dict.fromkeys(keys, True)


async def test_the_batched_read_knows_the_customers_of_the_objects_bound_to_its_licenses(
    runtime: Runtime, pg_url: str
) -> None:
    """The READ reads the customer-level objects of every customer the licenses' objects name, not
    only of those the events name (an event whose object names no customer, one of another
    customer): the snapshot knows them, so the decision does not send the event to the general path
    to read them (decide.Need.CUSTOMER_OBJECTS)."""
    with psycopg_connect(pg_url) as conn:
        conn.execute("INSERT INTO licenses (id, seq, state) VALUES ('lic_1', 1, '{}'::json)")
        conn.execute("INSERT INTO stripe_bindings (stripe_id, license_id) VALUES ('sub_1', 'lic_1'), ('ch_1', 'lic_1')")
        conn.execute(
            "INSERT INTO stripe_objects (id, kind, version, rank, customer, state) VALUES"
            " ('sub_1', 'subscription', 10, 0, 'cus_1', '{}'),"
            " ('entitlements:cus_1', 'entitlements', 11, 0, 'cus_1', '{\"features\": [\"a\"]}')"
        )
    async with batched_read(runtime, [delivery("evt_1", obj("ch_1", None))]) as snapshot:
        pass
    assert snapshot.bindings == {"sub_1": "lic_1", "ch_1": "lic_1"}
    assert snapshot.customers_known == {"cus_1"} and set(snapshot.by_customer) == {"cus_1"}


async def test_a_connection_the_batched_path_used_goes_back_to_the_pool_transactional(pg_url: str) -> None:
    """The batched path runs its statements in autocommit (its BEGIN and COMMIT are statements of
    its pipelines) and gives the connection back as it lent it: whoever takes it next (the
    general path, under its id locks) runs a transaction that a rollback undoes."""
    async with open_runtime(make_settings(pg_url, db_pool_size=1)) as runtime:
        fast = Ingestor(runtime, LicenseRules(runtime.settings.entitled_statuses), batching=True)
        event = SampleEvents("lic_pooled").subscription_event("customer.subscription.updated", "active", T)
        outcome = await fast.ingest(event, orjson.dumps(event))
        assert outcome.kind == "applied"
        async with runtime.engine.connect() as conn:
            await conn.execute(sa.text("INSERT INTO licenses (id, seq, state) VALUES ('lic_undone', 0, '{}')"))
            await conn.rollback()
        async with runtime.engine.connect() as conn:
            ids = set((await conn.scalars(sa.select(licenses.c.id))).all())
    assert ids == {"lic_pooled"}


# -- the general path's reads and locks on Postgres (broker.ingest.general._Reader) -----------------


def advisory(pg_url: str) -> Any:
    """A connection of another session, to hold, free and probe the advisory locks of ids
    (LedgerStore.lock_ids: hashtextextended(id, 0))."""
    return psycopg_connect(pg_url)


def hold(other: Any, key: str) -> None:
    other.execute("SELECT pg_advisory_lock(hashtextextended(%s, 0))", (key,))


def free(other: Any, key: str) -> None:
    other.execute("SELECT pg_advisory_unlock(hashtextextended(%s, 0))", (key,))


def locked_elsewhere(other: Any, key: str) -> bool:
    """Whether a session other than `other` holds the lock of `key`."""
    got = other.execute("SELECT pg_try_advisory_lock(hashtextextended(%s, 0))", (key,)).fetchone()[0]
    if got:
        free(other, key)
    return not got


# A waiting advisory lock of `key` in this test's database (pg_locks is the server's: other tests'
# databases are left out). The 64-bit key is split over classid (high half) and objid (low half).
WAITING = """
SELECT count(*) FROM pg_locks, hashtextextended(%(key)s, 0) AS k
WHERE locktype = 'advisory' AND NOT granted AND objsubid = 1
  AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND classid::bigint = (k >> 32) & 4294967295 AND objid::bigint = k & 4294967295
"""


async def until_waiting_or_done(other: Any, key: str, task: asyncio.Task[Any]) -> None:
    """Until `task` waits for the lock of `key` (or ends: the caller's assertion then fails)."""

    def waiting() -> bool:
        return task.done() or bool(other.execute(WAITING, {"key": key}).fetchone()[0])

    await async_wait_until(waiting, what="a transaction waiting for a lock")


REPORTED = Reported((StripeObject("sub_1", "subscription", T, 0, {"status": "active"}, "cus_1"),), "lic_1")


async def test_the_general_paths_first_lock_waits_and_a_walks_lock_waits_only_at_the_last_attempt(
    runtime: Runtime, pg_url: str
) -> None:
    """Another transaction holds an id: the first lock of the event (its ids, its customer, the ids
    an attempt before found busy) waits for it; an id a walk reaches later is taken only if free
    (else LocksBusy, naming the ids, and the attempt is rolled back), but at the last attempt waited
    for. The locks last until the transaction ends."""
    with advisory(pg_url) as other:
        hold(other, "ch_held")
        async with runtime.engine.begin() as conn:
            # A wait that should not be fails the test instead of hanging it.
            await conn.execute(sa.text("SET LOCAL lock_timeout = '10s'"))
            reader = general._Reader(conn, {"ch_busy"}, wait=False)
            await reader.read(Wants(Need.BASE, ("sub_1",)), Snapshot(), REPORTED)
            probed = ("sub_1", "cus_1", "ch_busy", "ch_free")
            assert {k for k in probed if locked_elsewhere(other, k)} == {"sub_1", "cus_1", "ch_busy"}
            with pytest.raises(LocksBusy) as busy:
                await reader.read(Wants(Need.WALK, ("ch_free", "ch_held")), Snapshot(), REPORTED)
            assert busy.value.ids == {"ch_free", "ch_held"}
        assert not locked_elsewhere(other, "sub_1")
        free(other, "ch_held")

        for need, wait in ((Need.WALK, True), (Need.BASE, False)):
            hold(other, "ch_held")
            async with runtime.engine.begin() as conn:
                snapshot = Snapshot()
                reader = general._Reader(conn, set(), wait=wait)
                read = asyncio.create_task(reader.read(Wants(need, ("ch_held",)), snapshot, REPORTED))
                try:
                    await until_waiting_or_done(other, "ch_held", read)
                    assert not read.done(), need
                finally:
                    free(other, "ch_held")  # (failing, the read ends before the transaction)
                await read
                assert snapshot.binding_known == {"ch_held"}
                assert locked_elsewhere(other, "ch_held")


async def test_a_commit_whose_walk_finds_an_id_locked_elsewhere_starts_again_holding_it_first(
    runtime: Runtime, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new binding walks from the event's invoice to a charge another transaction holds: the
    attempt is rolled back (LocksBusy), and the next takes the charge's lock with the event's own,
    waiting for it; once free, the event binds all three."""
    readers: list[tuple[bool, set[str]]] = []

    class Noted(general._Reader):
        def __init__(self, conn: Any, extra_locks: set[str], *, wait: bool) -> None:
            readers.append((wait, set(extra_locks)))
            super().__init__(conn, extra_locks, wait=wait)

    monkeypatch.setattr(general, "_Reader", Noted)
    with psycopg_connect(pg_url) as conn:
        conn.execute("INSERT INTO stripe_links (object_id, linked_id) VALUES ('in_1', 'ch_1')")
    sub = StripeObject("sub_1", "subscription", T, 0, {"status": "active"}, "cus_1", frozenset({"in_1"}))
    event = {"id": "evt_walk", "type": "customer.subscription.updated", "created": T}
    ingest = general.GeneralIngest(runtime.engine, LicenseRules(runtime.settings.entitled_statuses), NoRefresh())
    with advisory(pg_url) as other:
        hold(other, "ch_1")
        commit = asyncio.create_task(ingest.commit(event, orjson.dumps(event), Reported((sub,), "lic_walk")))
        try:
            await until_waiting_or_done(other, "ch_1", commit)
            assert not commit.done()
            assert readers == [(False, set()), (False, {"ch_1"})]
        finally:
            free(other, "ch_1")
        outcome = await commit
    assert (outcome.kind, outcome.license_id) == (OutcomeKind.APPLIED, "lic_walk")
    assert len(readers) == 2
    async with runtime.engine.connect() as conn:
        bound = dict((await conn.execute(sa.select(stripe_bindings.c.stripe_id, stripe_bindings.c.license_id))).all())
        recorded = (await conn.execute(sa.select(stripe_events.c.id, stripe_events.c.outcome))).all()
    assert bound == {"sub_1": "lic_walk", "in_1": "lic_walk", "ch_1": "lic_walk"}
    assert recorded == [("evt_walk", "applied")]  # once: the first attempt's record was rolled back


async def test_the_general_path_reads_the_rows_each_need_names_and_locks_the_license_rows(
    runtime: Runtime, pg_url: str
) -> None:
    """CLAIMED: the customers of a license's objects; CUSTOMER_LICENSES: the licenses holding an
    object of the customer (customer-level objects hold none); LICENSES: the rows, locked (created if
    new), every id bound to them with its object, and the customer-level objects of their customers
    and the event's; CUSTOMER_OBJECTS: those of the customers named, of customer-level kinds only."""
    s1 = {"status": "active"}
    with psycopg_connect(pg_url) as conn:
        conn.execute(
            "INSERT INTO licenses (id, seq, state) VALUES ('lic_1', 3, %s::json), ('lic_other', 7, '{}'::json)",
            (orjson.dumps(s1).decode(),),
        )
        conn.execute(
            "INSERT INTO stripe_bindings (stripe_id, license_id) VALUES ('sub_1', 'lic_1'), ('in_1', 'lic_1'),"
            " ('pi_1', 'lic_1'), ('sub_9', 'lic_other')"
        )
        conn.execute(
            "INSERT INTO stripe_objects (id, kind, version, rank, customer, state) VALUES"
            " ('sub_1', 'subscription', 10, 2, 'cus_1', '{\"status\": \"active\"}'),"
            " ('in_1', 'invoice', 11, 0, 'cus_1', '{\"status\": \"paid\"}'),"
            " ('entitlements:cus_1', 'entitlements', 12, 1, 'cus_1', '{\"features\": [\"a\"]}'),"
            " ('entitlements:cus_2', 'entitlements', 13, 0, 'cus_2', '{\"features\": [\"b\"]}'),"
            " ('entitlements:cus_9', 'entitlements', 14, 0, 'cus_9', '{\"features\": []}'),"
            " ('sub_9', 'subscription', 16, 0, 'cus_2', '{}')"
        )
    own = StripeObject("sub_new", "subscription", T, 0, {"status": "active"}, "cus_3")
    reported = Reported((own,), "lic_1")
    entitled_1 = StripeObject("entitlements:cus_1", "entitlements", 12, 1, {"features": ["a"]}, "cus_1")
    async with runtime.engine.begin() as conn:
        reader = general._Reader(conn, set(), wait=True)
        snapshot = Snapshot(objects_known={"sub_new"})
        snapshot.add_objects([own])
        await reader.read(Wants(Need.CLAIMED, ("lic_1",)), snapshot, reported)
        assert snapshot.claimed == {"lic_1": {"cus_1"}}
        await reader.read(Wants(Need.CUSTOMER_LICENSES, ("cus_2",)), snapshot, reported)
        assert snapshot.customer_licenses == {"cus_2": {"lic_other"}}

        await reader.read(Wants(Need.LICENSES, ("lic_new", "lic_1")), snapshot, reported)
        assert snapshot.licenses == {"lic_1": (3, s1), "lic_new": (0, initial_state())}
        assert snapshot.bindings == {"sub_1": "lic_1", "in_1": "lic_1", "pi_1": "lic_1"}
        assert snapshot.binding_known == {"sub_1", "in_1", "pi_1"}
        assert snapshot.objects_known == {"sub_new", "sub_1", "in_1", "pi_1"}  # pi_1: bound, without a row
        assert snapshot.customers_known == {"cus_1", "cus_3"}
        assert snapshot.objects == {
            "sub_new": own,
            "sub_1": StripeObject("sub_1", "subscription", 10, 2, {"status": "active"}, "cus_1"),
            "in_1": StripeObject("in_1", "invoice", 11, 0, {"status": "paid"}, "cus_1"),
            "entitlements:cus_1": entitled_1,
        }
        with psycopg_connect(pg_url) as other, pytest.raises(psycopg.errors.LockNotAvailable):
            other.execute("SELECT id FROM licenses WHERE id = 'lic_1' FOR UPDATE NOWAIT")

        await reader.read(Wants(Need.CUSTOMER_OBJECTS, ("cus_2",)), snapshot, reported)
        assert snapshot.customers_known == {"cus_1", "cus_2", "cus_3"}
        assert set(snapshot.objects) == {"sub_new", "sub_1", "in_1", "entitlements:cus_1", "entitlements:cus_2"}
        assert snapshot.by_customer == {
            "cus_1": {"entitlements:cus_1": entitled_1},
            "cus_2": {
                "entitlements:cus_2": StripeObject(
                    "entitlements:cus_2", "entitlements", 13, 0, {"features": ["b"]}, "cus_2"
                )
            },
        }
