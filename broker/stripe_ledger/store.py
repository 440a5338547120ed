"""The ledger's rows (stripe_objects, stripe_links, stripe_bindings), inside the caller's transaction:
`LedgerStore` (the statements) and `SqlRows` (them as broker.stripe_ledger.binding.AsyncLedgerRows,
what the binding walks run on in production)."""

from __future__ import annotations

from collections.abc import Iterable
from collections.abc import Set as AbstractSet
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from broker.storage.db import upsert_into
from broker.storage.schema import stripe_bindings, stripe_links, stripe_objects
from broker.stripe_ledger import binding
from broker.stripe_ledger.binding import Lock, run_async
from broker.stripe_ledger.kinds import CUSTOMER_KINDS
from broker.stripe_ledger.ledger import StripeObject

_CUSTOMER_KINDS = sorted(CUSTOMER_KINDS)


def _object(row: Any, links: Iterable[str] = ()) -> StripeObject:
    return StripeObject(row.id, row.kind, row.version, row.rank, row.state, row.customer, frozenset(links))


class LocksBusy(Exception):
    """Ids found after the first locks are held, and locked by another transaction: waiting for
    them could deadlock (ids are locked in sorted order). The caller rolls back and starts again
    holding them from the start (`Ingestor`)."""

    def __init__(self, ids: set[str]) -> None:
        super().__init__(f"{len(ids)} linked ids locked by another transaction")
        self.ids = ids


class LedgerStore:
    @staticmethod
    async def lock_ids(conn: AsyncConnection, ids: Iterable[str], *, wait: bool = True) -> None:
        """Serialise the events that share a Stripe id (or a customer), so that an object and the
        event that binds its id cannot miss each other's uncommitted rows. Taken in sorted order;
        SQLite needs none, it serialises every writer. `wait=False`: ids found later, while other
        locks are held, are only taken if free (else LocksBusy), so that no two transactions wait
        for each other's ids."""
        keys = sorted({i for i in ids if i})
        if not keys or conn.dialect.name != "postgresql":
            return
        if wait:
            await conn.execute(
                sa.text(
                    "SELECT count(pg_advisory_xact_lock(hashtextextended(k, 0))) FROM unnest(CAST(:ids AS text[])) k"
                ),
                {"ids": keys},
            )
            return
        busy = await conn.scalar(
            sa.text(
                "SELECT count(*) FROM unnest(CAST(:ids AS text[])) k"
                " WHERE NOT pg_try_advisory_xact_lock(hashtextextended(k, 0))"
            ),
            {"ids": keys},
        )
        if busy:
            raise LocksBusy(set(keys))

    @staticmethod
    async def objects(conn: AsyncConnection, ids: Iterable[str]) -> dict[str, StripeObject]:
        """The rows of these ids, with their links."""
        wanted = sorted(set(ids))
        if not wanted:
            return {}
        t, links = stripe_objects, stripe_links
        rows = (await conn.execute(sa.select(t).where(t.c.id.in_(wanted)))).all()
        linked: dict[str, list[str]] = {}
        for row in (await conn.execute(sa.select(links).where(links.c.object_id.in_(wanted)))).all():
            linked.setdefault(row.object_id, []).append(row.linked_id)
        return {row.id: _object(row, linked.get(row.id, ())) for row in rows}

    @staticmethod
    async def save(conn: AsyncConnection, obj: StripeObject, *, new_links: Iterable[str]) -> None:
        values = {**obj.row(), "updated_at": datetime.now(UTC)}
        insert = upsert_into(conn, stripe_objects).values(**values)
        await conn.execute(
            insert.on_conflict_do_update(index_elements=["id"], set_={k: v for k, v in values.items() if k != "id"})
        )
        rows = [{"object_id": obj.id, "linked_id": linked} for linked in sorted(set(new_links))]
        if rows:
            await conn.execute(upsert_into(conn, stripe_links).values(rows).on_conflict_do_nothing())

    @staticmethod
    async def bindings(conn: AsyncConnection, ids: Iterable[str]) -> dict[str, str]:
        wanted = sorted(set(ids))
        if not wanted:
            return {}
        t = stripe_bindings
        rows = await conn.execute(sa.select(t.c.stripe_id, t.c.license_id).where(t.c.stripe_id.in_(wanted)))
        return {row.stripe_id: row.license_id for row in rows}

    @staticmethod
    async def bind(
        conn: AsyncConnection, license_id: str, start: Iterable[str], known: dict[str, str], *, wait: bool = True
    ) -> set[str]:
        """`broker.stripe_ledger.binding.bind` on these tables (the walk, its guarantee and its
        invariant are there): bind `start` and every id linked to it, transitively, that no license
        holds yet; the ids bound just now. `known`: bindings already read (and locked) in this
        transaction. The ids of `start` are locked (again: advisory locks are reentrant); ids found
        by the walk are waited for, or with `wait=False` taken only if free (else LocksBusy)."""
        return await run_async(binding.bind(license_id, set(start), known), SqlRows(conn, wait=wait))

    @staticmethod
    async def write_bindings(conn: AsyncConnection, license_id: str, ids: Iterable[str]) -> None:
        """Bind `ids` to the license; an id bound meanwhile keeps its license (ON CONFLICT)."""
        fresh = sorted(set(ids))
        if fresh:
            now = datetime.now(UTC)
            rows = [{"stripe_id": i, "license_id": license_id, "bound_at": now} for i in fresh]
            await conn.execute(upsert_into(conn, stripe_bindings).values(rows).on_conflict_do_nothing())

    @staticmethod
    async def neighbours(conn: AsyncConnection, ids: Iterable[str]) -> set[str]:
        """Every id linked to one of `ids`, either way."""
        wanted = sorted(set(ids))
        if not wanted:
            return set()
        t = stripe_links
        query = sa.union(
            sa.select(t.c.linked_id.label("id")).where(t.c.object_id.in_(wanted)),
            sa.select(t.c.object_id.label("id")).where(t.c.linked_id.in_(wanted)),
        )
        return {row.id for row in await conn.execute(query)}

    @staticmethod
    async def customers_of(conn: AsyncConnection, license_id: str) -> set[str]:
        o, b = stripe_objects, stripe_bindings
        query = (
            sa.select(o.c.customer)
            .join(b, b.c.stripe_id == o.c.id)
            .where(b.c.license_id == license_id, o.c.customer.is_not(None))
            .distinct()
        )
        return {str(c) for c in await conn.scalars(query)}

    @staticmethod
    async def licenses_of_customer(conn: AsyncConnection, customer: str) -> list[str]:
        o, b = stripe_objects, stripe_bindings
        query = (
            sa.select(b.c.license_id)
            .join(o, b.c.stripe_id == o.c.id)
            .where(o.c.customer == customer, o.c.kind.not_in(_CUSTOMER_KINDS))
            .distinct()
        )
        return sorted(str(x) for x in await conn.scalars(query))

    @staticmethod
    async def license_objects(conn: AsyncConnection, license_id: str) -> list[StripeObject]:
        """Every object bound to the license, and the customer-level objects of its customers."""
        o, b = stripe_objects, stripe_bindings
        own = sa.select(b.c.stripe_id).where(b.c.license_id == license_id)
        customers = sa.select(o.c.customer).where(o.c.id.in_(own), o.c.customer.is_not(None))
        query = sa.select(o).where(
            sa.or_(o.c.id.in_(own), sa.and_(o.c.kind.in_(_CUSTOMER_KINDS), o.c.customer.in_(customers)))
        )
        return [_object(row) for row in await conn.execute(query)]


class SqlRows:
    """AsyncLedgerRows on the ledger's tables, inside the caller's transaction (the rows the walks
    of broker.stripe_ledger.binding run on in production; tests/test_ledger_rows.py checks that
    they answer as MemoryRows on the same rows).

    Locks (Postgres): a binding is read only under its id's lock, so that an object and the event
    that binds its id cannot miss each other's uncommitted rows. Ids read with lock "held" are
    locked by the caller already; "given" ones are waited for; "found" ones (reached by links,
    other locks held) are waited for when `wait`, else taken only if free (LocksBusy: see
    LedgerStore.lock_ids)."""

    def __init__(self, conn: AsyncConnection, *, wait: bool = True) -> None:
        self.conn = conn
        self.wait = wait

    async def bindings(self, ids: AbstractSet[str], lock: Lock = "held") -> dict[str, str]:
        if lock != "held":
            await LedgerStore.lock_ids(self.conn, ids, wait=self.wait or lock == "given")
        return await LedgerStore.bindings(self.conn, ids)

    async def neighbours(self, ids: AbstractSet[str]) -> set[str]:
        return await LedgerStore.neighbours(self.conn, ids)

    async def objects(self, ids: AbstractSet[str]) -> dict[str, StripeObject]:
        return await LedgerStore.objects(self.conn, ids)

    async def customers_of(self, license_id: str) -> set[str]:
        return await LedgerStore.customers_of(self.conn, license_id)

    async def licenses_of_customer(self, customer: str) -> set[str]:
        return set(await LedgerStore.licenses_of_customer(self.conn, customer))

    async def license_objects(self, license_id: str) -> dict[str, StripeObject]:
        return {o.id: o for o in await LedgerStore.license_objects(self.conn, license_id)}

    async def write_object(self, obj: StripeObject, new_links: AbstractSet[str]) -> None:
        await LedgerStore.save(self.conn, obj, new_links=new_links)

    async def write_bindings(self, license_id: str, ids: AbstractSet[str]) -> None:
        await LedgerStore.write_bindings(self.conn, license_id, ids)
