"""The per-license event log: what the stream replays and what every transport carries. The
bytes of each event are broker.wire's; this module reads and writes their rows."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from broker.storage.licenses import LicenseRow, LicenseState, LicenseStore, initial_state
from broker.storage.schema import licenses, subscription_event_logs
from broker.wire import LicenseEvent, encode_event

# LicenseEvent and encode_event are broker.wire's, imported from here by older callers.
__all__ = ["EventLog", "LicenseEvent", "encode_event", "log_entry", "stored_events"]

# Keeps each IN (...) list well under every driver's parameter limit.
_CHUNK = 1000


def _event(row: Sequence[Any]) -> LicenseEvent:
    # (license_id, seq, data): the stored text is the wire bytes (broker.wire), not decoded on the way out.
    return LicenseEvent(row[0], row[1], row[2].encode())


class EventLog:
    """Reads and appends `subscription_event_logs`. Appends happen inside the caller's
    transaction, with the license row already locked (see webhook.ingest)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def current(self, license_id: str) -> LicenseEvent:
        """The license's current state as an event whose seq is the current seq (0: never changed)."""
        query = (
            sa.select(
                subscription_event_logs.c.license_id, subscription_event_logs.c.seq, subscription_event_logs.c.data
            )
            .where(subscription_event_logs.c.license_id == license_id)
            .order_by(subscription_event_logs.c.seq.desc())
            .limit(1)
        )
        async with self.engine.connect() as conn:
            row = (await conn.execute(query)).first()
        if row is not None:
            return _event(row)
        empty = encode_event(
            license_id, 0, initial_state(), stripe_event_id=None, stripe_event_type=None, occurred_at=None
        )
        return LicenseEvent(license_id, 0, empty)

    async def read(
        self, license_id: str, after: int, before: int | None = None, limit: int = 500
    ) -> list[LicenseEvent]:
        """Events with after < seq (< before), in seq order, at most `limit`."""
        t = subscription_event_logs
        query = (
            sa.select(t.c.license_id, t.c.seq, t.c.data)
            .where(t.c.license_id == license_id, t.c.seq > after)
            .order_by(t.c.seq)
            .limit(limit)
        )
        if before is not None:
            query = query.where(t.c.seq < before)
        async with self.engine.connect() as conn:
            return [_event(row) for row in await conn.execute(query)]

    async def read_many(self, after: dict[str, int], limit: int = 1000) -> list[LicenseEvent]:
        """The events after each license's position, in (license, seq) order, in one query; at
        most `limit` (read again from the new positions for the rest)."""
        t = subscription_event_logs
        query = (
            sa.select(t.c.license_id, t.c.seq, t.c.data)
            .where(sa.or_(*(sa.and_(t.c.license_id == lid, t.c.seq > seq) for lid, seq in after.items())))
            .order_by(t.c.license_id, t.c.seq)
            .limit(limit)
        )
        async with self.engine.connect() as conn:
            return [_event(row) for row in await conn.execute(query)]

    async def replay(self, license_id: str, after: int, batch: int = 500) -> AsyncIterator[LicenseEvent]:
        """Every event after `after`, in batches so that a large backlog holds no connection long."""
        while True:
            events = await self.read(license_id, after, limit=batch)
            for event in events:
                yield event
                after = event.seq
            if len(events) < batch:
                return

    async def latest_seqs(self, license_ids: Iterable[str]) -> dict[str, int]:
        """The current seq of each license that exists, in one query per thousand licenses."""
        ids = list(license_ids)
        result: dict[str, int] = {}
        async with self.engine.connect() as conn:
            for start in range(0, len(ids), _CHUNK):
                query = sa.select(licenses.c.id, licenses.c.seq).where(licenses.c.id.in_(ids[start : start + _CHUNK]))
                result.update({row.id: row.seq for row in await conn.execute(query)})
        return result

    @staticmethod
    async def advance(
        conn: AsyncConnection,
        row: LicenseRow,
        state: LicenseState,
        *,
        stripe_event_id: str | None,
        stripe_event_type: str | None,
        occurred_at: datetime,
    ) -> LicenseEvent | None:
        """Move the locked license to `state` with the next seq and its log entry; None (nothing
        written) when the state is the one it holds."""
        if state == row.state:
            return None
        row.seq += 1
        row.state = state
        row.stripe_customer_id = state["customer"]
        row.stripe_subscription_id = state["subscription"]
        await LicenseStore.save(conn, row)
        return await EventLog.append(
            conn,
            row.id,
            row.seq,
            state,
            stripe_event_id=stripe_event_id,
            stripe_event_type=stripe_event_type,
            occurred_at=occurred_at,
        )

    @staticmethod
    async def append(
        conn: AsyncConnection,
        license_id: str,
        seq: int,
        state: LicenseState,
        *,
        stripe_event_id: str | None,
        stripe_event_type: str | None,
        occurred_at: datetime,
    ) -> LicenseEvent:
        row, event = log_entry(
            license_id,
            seq,
            state,
            stripe_event_id=stripe_event_id,
            stripe_event_type=stripe_event_type,
            occurred_at=occurred_at,
            recorded_at=datetime.now(UTC),
        )
        await conn.execute(subscription_event_logs.insert().values(**row))
        return event


_STORED_ONE = sa.select(subscription_event_logs.c.data).where(
    subscription_event_logs.c.license_id == sa.bindparam("license_id"),
    subscription_event_logs.c.seq == sa.bindparam("seq"),
)


async def stored_events(conn: AsyncConnection, keys: Sequence[tuple[str, int]]) -> dict[tuple[str, int], bytes]:
    """The stored bytes of each (license id, seq) that the log holds, on `conn`: one event, the
    common case, with a statement compiled once; more, in one query per thousand."""
    t = subscription_event_logs
    if len(keys) == 1:
        ((license_id, seq),) = keys
        data = (await conn.execute(_STORED_ONE, {"license_id": license_id, "seq": seq})).scalar()
        return {} if data is None else {(license_id, seq): data.encode()}
    result: dict[tuple[str, int], bytes] = {}
    for start in range(0, len(keys), _CHUNK):
        chunk = keys[start : start + _CHUNK]
        query = sa.select(t.c.license_id, t.c.seq, t.c.data).where(sa.tuple_(t.c.license_id, t.c.seq).in_(chunk))
        result.update({(row[0], row[1]): row[2].encode() for row in await conn.execute(query)})
    return result


def log_entry(
    license_id: str,
    seq: int,
    state: LicenseState,
    *,
    stripe_event_id: str | None,
    stripe_event_type: str | None,
    occurred_at: datetime,
    recorded_at: datetime,
) -> tuple[dict[str, Any], LicenseEvent]:
    """A log entry: its `subscription_event_logs` row, and the event it carries (the wire bytes,
    encoded once)."""
    data = encode_event(
        license_id,
        seq,
        state,
        stripe_event_id=stripe_event_id,
        stripe_event_type=stripe_event_type,
        occurred_at=occurred_at,
        recorded_at=recorded_at,
    )
    row = {
        "license_id": license_id,
        "seq": seq,
        "stripe_event_id": stripe_event_id,
        "stripe_event_type": stripe_event_type,
        "status": state["status"],
        "entitled": state["entitled"],
        "data": data.decode(),
        "occurred_at": occurred_at,
        "recorded_at": recorded_at,
    }
    return row, LicenseEvent(license_id, seq, data, recorded_at.timestamp())
