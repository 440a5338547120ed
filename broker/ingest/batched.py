"""The batched ingest on Postgres: the common events, several in one transaction when several are
waiting, in two network round trips per transaction, through psycopg directly with statements that are the same
text every time (prepared after a few uses): events whose ids are bound already, or new (no object
and no link holds them yet: a license's first event, a new invoice of a bound subscription).

    round trip 1: BEGIN; PLANS (how this transaction's statements are planned); LOCK (the id locks
                  of every event, then the rows of the licenses they are bound to or name); READ
                  (those licenses' bindings and ledger objects, which events were recorded, which
                  named licenses exist, which unbound ids are held already); Sync
    Python:       broker.ingest.decide, the general path's decision: per event, in arrival order,
                  on the snapshot as the events before it left it
    round trip 2: WRITE (the events with their outcomes, objects, links, bindings, new licenses,
                  license rows, log entries, pending events now linked; its column lists generated
                  from the schema: broker.ingest.statements); COMMIT; Sync

Group commit: a webhook arriving while `RUNNERS` transactions are in flight waits for the next
one, which takes every event waiting then (up to `MAX_BATCH`). Alone, an event is a transaction of
its own at once; under load the round trips, the statements and the commit are shared. A batch
that fails as a whole (a deadlock, content one of its events carries that the database refuses, a
row written meanwhile) is retried one event per transaction, so one event never decides another's
fate.

Why READ is its own statement: under READ COMMITTED a statement reads the snapshot taken when it
started, before any lock it waits for inside. LOCK's snapshot may miss what the holder of an id
lock or of a license row lock committed meanwhile, so it only locks (the locked license rows are
returned as they are after the wait). READ starts after every lock is held, so it sees each
committed binding and object.

What the snapshot lacks for an event (`decide.Wants`) goes to the general path (broker.ingest.general,
SQLAlchemy), which takes the same locks in the same order (event ids, sorted, then license rows,
sorted) and reads what the decision asks for: an unbound id an object or a link holds already
(binding it may bind pending objects), a customer-level event (`eligible`), a Payment Link's
client_reference_id on an unbound object (the takeover check), a license bound after the license
rows were locked, an event a read from Stripe's API may change. Nothing of such an event is
written here, so giving it up costs nothing."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
import psycopg
from sqlalchemy.ext.asyncio import AsyncEngine

from broker import metrics
from broker.ingest.decide import Delivery, Snapshot, Writes, decide
from broker.ingest.outcomes import Outcome
from broker.ingest.statements import WRITE
from broker.stripe_ledger.kinds import CUSTOMER_KINDS
from broker.stripe_ledger.ledger import LicenseRules, StripeObject
from broker.stripe_ledger.objects import Reported

_CUSTOMER_KINDS = "{" + ",".join(sorted(CUSTOMER_KINDS)) + "}"

# The advisory locks of every id of the batch (sorted, as LedgerStore.lock_ids), then the rows of
# the licenses its ids are bound to or its events name, in id order. LockRows sits above the sort
# and the join with `locked`, whose aggregate takes every id lock first: ids, then licenses, as the
# general path.
LOCK = """
WITH locked AS (
    SELECT count(pg_advisory_xact_lock(hashtextextended(k, 0))) AS n FROM unnest(%(lock_ids)s::text[]) AS k
),
license AS (
    SELECT l.id, l.seq, l.state
    FROM licenses l, locked
    WHERE l.id IN (SELECT license_id FROM stripe_bindings WHERE stripe_id = ANY(%(ids)s::text[])
                   UNION SELECT unnest(%(named)s::text[]))
      AND locked.n >= 0
    ORDER BY l.id
    FOR UPDATE OF l
)
SELECT (SELECT n FROM locked), (SELECT json_agg(json_build_array(id, seq, state)) FROM license)::text
"""

# How this transaction's statements are planned, for this transaction only. Every row they touch is
# looked up by its key, so their best plan does not depend on the values: planned once (generic,
# once prepared) rather than at each execution, which cost more than executing them; and with
# nested loops over index lookups, even when the plan is made while the tables are still small.
# A generic plan is kept until the tables' statistics change, and one made for an empty table
# scans it whole, or hashes it, on every event once it holds thousands of rows: `make bench` at
# 10,000 licenses (BENCH_SCALE=full) gave p50 39 ms with Postgres's own choice, 5.9 ms planning
# each execution, 4.1 ms like this.
PLANS = """
SELECT set_config('plan_cache_mode', 'force_generic_plan', true), set_config('enable_seqscan', 'off', true),
       set_config('enable_hashjoin', 'off', true), set_config('enable_mergejoin', 'off', true)
"""

# With every lock held, a snapshot that sees all they guard: every binding of those licenses, their
# objects, the events' own objects (with their links), the customer-level objects of any customer
# the license objects or the events name; which events were recorded; which named licenses exist;
# and the unbound ids that are not new (an object or a link holds them: the general path binds those).
READ = f"""
WITH license AS (
    SELECT license_id FROM stripe_bindings WHERE stripe_id = ANY(%(ids)s::text[])
    UNION SELECT unnest(%(named)s::text[])
),
bound AS (
    SELECT b.stripe_id, b.license_id
    FROM license l, LATERAL (SELECT * FROM stripe_bindings b WHERE b.license_id = l.license_id OFFSET 0) b
),
customer AS (
    SELECT o.customer
    FROM bound, LATERAL (SELECT customer FROM stripe_objects o WHERE o.id = bound.stripe_id OFFSET 0) o
    WHERE o.customer IS NOT NULL
    UNION SELECT unnest(%(customers)s::text[])
),
wanted AS (
    SELECT stripe_id AS id FROM bound
    UNION SELECT unnest(%(own)s::text[])
    UNION SELECT o.id
    FROM customer c, LATERAL (
        SELECT id FROM stripe_objects o WHERE o.customer = c.customer AND o.kind = ANY('{_CUSTOMER_KINDS}'::text[])
        OFFSET 0
    ) o
)
SELECT
    (SELECT array_agg(id) FROM stripe_events WHERE id = ANY(%(event_ids)s::text[])),
    (SELECT array_agg(id) FROM licenses WHERE id = ANY(%(named)s::text[])),
    (SELECT array_agg(k) FROM unnest(%(ids)s::text[]) AS k
     WHERE NOT EXISTS (SELECT 1 FROM stripe_bindings b WHERE b.stripe_id = k)
       AND EXISTS (SELECT 1 FROM stripe_objects o WHERE o.id = k
                   UNION ALL SELECT 1 FROM stripe_links l WHERE l.object_id = k
                   UNION ALL SELECT 1 FROM stripe_links l WHERE l.linked_id = k)),
    (SELECT json_object_agg(stripe_id, license_id) FROM bound)::text,
    (SELECT json_agg(json_build_array(
        o.id, o.kind, o.version, o.rank, o.state, o.customer,
        CASE WHEN o.id = ANY(%(own)s::text[])
             THEN (SELECT array_agg(k.linked_id) FROM stripe_links k WHERE k.object_id = o.id) END
    )) FROM wanted w, LATERAL (SELECT * FROM stripe_objects o WHERE o.id = w.id OFFSET 0) o)::text
"""

# Transactions in flight at once per process, and events per transaction.
RUNNERS = 2
MAX_BATCH = 64


@dataclass(slots=True)
class _Request:
    delivery: Delivery
    future: asyncio.Future[Outcome | None]


def _json(rows: Any) -> str:
    return orjson.dumps(rows).decode()


def _license_rows(rows: dict[str, tuple[int, Any]]) -> str:
    return _json(
        [
            {
                "id": lid,
                "seq": seq,
                "status": state["status"],
                "entitled": state["entitled"],
                "state": state,
                "stripe_customer_id": state["customer"],
                "stripe_subscription_id": state["subscription"],
            }
            for lid, (seq, state) in sorted(rows.items())
        ]
    )


def params(writes: Writes) -> dict[str, Any]:
    """The WRITE statement's parameters: one JSON document per table (Postgres parses them in C,
    where arrays of JSON text would be escaped one by one here). The raw bodies are embedded as
    they are (orjson.Fragment), and stored as they are."""
    return {
        "now": writes.now,
        "n": len(writes.events),
        "n_bindings": len(writes.bindings),
        "n_created": len(writes.created),
        "events": _json(writes.events),
        "objects": _json([o.row() for o in writes.objects.values()]),
        "links": _json([{"object_id": a, "linked_id": b} for a, b in sorted(writes.links)]),
        "bindings": _json([{"stripe_id": i, "license_id": lid} for i, lid in writes.bindings.items()]),
        "licenses": _license_rows(writes.licenses),
        "created": _license_rows(writes.created),
        "log": _json(writes.log),
        "linked": _json([{"object_id": i, "license_id": lid} for i, lid in sorted(writes.linked.items())]),
    }


class BatchedIngest:
    def __init__(self, engine: AsyncEngine, rules: LicenseRules, refreshes: bool) -> None:
        self.engine = engine
        self.rules = rules
        # With STRIPE_API_KEY an event that is not newer than its object is re-read from Stripe:
        # the general path does that.
        self.refreshes = refreshes
        self._waiting: deque[_Request] = deque()
        self._runners: set[asyncio.Task[None]] = set()

    @staticmethod
    def eligible(reported: Reported) -> bool:
        return not reported.customer_level

    async def apply(self, event: Mapping[str, Any], raw: bytes | None, reported: Reported) -> Outcome | None:
        """The outcome, committed; None to take the general path (nothing written)."""
        future: asyncio.Future[Outcome | None] = asyncio.get_running_loop().create_future()
        self._waiting.append(_Request(Delivery(event, raw, reported), future))
        if len(self._runners) < RUNNERS:
            runner = asyncio.create_task(self._run())
            self._runners.add(runner)
            runner.add_done_callback(self._runners.discard)
        return await future

    async def _run(self) -> None:
        batch: list[_Request] = []
        try:
            while self._waiting:
                batch = [self._waiting.popleft() for _ in range(min(MAX_BATCH, len(self._waiting)))]
                await self._settle(batch)
        except BaseException:
            # Cancelled (the process is stopping): nobody waits forever, the last runner included.
            last = self._runners <= {asyncio.current_task()}
            for request in [*batch, *(self._waiting if last else ())]:
                if not request.future.done():
                    request.future.cancel()
            if last:
                # Their callers are told; a runner started later must not commit them.
                self._waiting.clear()
            raise

    async def _settle(self, batch: list[_Request]) -> None:
        try:
            results = await self._transaction(batch)
        except Exception as exc:
            if len(batch) > 1:
                # Whatever failed (a deadlock, content the database refuses, a conflict) failed one
                # event's transaction or the batch's: alone, each ends as it would have.
                return await self._one_by_one(batch)
            if isinstance(exc, psycopg.errors.DivisionByZero):
                # Written meanwhile: another delivery of the event, or the license or a binding it
                # creates. The general path decides it on what is there now.
                results = [None]
            else:
                if not batch[0].future.done():
                    batch[0].future.set_exception(exc)  # the caller reads the driver's error (broker.ingest.errors)
                return
        for request, result in zip(batch, results, strict=True):
            if not request.future.done():
                request.future.set_result(result)

    async def _one_by_one(self, batch: list[_Request]) -> None:
        for request in batch:
            await self._settle([request])

    async def _transaction(self, batch: list[_Request]) -> list[Outcome | None]:
        metrics.INGEST_BATCH.observe(len(batch))
        async with self.engine.connect() as conn:
            pooled = await conn.get_raw_connection()
            pg: psycopg.AsyncConnection[Any] = pooled.driver_connection  # type: ignore[assignment]
            # BEGIN is a statement of the first pipeline: psycopg's implicit BEGIN would be a round
            # trip of its own (it Syncs after it). The pool gets the connection back as it lent it.
            await pg.set_autocommit(True)
            try:
                return await self._apply(pg, batch)
            finally:
                try:
                    await pg.rollback()  # nothing to do unless _apply left the transaction open
                    await pg.set_autocommit(False)
                except psycopg.Error:
                    await conn.invalidate()

    async def _apply(self, pg: psycopg.AsyncConnection[Any], batch: list[_Request]) -> list[Outcome | None]:
        deliveries = [r.delivery for r in batch]
        snapshot = await self._read(pg, deliveries)
        decision = decide(deliveries, snapshot, self.rules, now=datetime.now(UTC), stripe_reads=self.refreshes)
        # What the snapshot lacks for an event (Wants) is the general path's to read: it decides it.
        results = [r if isinstance(r, Outcome) else None for r in decision.results]
        if not decision.writes.events:
            return results  # nothing to write: the caller rolls back
        # COMMIT as a statement of the pipeline: connection.commit() would Sync once more.
        async with pg.pipeline():
            await pg.execute(WRITE, params(decision.writes))
            await pg.execute("COMMIT")
        return results

    async def _read(self, pg: psycopg.AsyncConnection[Any], batch: list[Delivery]) -> Snapshot:
        own = list(dict.fromkeys(o.id for d in batch for o in d.reported.objects))
        ids = sorted({i for d in batch for i in d.reported.ids})
        named = sorted({lid for d in batch if (lid := d.reported.license_id)})
        customers = sorted({c for d in batch for o in d.reported.objects if (c := o.customer)})
        lock_ids = sorted(set(ids) | {c for d in batch if (c := d.reported.customer)})
        # One Sync for BEGIN, LOCK and READ (a fetch inside the block would Sync once more).
        async with pg.pipeline():
            await pg.execute("BEGIN")
            await pg.execute(PLANS)
            locked = await pg.execute(LOCK, {"lock_ids": lock_ids, "ids": ids, "named": named})
            found = await pg.execute(
                READ,
                {
                    "ids": ids,
                    "own": own,
                    "named": named,
                    "customers": customers,
                    "event_ids": [d.event["id"] for d in batch],
                },
            )
        first, second = await locked.fetchone(), await found.fetchone()
        assert first is not None and second is not None
        _, licenses_text = first
        recorded, existing, entangled, members_text, objects_text = second
        members: dict[str, str] = orjson.loads(members_text or "{}")
        snapshot = Snapshot(
            recorded=set(recorded or ()),
            bindings=members,
            binding_known={*ids, *members},
            # The READ holds every object bound to the licenses, and the events' own.
            objects_known={*own, *members},
            licenses={lid: (seq, state) for lid, seq, state in orjson.loads(licenses_text or "[]")},
        )
        snapshot.absent = set(named) - set(existing or ()) - snapshot.licenses.keys()
        for oid, kind, version, rank, state, customer, links in orjson.loads(objects_text or "[]"):
            snapshot.add_objects([StripeObject(oid, kind, version, rank, state, customer, frozenset(links or ()))])
        # The customers whose customer-level objects the READ holds: those of the licenses' objects
        # and of the events'.
        snapshot.customers_known = {
            *customers,
            *(o.customer for i in members if (o := snapshot.objects.get(i)) and o.customer),
        }
        # An unbound id no object or link holds has no link to walk: a new binding binds it alone
        # (binding.bind reads its neighbours: those linked in this batch). The others (`entangled`)
        # are the general path's to walk: decide.SnapshotRows.neighbours raises for them (Wants).
        entangled_ids = set(entangled or ())
        snapshot.neighbours = {i: set() for i in ids if i not in members and i not in entangled_ids}
        snapshot.objects_known |= snapshot.neighbours.keys()  # (nor an object of their id)
        return snapshot
