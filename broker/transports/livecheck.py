"""Live messages are checked against the database before anything trusts them.

Redis carries each event's bytes from the webhook to the streams, but Redis is not the truth:
whoever can PUBLISH on `license:<id>` (a leaked Redis password, a Redis shared with other
services, another deployment on the same server) could otherwise put any state into every
stream of that license, and with leases on, get it signed with the genuine key. So each live
message is compared, byte for byte, with the stored event of its (license, seq): the same bytes
go on, anything else (other bytes, a seq the log does not hold) is dropped and counted
(`license_broker_live_messages_rejected_total`). Leases are therefore only ever signed over
bytes the database holds. A genuine message always finds its row: the webhook publishes after
its commit.

Cost: one query per batch of messages per process, never per client: messages that arrive while
a check is in flight are checked together by the next one (one round trip for all of them), and
the hub fans each checked event out to its clients as before. The check holds one connection of
its own, in autocommit (no BEGIN, no ROLLBACK: one round trip a batch, and no pool checkout),
and on Postgres speaks psycopg directly: ~0.2 ms of the stream process's CPU per check instead of
~1.4 ms through a pooled SQLAlchemy transaction (docs/security.md has the measurements).

Nothing is lost by dropping: a message the check cannot read the database for, or that finds the
queue full, is left to the database sweep (woken at once), which reads the event itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from typing import Any

import psycopg
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from broker import background, metrics
from broker.storage.eventlog import stored_events
from broker.transports.base import GapHandler, MessageHandler
from broker.wire import LicenseEvent

log = logging.getLogger("broker.livecheck")

# Messages waiting for their check: beyond this (a database far slower than Redis, or a flood of
# forgeries), further ones are left to the sweep rather than held in memory.
QUEUE_LIMIT = 10_000
# At most one warning of each kind per this many seconds: a flood of forgeries must not flood the log.
LOG_EVERY = 10.0
# One statement for any number of messages, by index lookups whatever the plan (a generic plan of
# `(license_id, seq) IN (...)` could scan the table).
_STORED_PG = (
    "SELECT k.license_id, k.seq, e.data FROM unnest(%s::text[], %s::bigint[]) AS k(license_id, seq) "
    "JOIN LATERAL (SELECT data FROM subscription_event_logs l "
    "WHERE l.license_id = k.license_id AND l.seq = k.seq) e ON true"
)
# The usual batch, one message (events seconds apart per license, and a check in flight rarely has
# another waiting): no arrays to build and send, ~25% less of the stream's CPU per check.
_STORED_ONE_PG = "SELECT data FROM subscription_event_logs WHERE license_id = %s AND seq = %s"


class LiveCheck:
    """Takes each message of a lossy transport (`submit`), hands on those whose bytes are the
    stored event of their seq (`on_checked`), in the order they came; `on_unchecked` is called
    when messages could not be checked (the sweep then fetches them from the database)."""

    def __init__(
        self, engine: AsyncEngine, on_checked: MessageHandler, on_unchecked: GapHandler, *, limit: int = QUEUE_LIMIT
    ) -> None:
        self.engine = engine
        self.limit = limit
        self._conn: AsyncConnection | None = None
        self._pg: psycopg.AsyncConnection[Any] | None = None  # the same connection, on Postgres
        self._on_checked = on_checked
        self._on_unchecked = on_unchecked
        self._pending: list[LicenseEvent] = []
        self._oldest = 0.0  # when the oldest pending message came (monotonic)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._warned_at: dict[str, float] = {}
        self._unwarned: dict[str, int] = {}

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="live-check")

    async def stop(self) -> None:
        """Idempotent; what is pending is dropped (the process is closing)."""
        await background.stop(self._task)
        self._task = None
        self._pending = []
        await self._release()

    def submit(self, event: LicenseEvent) -> None:
        """A message as it came off the wire (the transport's handler: never blocks)."""
        if len(self._pending) >= self.limit:
            metrics.LIVE_UNCHECKED.inc()
            self._warn("full", f"live messages left to the database sweep: {self.limit} wait for their check")
            self._on_unchecked()
            return
        if not self._pending:
            self._oldest = time.monotonic()
        self._pending.append(event)
        self._wake.set()

    async def check_pending(self) -> None:
        """Check everything submitted so far, in one query."""
        batch, self._pending = self._pending, []
        if not batch:
            return
        oldest = self._oldest
        try:
            stored = await self._stored(list({(e.license_id, e.seq) for e in batch}))
        except Exception as exc:  # the database may be down: the sweep delivers once it is back
            metrics.LIVE_UNCHECKED.inc(len(batch))
            self._warn("failed", f"live messages left to the database sweep, their check failed: {exc}")
            self._on_unchecked()
            return
        # What the check added to the delivery of the batch's oldest message: its wait and the query.
        metrics.LIVE_CHECK_SECONDS.observe(time.monotonic() - oldest)
        for event in batch:
            data = stored.get((event.license_id, event.seq))
            if data == event.data:
                self._on_checked(event)
                continue
            reason = "unknown" if data is None else "mismatch"
            metrics.LIVE_REJECTED_BY_REASON[reason].inc()
            self._warn(
                reason,
                f"dropped a live message for license {event.license_id} seq {event.seq}: "
                + ("no such event in the database" if data is None else "not the stored event of its seq")
                + " (someone else publishes on this Redis?)",
            )

    async def _stored(self, keys: Sequence[tuple[str, int]]) -> dict[tuple[str, int], bytes]:
        if self._conn is None:
            conn = await self.engine.connect()
            self._conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
            if self._conn.dialect.name == "postgresql":
                # SQLAlchemy's statement layer is most of a check's CPU, paid once per live message.
                self._pg = (await self._conn.get_raw_connection()).driver_connection
        try:
            return await read_stored(self._conn, self._pg, keys)
        except Exception:
            await self._release()  # perhaps dead (a database restart): the next batch opens another
            raise

    async def _release(self) -> None:
        conn, self._conn, self._pg = self._conn, None, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self.check_pending()

    def _warn(self, kind: str, message: str) -> None:
        now = time.monotonic()
        if now - self._warned_at.get(kind, -LOG_EVERY) < LOG_EVERY:
            self._unwarned[kind] = self._unwarned.get(kind, 0) + 1
            return
        more = self._unwarned.pop(kind, 0)
        self._warned_at[kind] = now
        log.warning("%s%s", message, f" (and {more} more like it in the last {LOG_EVERY:g} s)" if more else "")


async def read_stored(
    conn: AsyncConnection, pg: psycopg.AsyncConnection[Any] | None, keys: Sequence[tuple[str, int]]
) -> dict[tuple[str, int], bytes]:
    """The stored bytes of each (license id, seq) the log holds: one query, through psycopg itself
    when `pg` is `conn`'s Postgres connection."""
    if pg is None:
        return await stored_events(conn, keys)
    if len(keys) == 1:
        ((license_id, seq),) = keys
        cursor = await pg.execute(_STORED_ONE_PG, (license_id, seq), prepare=True)
        row = await cursor.fetchone()
        return {} if row is None else {(license_id, seq): row[0].encode()}
    license_ids, seqs = zip(*keys, strict=True)
    cursor = await pg.execute(_STORED_PG, (list(license_ids), list(seqs)))
    return {(row[0], row[1]): row[2].encode() for row in await cursor.fetchall()}
