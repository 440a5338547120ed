"""The batched ingest on Postgres: the common events, several events in one transaction when several are waiting, in
two network round trips per transaction, through psycopg directly with statements that are the same
text every time (prepared after a few uses): events whose ids are bound already, or new (no object
and no link holds them yet: a license's first event, a new invoice of a bound subscription).

    round trip 1: BEGIN; PLANS (how this transaction's statements are planned); LOCK (the id locks
                  of every event, then the rows of the licenses they are bound to or name); READ
                  (those licenses' bindings and ledger objects, which events were recorded, which
                  named licenses exist, which unbound ids are held already); Sync
    Python:       per event, in arrival order: binding.resolve, ledger.merge and
                  LicenseRules.derive, unchanged, each on the objects as the events before it left them
    round trip 2: WRITE (the events with their outcomes, objects, links, bindings, new licenses,
                  license rows, log entries); COMMIT; Sync

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

Anything else goes to the general path (broker.ingest.general, SQLAlchemy), which takes the same locks in
the same order (event ids, sorted, then license rows, sorted): an unbound id an object or a link
holds already (binding it may bind pending objects), a customer-level event or one whose customer
has customer-level objects waiting, a Payment Link's client_reference_id on an unbound object (the
takeover check), an event a refresh from Stripe's API may replace. Nothing of such an event is
written here, so giving it up costs nothing."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
import psycopg
from sqlalchemy.ext.asyncio import AsyncEngine

from broker import metrics
from broker.ingest.outcomes import DUPLICATE, Outcome, OutcomeKind
from broker.ingest.statements import WRITE
from broker.storage.eventlog import LicenseEvent, log_entry
from broker.storage.licenses import initial_state
from broker.stripe_ledger.binding import resolve
from broker.stripe_ledger.ledger import CUSTOMER_KINDS, OLDER, LicenseRules, StripeObject, line_items_id, merge
from broker.stripe_ledger.objects import Reported, needs_invoice_payments

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
    event: Mapping[str, Any]
    raw: bytes | None
    reported: Reported
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


@dataclass(slots=True)
class _Writes:
    """The rows one transaction writes, as the WRITE statement's JSON documents (one parameter per
    table: Postgres parses them in C, where arrays of JSON text would be escaped one by one here).
    The raw bodies are embedded as they are (orjson.Fragment), and stored as they are."""

    now: datetime
    events: list[dict[str, Any]] = field(default_factory=list)
    objects: dict[str, StripeObject] = field(default_factory=dict)
    links: set[tuple[str, str]] = field(default_factory=set)
    bindings: dict[str, str] = field(default_factory=dict)
    licenses: dict[str, tuple[int, Any]] = field(default_factory=dict)  # changed: seq, state
    created: dict[str, tuple[int, Any]] = field(default_factory=dict)  # new: seq, state
    log: list[dict[str, Any]] = field(default_factory=list)

    def license(self, license_id: str, seq: int, state: Any) -> None:
        (self.created if license_id in self.created else self.licenses)[license_id] = (seq, state)

    def params(self) -> dict[str, Any]:
        return {
            "now": self.now,
            "n": len(self.events),
            "n_bindings": len(self.bindings),
            "n_created": len(self.created),
            "events": _json(self.events),
            "objects": _json([o.row() for o in self.objects.values()]),
            "links": _json([{"object_id": a, "linked_id": b} for a, b in sorted(self.links)]),
            "bindings": _json([{"stripe_id": i, "license_id": lid} for i, lid in self.bindings.items()]),
            "licenses": _license_rows(self.licenses),
            "created": _license_rows(self.created),
            "log": _json(self.log),
        }


@dataclass(slots=True)
class _Read:
    """What round trip 1 returned, updated in memory as each event of the batch is decided."""

    licenses: dict[str, tuple[int, Any]]  # locked: seq and state
    recorded: set[str]  # event ids recorded before
    existing: set[str]  # named licenses that exist
    entangled: set[str]  # unbound ids an object or a link holds already
    members: dict[str, str]  # every id bound to a license the batch's ids are bound to or name
    objects: dict[str, StripeObject]
    by_customer: dict[str, list[StripeObject]]  # customer-level objects


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
        self._waiting.append(_Request(event, raw, reported, future))
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
        read = await self._read(pg, batch)
        writes = _Writes(datetime.now(UTC))
        results = [self._decide(request, read, writes) for request in batch]
        if not writes.events:
            return results  # nothing to write: the caller rolls back
        # COMMIT as a statement of the pipeline: connection.commit() would Sync once more.
        async with pg.pipeline():
            await pg.execute(WRITE, writes.params())
            await pg.execute("COMMIT")
        return results

    async def _read(self, pg: psycopg.AsyncConnection[Any], batch: list[_Request]) -> _Read:
        own = list(dict.fromkeys(o.id for r in batch for o in r.reported.objects))
        ids = sorted({i for r in batch for i in r.reported.ids})
        named = sorted({lid for r in batch if (lid := r.reported.license_id)})
        customers = sorted({c for r in batch for o in r.reported.objects if (c := o.customer)})
        lock_ids = sorted(set(ids) | {c for r in batch if (c := r.reported.customer)})
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
                    "event_ids": [r.event["id"] for r in batch],
                },
            )
        first, second = await locked.fetchone(), await found.fetchone()
        assert first is not None and second is not None
        _, licenses_text = first
        recorded, existing, entangled, members_text, objects_text = second
        objects: dict[str, StripeObject] = {}
        by_customer: dict[str, list[StripeObject]] = {}
        for oid, kind, version, rank, state, customer, links in orjson.loads(objects_text or "[]"):
            obj = objects[oid] = StripeObject(oid, kind, version, rank, state, customer, frozenset(links or ()))
            if customer and kind in CUSTOMER_KINDS:
                by_customer.setdefault(customer, []).append(obj)
        return _Read(
            licenses={lid: (seq, state) for lid, seq, state in orjson.loads(licenses_text or "[]")},
            recorded=set(recorded or ()),
            existing=set(existing or ()),
            entangled=set(entangled or ()),
            members=orjson.loads(members_text or "{}"),
            objects=objects,
            by_customer=by_customer,
        )

    def _decide(self, request: _Request, read: _Read, writes: _Writes) -> Outcome | None:
        """One event on the objects as the events before it in the batch left them; its rows go to
        `writes`. None: the general path decides it (nothing of it written)."""
        event, reported = request.event, request.reported
        own = [o.id for o in reported.objects]
        if event["id"] in read.recorded:
            return DUPLICATE
        known = {i: lid for i in reported.ids if (lid := read.members.get(i)) is not None}
        new = reported.ids - known.keys()
        if new and (
            # A new binding here binds the event's ids and nothing else: ids an object or a link
            # holds already (a walk to pending objects), customer-level objects waiting for a
            # license of their customer, and the Payment Link takeover check are the general path's.
            new & read.entangled
            or (reported.customer and read.by_customer.get(reported.customer))
            or (reported.by_reference and not known.keys() & set(own))
        ):
            return None
        resolution = resolve(reported, known)
        license_id = resolution.license_id
        if license_id is None or resolution.rejected is not None:
            return None  # pending, or rejected: the general path records why
        created = license_id not in read.licenses
        if not created:
            seq, held_state = read.licenses[license_id]
        elif license_id == reported.license_id and license_id not in read.existing:
            seq, held_state = 0, initial_state()
        else:
            return None  # bound after the license rows were locked
        held, proposed = read.objects.get(own[0]), reported.primary
        if (
            self.refreshes
            and held is not None
            and proposed.version <= held.version
            and dict(held.state) != dict(proposed.state)
        ):
            return None
        if self.rules.needs_line_items(proposed) and line_items_id(proposed.id) not in read.objects:
            return None  # line items to read from Stripe's API (broker.ingest.general)
        if self.refreshes and needs_invoice_payments(event, proposed, held):
            return None  # invoice payments to read from Stripe's API (broker.ingest.general)

        if created:
            writes.created[license_id] = (seq, held_state)
        for i in sorted(new):
            read.members[i] = writes.bindings[i] = license_id
        verdicts = set()
        for obj in reported.objects:
            before = read.objects.get(obj.id)
            merged, verdict = merge(before, obj)
            verdicts.add(verdict)
            if merged is not None:
                read.objects[obj.id] = writes.objects[obj.id] = merged
                writes.links |= {(obj.id, i) for i in obj.links - (before.links if before else frozenset())}
        bound = [read.objects[i] for i, lid in read.members.items() if lid == license_id and i in read.objects]
        license_customers = {o.customer for o in bound if o.customer}
        customer_level = [
            o
            for c in sorted(license_customers)
            for o in read.by_customer.get(c, ())
            if read.members.get(o.id) != license_id
        ]
        state = self.rules.derive({**{o.id: o for o in customer_level}, **{o.id: o for o in bound}}.values())
        changed = state != held_state

        occurred_at = datetime.fromtimestamp(event["created"], UTC)
        kind = OutcomeKind.APPLIED if changed else (OutcomeKind.STALE if verdicts == {OLDER} else OutcomeKind.UNCHANGED)
        appended: tuple[LicenseEvent, ...] = ()
        if changed:
            seq += 1
            entry, logged = log_entry(
                license_id,
                seq,
                state,
                stripe_event_id=event["id"],
                stripe_event_type=event["type"],
                occurred_at=occurred_at,
                recorded_at=writes.now,
            )
            appended = (logged,)
            writes.license(license_id, seq, state)
            writes.log.append(entry)
        read.licenses[license_id] = (seq, state)  # a new license's too
        writes.events.append(
            {
                "id": event["id"],
                "type": event["type"],
                "created": event["created"],
                "livemode": bool(event.get("livemode")),
                "outcome": kind.value,
                "license_id": license_id,
                "object_id": own[0],
                "reason": None,
                # The verified body, embedded as it is (it parsed as JSON).
                "payload": orjson.Fragment(request.raw) if request.raw is not None else event,
            }
        )
        read.recorded.add(event["id"])
        return Outcome(kind, license_id, appended, object_id=own[0])
