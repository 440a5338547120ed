"""The database sweep: the poll transport, and the safety net under lossy ones (SweptTransport)."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import orjson

from broker import background, metrics
from broker.storage.eventlog import EventLog
from broker.transports.base import MessageHandler

log = logging.getLogger("broker.sweep")

_LICENSES_PER_READ = 500
# The followed licenses whose seq is past the one the sweep knows, Postgres comparing: the process
# sends one JSON document ({license id: known seq}) and reads back only the licenses that moved,
# usually none. Each key by an index lookup, whatever the plan (LATERAL).
_MOVED_PG = (
    "SELECT k.key, l.seq FROM json_each_text(%s::json) AS k "
    "JOIN LATERAL (SELECT seq FROM licenses WHERE id = k.key) l ON true WHERE l.seq > k.value::bigint"
)


class DatabaseSweep:
    """Every `interval`, one query for the current seq of every followed license, then a read of
    the events of those that moved. Never one query per client.

    Ordering assumption: per license, seq order is commit order (the license row is locked while a
    seq is taken), so "seq > last seen" finds every committed event. A single global id cursor
    would not: ids of concurrent transactions commit out of order.
    """

    def __init__(self, events: EventLog, interval: float) -> None:
        self.events = events
        self.interval = interval
        self.known: dict[str, int] = {}
        self._wake = asyncio.Event()
        self._on_message: MessageHandler | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self, on_message: MessageHandler) -> None:
        """Sweep every `interval` (and when woken), handing each event found to `on_message`."""
        self._on_message = on_message
        self._task = asyncio.create_task(self._run(), name="database-sweep")

    async def stop(self) -> None:
        """Idempotent."""
        await background.stop(self._task)
        self._task = None

    async def follow(self, license_id: str) -> None:
        """Follow from the license's current seq (one query; nothing once followed)."""
        if license_id not in self.known:
            seqs = await self.events.latest_seqs([license_id])
            self.known.setdefault(license_id, seqs.get(license_id, 0))

    def unfollow(self, license_id: str) -> None:
        self.known.pop(license_id, None)

    def note(self, license_id: str, seq: int) -> None:
        """A live message arrived: no need to fetch it again."""
        if seq > self.known.get(license_id, seq):
            self.known[license_id] = seq

    def wake(self) -> None:
        """Sweep now rather than at the next interval (after a transport outage)."""
        self._wake.set()

    async def moved(self, known: dict[str, int]) -> dict[str, int]:
        """The current seq of each license of `known` that is past its seq there (one query).

        On Postgres the database compares: reading every followed license's seq back and comparing
        here held the stream's event loop ~16 ms per 1,000 followed licenses at every sweep (~180 ms
        at 10,000), delaying every live event that arrived meanwhile (docs/bench.md)."""
        if not known:
            return {}
        engine = self.events.engine
        if engine.dialect.name != "postgresql":
            latest = await self.events.latest_seqs(list(known))
            return {lid: seq for lid, seq in latest.items() if seq > known.get(lid, seq)}
        async with engine.connect() as conn:
            pg = (await conn.get_raw_connection()).driver_connection
            assert pg is not None
            cursor = await pg.execute(_MOVED_PG, (orjson.dumps(known).decode(),))
            return {row[0]: int(row[1]) for row in await cursor.fetchall()}

    async def sweep_once(self) -> int:
        on_message = self._on_message
        assert on_message is not None, "start() first"
        found = 0
        moved = await self.moved(dict(self.known))
        # Licenses given up, or delivered live, while the query ran are not fetched.
        behind = {lid: seq for lid, seq in moved.items() if seq > self.known.get(lid, seq)}
        while behind:
            # The events of many moved licenses in one query, not one query per license.
            batch = {lid: self.known[lid] for lid in list(behind)[:_LICENSES_PER_READ] if lid in self.known}
            events = await self.events.read_many(batch) if batch else []
            for event in events:
                if event.license_id in self.known:
                    self.note(event.license_id, event.seq)
                    on_message(event)
                    found += 1
            for lid in list(behind)[:_LICENSES_PER_READ]:
                if not events or self.known.get(lid, behind[lid]) >= behind[lid]:
                    del behind[lid]  # caught up, unfollowed, or nothing more to read
        return found

    async def _run(self) -> None:
        failures = 0
        while True:
            with contextlib.suppress(TimeoutError):
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for returns when the event is
                # set in the tick the task is cancelled, and the loop never ends (cpython#86296).
                async with asyncio.timeout(self.interval):
                    await self._wake.wait()
            self._wake.clear()
            try:
                found = await self.sweep_once()
            except Exception as exc:  # the database may be down; keep the clients, try again later
                failures += 1
                metrics.SWEEP_FAILURES.inc()
                if failures == 1 or failures % 30 == 0:
                    log.warning("database sweep failed (%d in a row): %s", failures, exc)
                continue
            if failures:
                log.info("database sweep recovered after %d failures", failures)
                failures = 0
            if found:
                metrics.SWEPT_EVENTS.inc(found)
