"""The common ingest on Postgres: an event whose objects and links are all bound already, in two
network round trips and three statements (BEGIN and COMMIT ride in the same pipelines), through
psycopg directly with statements that are the same text every time (prepared after a few uses).

    round trip 1: BEGIN; LOCK (the id locks, the bindings, the license row locked); READ (the
                  license's ledger objects and whether the event was recorded before); Sync
    Python:       broker.binding.resolve, broker.ledger.merge and LicenseRules.derive, unchanged
    round trip 2: WRITE (the event with its outcome, objects, links, license row, log entry);
                  COMMIT; Sync

Why READ is its own statement: under READ COMMITTED a statement reads the snapshot taken when it
started, before any lock it waits for inside. LOCK's snapshot may miss what the holder of an id
lock or of the license row lock committed meanwhile, so it only reads what cannot change once
seen (bindings are set once and never moved; the locked license row is returned as it is after the
wait). READ starts after every lock is held, so it sees each committed object.

Anything else goes to the general path (webhook.ingest, SQLAlchemy), which takes the same locks in
the same order (event ids, then the license row): an id not bound yet (a new binding may bind
pending objects), a customer-level event, an event a refresh from Stripe's API may replace.
Nothing is written before the decision, so giving up is a rollback.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import orjson
import psycopg
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from broker.binding import resolve
from broker.eventlog import LicenseEvent, encode_event
from broker.ledger import CUSTOMER_KINDS, OLDER, LicenseRules, StripeObject, merge
from broker.stripe_objects import Reported

_CUSTOMER_KINDS = "{" + ",".join(sorted(CUSTOMER_KINDS)) + "}"

# The license the event's own objects are bound to: the first of them that is bound (as resolve).
_TARGET = """
    SELECT b.license_id FROM stripe_bindings b
    JOIN unnest(%(own)s::text[]) WITH ORDINALITY AS o(id, n) ON o.id = b.stripe_id
    ORDER BY o.n LIMIT 1
"""

# The advisory locks of the event's ids (sorted, as LedgerStore.lock_ids), then the license row.
# LockRows sits above the join with `locked`, whose aggregate takes every id lock first, so the
# order is the general path's: ids, then the license.
LOCK = f"""
WITH locked AS (
    SELECT count(pg_advisory_xact_lock(hashtextextended(k, 0))) AS n FROM unnest(%(lock_ids)s::text[]) AS k
),
bound AS (
    SELECT stripe_id, license_id FROM stripe_bindings WHERE stripe_id = ANY(%(ids)s::text[])
),
license AS (
    SELECT l.id, l.seq, l.state::text AS state
    FROM licenses l, locked
    WHERE l.id = ({_TARGET}) AND locked.n >= 0
    FOR UPDATE OF l
)
SELECT (SELECT n FROM locked), (SELECT array_agg(stripe_id) FROM bound), (SELECT array_agg(license_id) FROM bound),
       license.id, license.seq, license.state
FROM (SELECT 1) AS one LEFT JOIN license ON true
"""

# Every object of the license, the event's own objects (with their links), and the customer-level
# objects of any customer they or the event name (the caller keeps those of the license's).
READ = f"""
WITH target AS ({_TARGET}),
bound AS (
    SELECT stripe_id FROM stripe_bindings WHERE license_id = (SELECT license_id FROM target)
),
wanted AS (
    SELECT stripe_id AS id FROM bound
    UNION SELECT unnest(%(own)s::text[])
    UNION SELECT o.id FROM stripe_objects o
    WHERE o.kind = ANY('{_CUSTOMER_KINDS}'::text[]) AND o.customer IN (
        SELECT c.customer FROM stripe_objects c WHERE c.id IN (SELECT stripe_id FROM bound) AND c.customer IS NOT NULL
        UNION SELECT unnest(%(customers)s::text[])
    )
)
SELECT
    EXISTS (SELECT 1 FROM stripe_events WHERE id = %(event_id)s),
    (SELECT license_id FROM target),
    (SELECT json_agg(json_build_array(
        o.id, o.kind, o.version, o.rank, o.state, o.customer, o.id IN (SELECT stripe_id FROM bound),
        CASE WHEN o.id = ANY(%(own)s::text[])
             THEN (SELECT array_agg(k.linked_id) FROM stripe_links k WHERE k.object_id = o.id) END
    )) FROM stripe_objects o JOIN wanted w ON w.id = o.id)::text
"""

# The event with its outcome, and what the rules decided. ON CONFLICT: should another delivery of
# the event have been recorded after all, nothing else is written and the caller answers duplicate.
WRITE = """
WITH event AS (
    INSERT INTO stripe_events (id, type, created, livemode, outcome, license_id, object_id, payload, received_at)
    VALUES (%(event_id)s, %(type)s, %(created)s, %(livemode)s, %(outcome)s, %(license_id)s, %(object_id)s,
            %(payload)s::json, %(now)s)
    ON CONFLICT (id) DO NOTHING
    RETURNING id
),
objects AS (
    INSERT INTO stripe_objects (id, kind, version, rank, customer, state, updated_at)
    SELECT o.id, o.kind, o.version, o.rank, o.customer, o.state::json, %(now)s
    FROM unnest(%(o_ids)s::text[], %(o_kinds)s::text[], %(o_versions)s::int8[], %(o_ranks)s::int8[],
                %(o_customers)s::text[], %(o_states)s::text[]) AS o(id, kind, version, rank, customer, state)
    WHERE EXISTS (SELECT 1 FROM event)
    ON CONFLICT (id) DO UPDATE SET kind = excluded.kind, version = excluded.version, rank = excluded.rank,
        customer = excluded.customer, state = excluded.state, updated_at = excluded.updated_at
),
links AS (
    INSERT INTO stripe_links (object_id, linked_id)
    SELECT a, b FROM unnest(%(l_from)s::text[], %(l_to)s::text[]) AS x(a, b)
    WHERE EXISTS (SELECT 1 FROM event)
    ON CONFLICT DO NOTHING
),
license AS (
    UPDATE licenses SET seq = %(seq)s, status = %(status)s, entitled = %(entitled)s, state = %(state)s::json,
        stripe_customer_id = %(customer)s,
        stripe_subscription_id = %(subscription)s, updated_at = %(now)s
    WHERE id = %(license_id)s AND %(changed)s AND EXISTS (SELECT 1 FROM event)
),
log AS (
    INSERT INTO subscription_event_logs
        (license_id, seq, stripe_event_id, stripe_event_type, status, entitled, data, occurred_at, recorded_at)
    SELECT %(license_id)s, %(seq)s, %(event_id)s, %(type)s, %(status)s, %(entitled)s, %(data)s, %(occurred_at)s,
           %(now)s
    WHERE %(changed)s AND EXISTS (SELECT 1 FROM event)
)
SELECT count(*) FROM event
"""

# What the general path's Outcome needs, without importing it (webhook.ingest imports this).
Result = tuple[str, str | None, LicenseEvent | None, str]  # kind, license_id, appended, object_id


def _db_error(exc: psycopg.Error) -> sa.exc.DBAPIError:
    """The SQLAlchemy exception the general path would have raised, for the caller's handlers."""
    kind = {psycopg.DataError: sa.exc.DataError, psycopg.IntegrityError: sa.exc.IntegrityError}
    cls = next((v for k, v in kind.items() if isinstance(exc, k)), sa.exc.OperationalError)
    return cls("fast ingest", None, exc)


class FastIngest:
    def __init__(self, engine: AsyncEngine, rules: LicenseRules, refreshes: bool) -> None:
        self.engine = engine
        self.rules = rules
        # With STRIPE_API_KEY an event that is not newer than its object is re-read from Stripe:
        # the general path does that.
        self.refreshes = refreshes

    @staticmethod
    def eligible(reported: Reported) -> bool:
        return not reported.customer_level

    async def apply(self, event: Mapping[str, Any], raw: bytes | None, reported: Reported) -> Result | None:
        """The outcome, committed; None to take the general path (nothing written)."""
        async with self.engine.connect() as conn:
            pooled = await conn.get_raw_connection()
            pg: psycopg.AsyncConnection[Any] = pooled.driver_connection  # type: ignore[assignment]
            # BEGIN is a statement of the first pipeline: psycopg's implicit BEGIN would be a round
            # trip of its own (it Syncs after it). The pool gets the connection back as it lent it.
            await pg.set_autocommit(True)
            try:
                return await self._apply(pg, event, raw, reported)
            except psycopg.Error as exc:
                raise _db_error(exc) from exc
            finally:
                try:
                    await pg.rollback()  # nothing to do unless _apply stopped in the transaction
                    await pg.set_autocommit(False)
                except psycopg.Error:
                    await conn.invalidate()

    async def _apply(
        self, pg: psycopg.AsyncConnection[Any], event: Mapping[str, Any], raw: bytes | None, reported: Reported
    ) -> Result | None:
        own = [o.id for o in reported.objects]
        ids = sorted(reported.ids)
        lock_ids = sorted(set(ids) | ({reported.customer} if reported.customer else set()))
        customers = sorted({o.customer for o in reported.objects if o.customer})
        # One Sync for BEGIN, LOCK and READ (a fetch inside the block would Sync once more).
        async with pg.pipeline():
            await pg.execute("BEGIN")
            locked = await pg.execute(LOCK, {"lock_ids": lock_ids, "ids": ids, "own": own})
            read = await pg.execute(READ, {"own": own, "customers": customers, "event_id": event["id"]})
        first, second = await locked.fetchone(), await read.fetchone()
        assert first is not None and second is not None
        _, bound_ids, bound_licenses, license_id, seq, state_text = first
        seen, target, objects_text = second
        bindings = dict(zip(bound_ids or (), bound_licenses or (), strict=True))
        if seen:
            await pg.rollback()
            return ("duplicate", None, None, own[0])
        if license_id is None or target != license_id or not reported.ids <= bindings.keys():
            await pg.rollback()
            return None
        resolution = resolve(reported, bindings)
        assert resolution.license_id == license_id and resolution.rejected is None

        current: dict[str, StripeObject] = {}
        bound: dict[str, StripeObject] = {}  # the license's objects, as derive reads them
        customer_level: list[StripeObject] = []
        for oid, kind, version, rank, state, customer, of_license, links in orjson.loads(objects_text or "[]"):
            obj = StripeObject(oid, kind, version, rank, state, customer, frozenset(links or ()))
            if oid in own:
                current[oid] = obj
            if of_license:
                bound[oid] = obj
            elif kind in CUSTOMER_KINDS:
                customer_level.append(obj)
        held, proposed = current.get(own[0]), reported.primary
        if (
            self.refreshes
            and held is not None
            and proposed.version <= held.version
            and dict(held.state) != dict(proposed.state)
        ):
            await pg.rollback()
            return None

        verdicts = set()
        saves: list[StripeObject] = []
        new_links: set[tuple[str, str]] = set()
        for obj in reported.objects:
            before = current.get(obj.id)
            merged, verdict = merge(before, obj)
            verdicts.add(verdict)
            if merged is not None:
                saves.append(merged)
                new_links |= {(obj.id, i) for i in obj.links - (before.links if before else frozenset())}
                if bindings.get(obj.id) == license_id:
                    bound[obj.id] = merged
        license_customers = {o.customer for o in bound.values() if o.customer}
        derived = {**{o.id: o for o in customer_level if o.customer in license_customers}, **bound}
        state = self.rules.derive(derived.values())
        changed = state != orjson.loads(state_text)

        now = datetime.now(UTC)
        occurred_at = datetime.fromtimestamp(event["created"], UTC)
        stale = verdicts == {OLDER}
        kind = "applied" if changed else ("stale" if stale else "unchanged")
        data = b""
        if changed:
            seq += 1
            data = encode_event(
                license_id,
                seq,
                state,
                stripe_event_id=event["id"],
                stripe_event_type=event["type"],
                occurred_at=occurred_at,
                recorded_at=now,
            )
        links = sorted(new_links)
        params = {
            "event_id": event["id"],
            "type": event["type"],
            "created": event["created"],
            "livemode": bool(event.get("livemode")),
            "outcome": kind,
            "license_id": license_id,
            "object_id": own[0],
            "payload": (raw if raw is not None else orjson.dumps(event)).decode(),
            "now": now,
            "o_ids": [o.id for o in saves],
            "o_kinds": [o.kind for o in saves],
            "o_versions": [o.version for o in saves],
            "o_ranks": [o.rank for o in saves],
            "o_customers": [o.customer for o in saves],
            "o_states": [orjson.dumps(dict(o.state)).decode() for o in saves],
            "l_from": [a for a, _ in links],
            "l_to": [b for _, b in links],
            "changed": changed,
            "seq": seq,
            "status": state["status"],
            "entitled": state["entitled"],
            "state": orjson.dumps(state).decode(),
            "customer": state["customer"],
            "subscription": state["subscription"],
            "data": data.decode(),
            "occurred_at": occurred_at,
        }
        # COMMIT as a statement of the pipeline: connection.commit() would Sync once more.
        async with pg.pipeline():
            written = await pg.execute(WRITE, params)
            await pg.execute("COMMIT")
        row = await written.fetchone()
        if row is None or row[0] == 0:
            return ("duplicate", None, None, own[0])
        appended = LicenseEvent(license_id, seq, data, now.timestamp()) if changed else None
        return (kind, license_id, appended, own[0])
