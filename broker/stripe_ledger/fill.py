"""Fill the ledger tables from the stored Stripe events (migration 0003, `license-broker rebuild`).

What was read from Stripe's API (STRIPE_API_KEY: refreshed snapshots, a purchase's line items, a
complete entitlement list) is in no stored event: those rows (rank FETCHED_RANK and above) are
kept and folded with the events, in which they win the ties of their second as they did live."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

import orjson
import sqlalchemy as sa

from broker.storage.schema import stripe_bindings, stripe_events, stripe_links, stripe_objects
from broker.stripe_ledger.binding import MemoryLedger
from broker.stripe_ledger.kinds import BROKER_KINDS
from broker.stripe_ledger.ledger import FETCHED_RANK, StripeObject

_BATCH = 1000


def fold_stored(conn: sa.Connection, keep: Callable[[Mapping[str, Any]], bool] = lambda _: True) -> MemoryLedger:
    """Every stored event, in the order the webhook received them, folded into a MemoryLedger that
    starts with the rows read from Stripe's API."""
    ledger = MemoryLedger()
    ledger.seed(read_from_api(conn))
    t = stripe_events
    query = sa.select(t.c.payload).order_by(t.c.received_at, t.c.id)
    for (payload,) in conn.execute(query):
        event = orjson.loads(payload) if isinstance(payload, str | bytes) else payload
        if isinstance(event, dict) and keep(event):
            ledger.apply(event)
    return ledger


def read_from_api(conn: sa.Connection) -> list[StripeObject]:
    o, k = stripe_objects, stripe_links
    rows = conn.execute(sa.select(o).where(o.c.rank >= FETCHED_RANK).order_by(o.c.id)).all()
    links: dict[str, set[str]] = {}
    if rows:
        query = sa.select(k).where(k.c.object_id.in_([r.id for r in rows]))
        for link in conn.execute(query):
            links.setdefault(link.object_id, set()).add(link.linked_id)
    return [
        StripeObject(r.id, r.kind, r.version, r.rank, r.state, r.customer, frozenset(links.get(r.id, ()))) for r in rows
    ]


def fill_ledger(
    conn: sa.Connection, now: datetime, keep: Callable[[Mapping[str, Any]], bool] = lambda _: True
) -> MemoryLedger:
    """Replace the ledger's rows with the fold of the stored events (and the broker's own objects,
    which no Stripe event makes, as they are)."""
    ledger = fold_stored(conn, keep)
    held, bound = stripe_objects, stripe_bindings
    own = sa.select(held).where(held.c.kind.in_(sorted(BROKER_KINDS)))
    for row in conn.execute(own):
        ledger.objects[row.id] = StripeObject(row.id, row.kind, row.version, row.rank, row.state, row.customer)
    for row in conn.execute(sa.select(bound).where(bound.c.stripe_id.in_(own.with_only_columns(held.c.id)))):
        ledger.bindings[row.stripe_id] = row.license_id
    for table in (stripe_bindings, stripe_links, stripe_objects):
        conn.execute(table.delete())
    objects = [{**o.row(), "updated_at": now} for o in ledger.objects.values()]
    links = [{"object_id": a, "linked_id": b} for a, b in sorted(ledger.links())]
    bindings = [{"stripe_id": k, "license_id": v, "bound_at": now} for k, v in sorted(ledger.bindings.items())]
    for table, rows in ((stripe_objects, objects), (stripe_links, links), (stripe_bindings, bindings)):
        for start in range(0, len(rows), _BATCH):
            conn.execute(table.insert(), rows[start : start + _BATCH])
    return ledger
