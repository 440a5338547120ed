"""Trials without a card (POST /api/trials): a new license, entitled until `trial_end`, with the
asking machine activated on it. One per machine fingerprint, ever: the `trials` row is never
deleted, so a reinstall of the app (the same fingerprint) gets 409.

How a trial fits the ledger. A license is the sum of its objects; a trial is one more object of
it, of the broker's own kind (`trial:<license id>`, broker.stripe_ledger.kinds.BROKER_KINDS), bound to the
license like a Stripe object. LicenseRules.derive reads it with the rest: entitled while
`trialing`, `expired` once ended, and never deciding over anything bought. The rules stay pure
(no clock): the end is a new snapshot of the object, written when it comes.

The end. `TrialClock`, one owned task per stream process, sleeps until the earliest `ends_at` of
the running trials (one indexed query), then ends what is due: per trial one transaction that
sets `trials.ended_at` only where it is still unset, so whichever process gets there first writes
the ended snapshot, derives the license and appends its event (one row, one `seq`), and every
other finds nothing to do. The event is published after the commit and reaches every stream like
a webhook's; a reconnecting client replays it from the log. A process also learns of trials it did
not start by asking again every RESCAN seconds, so that any running process ends any trial."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from broker import background
from broker.licensing import keys
from broker.licensing.machines import MachineGrant, Machines
from broker.licensing.metrics import TRIALS_ENDED
from broker.licensing.store import Machine, MachineStore, new_license_id, utc
from broker.storage.db import upsert_into
from broker.storage.eventlog import EventLog, LicenseEvent
from broker.storage.licenses import LicenseRow, LicenseStore
from broker.storage.schema import trials
from broker.stripe_ledger.kinds import rank_of
from broker.stripe_ledger.ledger import LicenseRules, StripeObject, merge
from broker.stripe_ledger.store import LedgerStore
from broker.transports import Transport

log = logging.getLogger("broker.licensing")

# The event types of the broker's own changes (no Stripe event id).
STARTED, ENDED = "trial.started", "trial.ended"


class TrialUsed(Exception):
    """This machine has had its trial (409)."""


def trial_id(license_id: str) -> str:
    """The trial's ledger id: no Stripe id has a colon."""
    return f"trial:{license_id}"


def trial_object(license_id: str, status: str, version: int, trial_end: int) -> StripeObject:
    state = {"status": status, "trial_end": trial_end}
    return StripeObject(trial_id(license_id), "trial", version, rank_of("trial", status), state)


@dataclass(frozen=True, slots=True)
class Started:
    license_id: str
    machine: Machine
    trial_end: datetime
    grant: MachineGrant

    def body(self) -> dict[str, Any]:
        return {
            "license_id": self.license_id,
            "machine_id": self.machine.id,
            "token": self.grant.token,
            "lease": self.grant.lease,
            "trial_end": self.trial_end.isoformat(),
        }


class TrialStore:
    """The `trials` rows, inside the caller's transaction."""

    @staticmethod
    async def add(conn: AsyncConnection, digest: bytes, license_id: str, now: datetime, ends: datetime) -> bool:
        """False when the fingerprint has had a trial. Two first requests at once: the second waits
        for the first's uncommitted key, then adds nothing."""
        t = trials
        insert = upsert_into(conn, t).values(fingerprint=digest, license_id=license_id, started_at=now, ends_at=ends)
        query = insert.on_conflict_do_nothing(index_elements=["fingerprint"]).returning(t.c.license_id)
        return (await conn.execute(query)).first() is not None

    @staticmethod
    async def end(conn: AsyncConnection, license_id: str, now: datetime) -> datetime | None:
        """Mark the trial ended, if it is running and due: its end, or None (ended already, by this
        process or another, or not due). The row stays locked until the transaction ends."""
        t = trials
        query = (
            t.update()
            .where(t.c.license_id == license_id, t.c.ended_at.is_(None), t.c.ends_at <= now)
            .values(ended_at=now)
            .returning(t.c.ends_at)
        )
        ends = (await conn.execute(query)).scalar_one_or_none()
        return None if ends is None else utc(ends)

    @staticmethod
    async def due(conn: AsyncConnection, now: datetime, limit: int = 100) -> list[str]:
        t = trials
        query = (
            sa.select(t.c.license_id)
            .where(t.c.ended_at.is_(None), t.c.ends_at <= now)
            .order_by(t.c.ends_at)
            .limit(limit)
        )
        return [str(i) for i in await conn.scalars(query)]

    @staticmethod
    async def next_end(conn: AsyncConnection) -> datetime | None:
        t = trials
        found = await conn.scalar(sa.select(sa.func.min(t.c.ends_at)).where(t.c.ended_at.is_(None)))
        return None if found is None else utc(found)


class Trials:
    def __init__(
        self,
        engine: AsyncEngine,
        machines: Machines,
        transport: Transport,
        rules: LicenseRules,
        days: float | None,
        *,
        on_start: Callable[[], None] = lambda: None,
    ) -> None:
        self.engine = engine
        self.machines = machines
        self.transport = transport
        self.rules = rules
        # Seconds; None: no new trials (LICENSE_TRIAL_DAYS unset), but running ones still end.
        self.length = None if days is None else days * 86400
        self.on_start = on_start  # the clock's wake-up: a new trial may end before any it knows

    async def start(self, fingerprint: str, name: str | None = None, platform: str | None = None) -> Started:
        """A new trial license with this machine on it; TrialUsed when the fingerprint had one."""
        assert self.length is not None, "trials are off (LICENSE_TRIAL_DAYS)"
        now = datetime.now(UTC)
        # Whole seconds: the state, the lease's `exp` and the clock all say the same instant.
        ends = datetime.fromtimestamp(max(int(now.timestamp() + self.length), int(now.timestamp()) + 1), UTC)
        license_id = new_license_id()
        digest = keys.fingerprint_digest(fingerprint)
        async with self.engine.begin() as conn:
            if not await TrialStore.add(conn, digest, license_id, now, ends):
                raise TrialUsed
            row = await LicenseStore.lock(conn, license_id)
            trial = trial_object(license_id, "trialing", int(now.timestamp()), int(ends.timestamp()))
            await LedgerStore.save(conn, trial, new_links=())
            await LedgerStore.bind(conn, license_id, [trial.id], {})
            machine = await MachineStore.add(conn, license_id, digest, name, platform)
            event = await self._derive(conn, row_license=row, license_id=license_id, kind=STARTED, at=now)
        if event is not None:
            await self._publish(event)
        self.on_start()
        grant = await self.machines.grant(license_id, machine.id, fingerprint)
        log.info("license %s: trial started for machine %s, ends %s", license_id, machine.id, ends.isoformat())
        return Started(license_id, machine, ends, grant)

    async def end(self, license_id: str, now: datetime | None = None) -> LicenseEvent | None:
        """End the trial if it is due and still running: its license's event (None when another
        process ended it first, or it is not due)."""
        now = now or datetime.now(UTC)
        async with self.engine.begin() as conn:
            ends = await TrialStore.end(conn, license_id, now)
            if ends is None:
                return None
            # The license row before the object (as the webhook: its row lock, then its objects),
            # so that a webhook of the same license derives either before this or after it.
            row = await LicenseStore.lock(conn, license_id)
            tid = trial_id(license_id)
            held = (await LedgerStore.objects(conn, [tid])).get(tid)
            version = max(held.version if held else 0, int(ends.timestamp()))
            merged, _ = merge(held, trial_object(license_id, "ended", version, int(ends.timestamp())))
            if merged is not None:
                await LedgerStore.save(conn, merged, new_links=())
            event = await self._derive(conn, row_license=row, license_id=license_id, kind=ENDED, at=ends)
        TRIALS_ENDED.inc()
        log.info("license %s: trial ended", license_id)
        if event is not None:
            await self._publish(event)
        return event

    async def end_due(self) -> int:
        """End every trial that is due (at most 100 a call); how many this process ended."""
        async with self.engine.connect() as conn:
            due = await TrialStore.due(conn, datetime.now(UTC))
        ended = 0
        for license_id in due:
            ended += await self.end(license_id) is not None
        return ended

    async def next_end(self) -> datetime | None:
        async with self.engine.connect() as conn:
            return await TrialStore.next_end(conn)

    async def _derive(
        self, conn: AsyncConnection, *, row_license: LicenseRow, license_id: str, kind: str, at: datetime
    ) -> LicenseEvent | None:
        state = self.rules.derive(await LedgerStore.license_objects(conn, license_id))
        return await EventLog.advance(conn, row_license, state, stripe_event_id=None, stripe_event_type=kind,
                                      occurred_at=at)  # fmt: skip

    async def _publish(self, event: LicenseEvent) -> None:
        # After the commit, like the webhook: a lost publish costs time (the sweep), not the event.
        try:
            await self.transport.publish(event.license_id, event.data)
        except Exception as exc:
            log.warning("publish of %s seq %d failed: %s", event.license_id, event.seq, exc)


class TrialClock:
    """Ends trials on time in this process (see the module's docstring): a timer at the earliest
    running trial's end, not a poll per trial."""

    # How often a process asks again for the earliest end, to learn of trials other processes
    # started (its own wake it at once).
    RESCAN = 60.0

    def __init__(self, trials_: Trials, *, rescan: float = RESCAN) -> None:
        self.trials = trials_
        self.rescan = rescan
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="trial-clock")

    async def close(self) -> None:
        """Idempotent."""
        await background.stop(self._task)
        self._task = None

    def wake(self) -> None:
        self._wake.set()

    async def _run(self) -> None:
        failures = 0
        while True:
            self._wake.clear()
            try:
                await self.trials.end_due()
                ends = await self.trials.next_end()
                wait = self.rescan if ends is None else min(self.rescan, max(0.0, ends.timestamp() - time.time()))
                failures = 0
            except Exception as exc:  # the database may be down: try again soon
                failures += 1
                if failures == 1 or failures % 30 == 0:
                    log.warning("trial clock failed (%d in a row): %s", failures, exc)
                wait = min(self.rescan, float(failures))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._wake.wait()
