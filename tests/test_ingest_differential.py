"""The two ways the ingest writes its transaction (broker.ingest: the general path alone, and the
batched path with the general one for what it gives back) leave the same rows, column for column:
random interleavings of whole Stripe lives (both API shapes), with late and repeated deliveries,
sent through each path into a database of its own.

Every column of every table of broker.storage.schema is compared, but for those in `EXCLUDED`
(tests/support/rows.py), whose values legitimately differ between two runs of the same events."""

from __future__ import annotations

import asyncio
import os
import random
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import psycopg
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from sqlalchemy.engine import make_url

from broker.ingest import Ingestor, Outcome
from broker.runtime import open_runtime
from broker.settings import Settings, normalize_database_url
from broker.storage.db import create_engine, migrate
from broker.storage.schema import metadata
from broker.stripe_ledger.ledger import LicenseRules
from tests import stripe_scenario
from tests.stripe_objects import SHAPES, Shape
from tests.stripe_scenario import Scenario
from tests.support.licenses import make_settings
from tests.support.rows import EXCLUDED, every_row
from tests.support.services import ADMIN_URL, psycopg_connect, truncate, unavailable

# --- whole Stripe lives: each one customer's (or two's), its own license ids -----------------------


def subscription_renewed_failed_and_canceled(s: Scenario, tag: str) -> None:
    sub = s.subscribe(s.customer(), f"lic_{tag}")
    sub.renew()
    sub.fail_renewal().pay()
    sub.update(status="active")
    sub.schedule_cancel()
    sub.end()


def intent_purchase_refunded_twice_in_one_second(s: Scenario, tag: str) -> None:
    payment = s.buy_with_payment_intent(s.customer(), f"lic_{tag}", amount=12000).payment
    payment.refund(9000)
    payment.refund(3000, same_second=True)
    payment.dispute("warning_needs_response")


def proration_refunded_then_renewed(s: Scenario, tag: str) -> None:
    sub = s.subscribe(s.customer(), f"lic_{tag}")
    proration = sub.change_quantity(3, proration_amount=1500).payment
    assert proration is not None
    proration.refund()
    sub.renew()


def renewal_needs_3d_secure_then_resubscribed(s: Scenario, tag: str) -> None:
    alice = s.customer()
    sub = s.subscribe(alice, f"lic_{tag}")
    sub.renewal_needs_action().pay()
    sub.update(status="active")
    sub.renewal_needs_action()
    sub.end()
    s.subscribe(alice, f"lic_{tag}").renewal_needs_action()


def emailed_invoice_declined(s: Scenario, tag: str) -> None:
    sub = s.subscribe_by_invoice(s.customer(), f"lic_{tag}")
    sub.send_renewal_invoice().fail()
    sub.update(status="past_due")


def disputes_won_lost_and_prevented(s: Scenario, tag: str) -> None:
    stripe_scenario.disputes_won_lost_and_prevented(s, f"lic_{tag}")


def expired_then_bought_again_with_entitlements(s: Scenario, tag: str) -> None:
    """Customer-level objects: an entitlement summary of more than 10 features."""
    alice = s.customer()
    s.subscribe_by_api(alice, f"lic_{tag}").expire_incomplete()
    s.subscribe(alice, f"lic_{tag}")
    s.entitlements(alice, [f"feature_{n}" for n in range(12)])


def lifetime_and_addon_by_checkout(s: Scenario, tag: str) -> None:
    alice = s.customer()
    s.buy(alice, f"lic_{tag}", pending=True).async_succeeded()
    s.buy(alice, f"lic_{tag}", price="price_addon", product="prod_addon", amount=500)


def named_by_the_session_only(s: Scenario, tag: str) -> None:
    """The subscription carries no license id: its objects wait (pending) until the session binds them."""
    sub = s.subscribe(s.customer(), f"lic_{tag}", bind="session")
    sub.renew()
    sub.fail_renewal()


def payment_link_and_a_takeover_attempt(s: Scenario, tag: str) -> None:
    """client_reference_id (anyone can set it): a license started by one customer, then named by
    another customer's Payment Link (rejected when the first is there already)."""
    alice, mallory = s.customer(), s.customer()
    s.subscribe(alice, f"lic_{tag}", bind="client_reference_id").renew()
    s.subscribe(mallory, f"lic_{tag}", bind="client_reference_id")


def two_licenses_of_one_customer_and_their_entitlements(s: Scenario, tag: str) -> None:
    alice = s.customer()
    s.subscribe(alice, f"lic_{tag}_a")
    s.entitlements(alice, ["sync"])
    s.buy(alice, f"lic_{tag}_b")
    s.entitlements(alice, ["sync", "export"])


def something_else_bought(s: Scenario, tag: str) -> None:
    """A purchase that names no license: pending for good."""
    s.buy(s.customer(), None, bind="none", price="price_other", product="prod_other")


LIVES: list[Callable[[Scenario, str], None]] = [
    subscription_renewed_failed_and_canceled,
    intent_purchase_refunded_twice_in_one_second,
    proration_refunded_then_renewed,
    renewal_needs_3d_secure_then_resubscribed,
    emailed_invoice_declined,
    disputes_won_lost_and_prevented,
    expired_then_bought_again_with_entitlements,
    lifetime_and_addon_by_checkout,
    named_by_the_session_only,
    payment_link_and_a_takeover_attempt,
    two_licenses_of_one_customer_and_their_entitlements,
    something_else_bought,
]
RULES = [
    LicenseRules(["trialing", "active", "past_due"]),
    LicenseRules(["trialing", "active"], dispute_revokes="period"),
    LicenseRules(["trialing", "active", "past_due"], ["subscription:prod_desktop_pro", "perpetual:price_lifetime"]),
]


def lives(shape: Shape, chosen: list[Callable[[Scenario, str], None]]) -> list[list[dict[str, Any]]]:
    """Each life's events in the order Stripe sends them."""
    s = Scenario(shape)
    taken = []
    for n, life in enumerate(chosen):
        life(s, f"{n}_{uuid.uuid4().hex[:6]}")
        taken.append(s.take())
    return taken


def interleave(lives: list[list[dict[str, Any]]], rng: random.Random) -> list[dict[str, Any]]:
    """One delivery order: the lives' events merged at random; some delivered late (a few places
    on), some delivered again."""
    queues = [list(life) for life in lives if life]
    order: list[dict[str, Any]] = []
    while queues:
        queue = rng.choice(queues)
        order.append(queue.pop(0))
        if not queue:
            queues.remove(queue)
    for _ in range(len(order) // 5):
        i = rng.randrange(len(order))
        order.insert(min(len(order), i + rng.randint(1, 4)), order.pop(i))
    for _ in range(len(order) // 10):
        order.insert(rng.randrange(len(order) + 1), rng.choice(order))
    return order


def waves(lives: list[list[dict[str, Any]]], rng: random.Random) -> list[list[dict[str, Any]]]:
    """Deliveries in waves that arrive together (one transaction of the batched path): at most
    one event of each life per wave, the lives' own events in order."""
    queues = [list(life) for life in lives if life]
    result = []
    while queues:
        wave = [q.pop(0) for q in queues if rng.random() < 0.8] or [queues[0].pop(0)]
        result.append(wave)
        queues = [q for q in queues if q]
    return result


# --- two databases, and every row of each ---------------------------------------------------------


@pytest.fixture(scope="module")
def two_databases() -> Iterator[tuple[str, str]]:
    names = [f"lb_diff_{os.getpid()}_{uuid.uuid4().hex[:6]}_{path}" for path in ("general", "batched")]
    try:
        with psycopg_connect(ADMIN_URL) as conn:
            for name in names:
                conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as exc:
        unavailable("Postgres", exc)
    admin = make_url(normalize_database_url(ADMIN_URL))
    urls = [admin.set(database=name).render_as_string(hide_password=False) for name in names]

    async def setup() -> None:
        for url in urls:
            engine = create_engine(Settings(database_url=url))
            try:
                await migrate(engine)
            finally:
                await engine.dispose()

    try:
        asyncio.run(setup())
        yield urls[0], urls[1]
    finally:
        with psycopg_connect(ADMIN_URL) as conn:
            for name in names:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def summary(outcome: Outcome) -> tuple[str, str | None, int | None, str | None]:
    return outcome.kind.value, outcome.license_id, outcome.event.seq if outcome.event else None, outcome.reason


async def deliver(url: str, rules: LicenseRules, batching: bool, deliveries: list[list[dict[str, Any]]]) -> list[Any]:
    """Each wave's events at once (their outcomes in wave order), the waves one after the other."""
    async with open_runtime(make_settings(url)) as runtime:
        ingestor = Ingestor(runtime, rules, batching=batching)
        outcomes = []
        for wave in deliveries:
            done = await asyncio.gather(*(ingestor.ingest(e, orjson.dumps(e)) for e in wave))
            outcomes += [summary(o) for o in done]
        return outcomes


def compare_paths(urls: tuple[str, str], rules: LicenseRules, deliveries: list[list[dict[str, Any]]]) -> None:
    general_url, batched_url = urls
    truncate(general_url)
    truncate(batched_url)
    # The general path sees the events one at a time, in the same order.
    one_by_one = [[e] for wave in deliveries for e in wave]
    by_general = asyncio.run(deliver(general_url, rules, False, one_by_one))
    by_batched = asyncio.run(deliver(batched_url, rules, True, deliveries))
    assert by_batched == by_general
    general_rows, batched_rows = asyncio.run(every_row(general_url)), asyncio.run(every_row(batched_url))
    assert general_rows["stripe_events"]  # (the rows are there to compare)
    for table in general_rows:
        assert batched_rows[table] == general_rows[table], table


life_lists = st.lists(st.sampled_from(LIVES), min_size=1, max_size=4)


# Each example is two databases' worth of transactions (~1-3 s on a quiet machine): few examples per
# run, shrunk when one fails; no "explain" phase (it traces every line of the ingest).
SETTINGS = settings(
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
)


@pytest.mark.timeout(600)
@settings(SETTINGS, max_examples=10)
@given(st.sampled_from(SHAPES), life_lists, st.sampled_from(RULES), st.randoms(use_true_random=False))
def test_any_interleaving_of_stripe_lives_leaves_the_same_rows_through_either_path(
    two_databases: tuple[str, str], shape: Shape, chosen: Any, rules: LicenseRules, rng: random.Random
) -> None:
    order = interleave(lives(shape, chosen), rng)
    compare_paths(two_databases, rules, [[e] for e in order])


@pytest.mark.timeout(600)
@settings(SETTINGS, max_examples=5)
@given(st.sampled_from(SHAPES), life_lists, st.sampled_from(RULES), st.randoms(use_true_random=False))
def test_lives_arriving_together_leave_the_rows_they_leave_one_at_a_time(
    two_databases: tuple[str, str], shape: Shape, chosen: Any, rules: LicenseRules, rng: random.Random
) -> None:
    """Waves of events of different lives share the batched path's transactions."""
    compare_paths(two_databases, rules, waves(lives(shape, chosen), rng))


def test_every_table_and_column_of_the_schema_is_compared() -> None:
    """What EXCLUDED leaves out exists (a renamed column is not silently compared no more)."""
    for table, names in EXCLUDED.items():
        assert names <= set(metadata.tables[table].c.keys()), table
