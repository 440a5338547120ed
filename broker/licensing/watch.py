"""What a stream process does about machines, in one owned background task:

- end the streams of released machines: at once when a notice for their license arrives (any
  process that released one publishes it on the license's channel after its commit), and for every
  machine it holds every BROKER_POLL_INTERVAL in any case (a lost notice, the poll transport, a
  release by the command line without Redis). The database is the truth: a machine's streams end
  only when its row is gone, so a forged notice ends nothing;
- mark the machines that hold a stream as seen, one statement for all of them per interval;
- with LICENSE_MACHINE_TTL, release the machines not seen for that long (every process may: the
  delete is the decision, whichever process makes it, and it announces what it released)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Protocol

from sqlalchemy.ext.asyncio import AsyncEngine

from broker import background
from broker.licensing.machines import Machines
from broker.licensing.metrics import STREAMS_ENDED
from broker.licensing.store import MachineStore

log = logging.getLogger("broker.licensing")

# How often a held machine's last_seen_at is written while its stream stays open: bounded writes
# (one statement per process per interval), and well inside LICENSE_MACHINE_TTL when it is set.
SEEN_INTERVAL = 300.0


class HeldStreams(Protocol):
    """What the watch needs of the subscription hub."""

    def machines_of(self, license_id: str) -> set[str]: ...

    def held_machines(self) -> dict[str, str]: ...

    def end_machines(self, license_id: str, machine_ids: set[str]) -> int: ...


def seen_interval(machine_ttl: float | None) -> float:
    return SEEN_INTERVAL if machine_ttl is None else min(SEEN_INTERVAL, machine_ttl / 4)


class MachineWatch:
    def __init__(
        self,
        engine: AsyncEngine,
        streams: HeldStreams,
        machines: Machines,
        *,
        sweep_interval: float,
        machine_ttl: float | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.engine = engine
        self.streams = streams
        self.machines = machines
        self.sweep_interval = sweep_interval
        self.machine_ttl = machine_ttl
        self.seen_every = seen_interval(machine_ttl)
        self._clock = clock
        self._prompted: set[str] = set()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="machine-watch")

    async def close(self) -> None:
        """Idempotent."""
        await background.stop(self._task)
        self._task = None

    def prompt(self, license_id: str) -> None:
        """A notice: look at this license's machines now (the hub's on_notice; never blocks)."""
        if self.streams.machines_of(license_id) and len(self._prompted) < 10_000:
            self._prompted.add(license_id)
            self._wake.set()

    async def check(self, license_ids: set[str] | None = None) -> int:
        """End the streams of the machines (of these licenses, or all held) whose rows are gone;
        how many streams ended."""
        held = self.streams.held_machines()
        if license_ids is not None:
            held = {m: lid for m, lid in held.items() if lid in license_ids}
        if not held:
            return 0
        async with self.engine.connect() as conn:
            active = await MachineStore.existing(conn, held)
        released: dict[str, set[str]] = {}
        for machine_id, license_id in held.items():
            if machine_id not in active:
                released.setdefault(license_id, set()).add(machine_id)
        ended = sum(self.streams.end_machines(lid, ids) for lid, ids in released.items())
        if ended:
            STREAMS_ENDED.inc(ended)
            log.info("ended %d stream(s) of %d released machine(s)", ended, sum(map(len, released.values())))
        return ended

    async def mark_seen(self) -> None:
        held = self.streams.held_machines()
        if held:
            async with self.engine.begin() as conn:
                await MachineStore.touch_all(conn, list(held), datetime.now(UTC))

    async def _run(self) -> None:
        now = self._clock()
        next_sweep, next_seen = now + self.sweep_interval, now + self.seen_every
        next_expiry = now if self.machine_ttl else None
        failures = 0
        while True:
            wait = min(next_sweep, next_seen, next_expiry or next_sweep) - self._clock()
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._wake.wait()
            self._wake.clear()
            try:
                if self._prompted:
                    prompted, self._prompted = self._prompted, set()
                    await self.check(prompted)
                now = self._clock()
                if now >= next_sweep:
                    next_sweep = now + self.sweep_interval
                    await self.check()
                if now >= next_seen:
                    next_seen = now + self.seen_every
                    await self.mark_seen()
                if next_expiry is not None and self.machine_ttl and now >= next_expiry:
                    next_expiry = now + min(60.0, self.machine_ttl / 4)
                    await self.machines.expire(self.machine_ttl)
                failures = 0
            except Exception as exc:  # the database may be down: try again at the next turn
                failures += 1
                if failures == 1 or failures % 30 == 0:
                    log.warning("machine watch failed (%d in a row): %s", failures, exc)
