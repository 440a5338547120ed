"""The per-license event log: what the stream replays and what every transport carries."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from broker.storage.licenses import LicenseRow, LicenseState, LicenseStore, initial_state
from broker.storage.schema import licenses, subscription_event_logs

# Keeps each IN (...) list well under every driver's parameter limit.
_CHUNK = 1000


@dataclass(frozen=True, slots=True)
class LicenseEvent:
    """One event of one license: `data` is the exact JSON sent on the stream and on Redis, encoded
    once by the webhook and stored as it is (`subscription_event_logs.data`)."""

    license_id: str
    seq: int
    data: bytes
    # When the webhook wrote it (epoch seconds), for the commit-to-delivery lag; None when unknown.
    recorded_at: float | None = None

    @classmethod
    def from_json(cls, data: bytes) -> LicenseEvent:
        obj = orjson.loads(data)
        recorded = obj.get("recorded_at")
        recorded_at = datetime.fromisoformat(recorded).timestamp() if recorded else None
        return cls(license_id=str(obj["license_id"]), seq=int(obj["seq"]), data=data, recorded_at=recorded_at)

    @classmethod
    def from_wire(cls, license_id: str, data: bytes) -> LicenseEvent:
        """As from_json, for a message of a known license, without decoding the JSON: encode_event
        starts every event with its license id, seq and recorded_at, in that order."""
        prefix = b'{"license_id":' + orjson.dumps(license_id) + b',"seq":'
        if data.startswith(prefix):
            end = data.find(b",", len(prefix))
            rest = data[end : end + 45]
            if end > 0 and rest.startswith(b',"recorded_at":'):
                seq = data[len(prefix) : end]
                if seq.isdigit():
                    recorded_at = None
                    if rest[15:16] == b'"':
                        stamp = rest[16:].split(b'"', 1)[0]
                        recorded_at = datetime.fromisoformat(stamp.decode()).timestamp()
                    return cls(license_id, int(seq), data, recorded_at)
        return cls.from_json(data)


def encode_event(
    license_id: str,
    seq: int,
    state: LicenseState,
    *,
    stripe_event_id: str | None,
    stripe_event_type: str | None,
    occurred_at: datetime | None,
    recorded_at: datetime | None = None,
) -> bytes:
    """The event's wire bytes: encoded once, stored, published and streamed as they are."""
    # The first three keys stay first: LicenseEvent.from_wire reads them without decoding.
    return orjson.dumps(
        {
            "license_id": license_id,
            "seq": seq,
            "recorded_at": recorded_at.isoformat() if recorded_at else None,
            "status": state["status"],
            "entitled": state["entitled"],
            "stripe_event_id": stripe_event_id,
            "stripe_event_type": stripe_event_type,
            "occurred_at": occurred_at.isoformat() if occurred_at else None,
            "state": state,
        }
    )


def _event(row: Sequence[Any]) -> LicenseEvent:
    # (license_id, seq, data): the stored text is the wire format, no JSON decoding on the way out.
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
