"""What becomes of the checkouts the broker made (broker.licensing.checkout), in one owned
background task per stream process (every process may: each step is decided in the database).

- settled: a webhook recorded the session as completed (paid, or paying by a method that settles
  later): the row goes, the license is the buyer's;
- due: unpaid CHECKOUT_PENDING_TTL after it was made: the session is expired at Stripe (best
  effort; one process claims it), and Stripe's `checkout.session.expired` webhook is waited for up
  to GRACE, so that it does not arrive after the license is gone and make it again. Stripe saying
  the session was completed after all puts it back to wait for its webhooks;
- removed: a session recorded as expired (by that webhook, by Stripe's own expiry, or by the
  development page's Cancel), or waited for past GRACE: a pending license (made for the checkout)
  is deleted with everything of it, its machine released (its stream ends, its token is refused:
  what tells the app that the checkout is over); a license that existed before (a trial, a lapsed
  license) keeps everything but the row. A license that is entitled, or holds a completed
  session, is never deleted."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from broker import background
from broker.licensing.gateway import Gateway, GatewayRefused, GatewayUnavailable
from broker.licensing.machines import Machines
from broker.licensing.metrics import CHECKOUTS_CLOSED, RELEASED
from broker.licensing.store import utc
from broker.storage.schema import (
    checkouts,
    license_keys,
    licenses,
    machines,
    stripe_bindings,
    stripe_links,
    stripe_objects,
    subscription_event_logs,
)
from broker.stripe_ledger.store import LedgerStore

log = logging.getLogger("broker.licensing")

# Checkout Session states a webhook records (broker.stripe_ledger.objects): completed ones are the buyer's.
COMPLETED = ("paid", "unpaid", "failed")
BATCH = 100


def sweep_interval(ttl: float) -> float:
    # An expired session's webhook is written by a webhook process, which cannot wake this task:
    # the app that still waits learns the checkout is over at the next pass, so a pass is due every
    # few seconds (one indexed query on a table of unpaid checkouts: cheap at any rate here).
    return min(5.0, max(0.25, ttl / 8))


def grace(ttl: float) -> float:
    """How long the expired webhook is waited for once Stripe was asked to expire a session."""
    return min(300.0, ttl)


class PendingCheckouts:
    def __init__(self, engine: AsyncEngine, gateway: Gateway, machines_: Machines, *, ttl: float) -> None:
        self.engine = engine
        self.gateway = gateway
        self.machines = machines_
        self.ttl = ttl
        self.interval = sweep_interval(ttl)
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="pending-checkouts")

    async def close(self) -> None:
        """Idempotent."""
        await background.stop(self._task)
        self._task = None

    def wake(self) -> None:
        """Look now (development mode's Cancel has just expired a session)."""
        self._wake.set()

    async def sweep(self, now: datetime | None = None) -> int:
        """One pass: settle, expire what is due, remove what is over; how many checkouts closed."""
        now = now or datetime.now(UTC)
        closed = await self._settle()
        await self._expire_due(now)
        closed += await self._remove_over(now)
        return closed

    async def _settle(self) -> int:
        c, o = checkouts, stripe_objects
        completed = sa.select(o.c.id).where(o.c.kind == "checkout", _status(o).in_(COMPLETED))
        async with self.engine.begin() as conn:
            done = (await conn.execute(c.delete().where(c.c.id.in_(completed)).returning(c.c.id))).all()
        if done:
            CHECKOUTS_CLOSED.labels("paid").inc(len(done))
        return len(done)

    async def _expire_due(self, now: datetime) -> None:
        c = checkouts
        recorded = sa.exists().where(stripe_objects.c.id == c.c.id)
        query = (
            sa.select(c.c.id, c.c.closes_at)
            .where(c.c.expires_at <= now, c.c.expiring_at.is_(None), ~recorded)
            .order_by(c.c.expires_at)
            .limit(BATCH)
        )
        async with self.engine.connect() as conn:
            due = (await conn.execute(query)).all()
        for session_id, closes_at in due:
            async with self.engine.begin() as conn:
                # Claimed by one process: the others find it claimed.
                claim = c.update().where(c.c.id == session_id, c.c.expiring_at.is_(None)).values(expiring_at=now)
                if not (await conn.execute(claim)).rowcount:
                    continue
            try:
                status = await self.gateway.expire_checkout(session_id)
            except (GatewayUnavailable, GatewayRefused) as exc:
                if utc(closes_at) > now:
                    # Stripe may still take a payment for it: ask again at the next pass.
                    log.warning("checkout %s: not expired at Stripe yet (%s)", session_id, exc)
                    await self._unclaim(session_id, None)
                continue
            if status == "complete":
                # Paid after all: its webhooks settle it. Looked at again one TTL later.
                await self._unclaim(session_id, now + timedelta(seconds=self.ttl))

    async def _unclaim(self, session_id: str, expires_at: datetime | None) -> None:
        c = checkouts
        values: dict[str, Any] = {"expiring_at": None}
        if expires_at is not None:
            values["expires_at"] = expires_at
        async with self.engine.begin() as conn:
            await conn.execute(c.update().where(c.c.id == session_id).values(**values))

    async def _remove_over(self, now: datetime) -> int:
        c, o = checkouts, stripe_objects
        expired = sa.exists().where(o.c.id == c.c.id, o.c.kind == "checkout", _status(o) == "expired")
        waited = c.c.expiring_at <= now - timedelta(seconds=grace(self.ttl))
        query = sa.select(c.c.id, c.c.license_id, c.c.pending_license).where(sa.or_(expired, waited)).limit(BATCH)
        async with self.engine.connect() as conn:
            over = (await conn.execute(query)).all()
        released: list[str] = []
        for session_id, license_id, pending in over:
            async with self.engine.begin() as conn:
                if pending and await remove_pending_license(conn, license_id, session_id):
                    released.append(license_id)
                    CHECKOUTS_CLOSED.labels("removed").inc()
                elif (await conn.execute(c.delete().where(c.c.id == session_id))).rowcount:
                    CHECKOUTS_CLOSED.labels("expired").inc()
        if released:
            RELEASED.labels("checkout").inc(len(released))
            log.info("removed %d unpaid pending license(s) (CHECKOUT_PENDING_TTL)", len(released))
            # Their machines' streams end in every stream process (the notice, else the sweep).
            await self.machines.announce(released)
        return len(over)

    async def _run(self) -> None:
        failures = 0
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self.sweep()
                failures = 0
            except Exception as exc:  # the database may be down: again at the next turn
                failures += 1
                if failures == 1 or failures % 30 == 0:
                    log.warning("pending checkout cleanup failed (%d in a row): %s", failures, exc)


def _status(o: sa.Table) -> Any:
    """`state.status` of a ledger row, on Postgres and on SQLite."""
    return o.c.state["status"].as_string()


async def remove_pending_license(conn: AsyncConnection, license_id: str, session_id: str) -> bool:
    """Delete an unpaid pending license and every row of it (SQLite has no cascades); False, and
    nothing deleted but the checkout row, when it is entitled, holds a completed session or has
    another checkout open."""
    # The session's id lock first, then the license row, as the webhook takes them: a webhook of
    # this session decides either before this (and is seen below) or after it.
    await LedgerStore.lock_ids(conn, [session_id])
    locked = sa.select(licenses.c.entitled).where(licenses.c.id == license_id)
    if conn.dialect.name == "postgresql":
        locked = locked.with_for_update()
    entitled = (await conn.execute(locked)).scalar_one_or_none()
    b, o = stripe_bindings, stripe_objects
    own = sa.select(b.c.stripe_id).where(b.c.license_id == license_id)
    completed = sa.select(o.c.id).where(o.c.id.in_(own), o.c.kind == "checkout", _status(o).in_(COMPLETED))
    # Another checkout of the same pending license (Buy pressed again with its token) still open:
    # that one may yet be paid, so only this row goes; the license goes with the last of them.
    others = sa.select(checkouts.c.id).where(checkouts.c.license_id == license_id, checkouts.c.id != session_id)
    if (
        entitled
        or (await conn.execute(completed.limit(1))).first() is not None
        or ((await conn.execute(others.limit(1))).first() is not None)
    ):
        await conn.execute(checkouts.delete().where(checkouts.c.id == session_id))
        return False
    ids = [str(i) for i in await conn.scalars(own)]
    for start in range(0, len(ids), 1000):
        chunk = ids[start : start + 1000]
        await conn.execute(stripe_links.delete().where(stripe_links.c.object_id.in_(chunk)))
        await conn.execute(o.delete().where(o.c.id.in_(chunk)))
    await conn.execute(b.delete().where(b.c.license_id == license_id))
    for table in (checkouts, machines, license_keys, subscription_event_logs):
        await conn.execute(table.delete().where(table.c.license_id == license_id))
    await conn.execute(licenses.delete().where(licenses.c.id == license_id))
    return True
