"""The license model: its state, and the row that holds it (locked while it changes)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NotRequired, TypedDict

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from broker.schema import licenses


class LicenseState(TypedDict):
    """What a desktop app receives: enough to lock, unlock and tell its user why."""

    status: str  # "none" until the first payment; Stripe's subscription status; "revoked"; "paid"
    entitled: bool
    kind: str | None  # "subscription" | "perpetual"
    features: list[str]
    cancel_at_period_end: bool
    current_period_end: str | None
    trial_end: str | None
    customer: str | None
    subscription: str | None
    notice: NotRequired[dict[str, Any] | None]
    # Per-facet `created` of the Stripe event that last set it (see webhook.rules).
    versions: NotRequired[dict[str, int]]


def initial_state() -> LicenseState:
    return {
        "status": "none",
        "entitled": False,
        "kind": None,
        "features": [],
        "cancel_at_period_end": False,
        "current_period_end": None,
        "trial_end": None,
        "customer": None,
        "subscription": None,
    }


@dataclass(slots=True)
class LicenseRow:
    id: str
    seq: int
    state: LicenseState
    last_event_created: int
    stripe_customer_id: str | None
    stripe_subscription_id: str | None


def _insert(conn: AsyncConnection) -> Any:
    return (postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert)(licenses)


class LicenseStore:
    """License rows, inside the caller's transaction."""

    @staticmethod
    async def lock(conn: AsyncConnection, license_id: str) -> LicenseRow:
        """Create the license if new, then lock its row until the transaction ends.

        The lock serialises every change of one license, so seq N+1 is taken only after the
        transaction that wrote seq N has committed: per license, seq order is commit order.
        (SQLite has no row locks; it serialises every writer, which gives the same order.)"""
        await conn.execute(
            _insert(conn).values(id=license_id, state=initial_state()).on_conflict_do_nothing(index_elements=["id"])
        )
        query = sa.select(licenses).where(licenses.c.id == license_id).with_for_update()
        row = (await conn.execute(query)).mappings().one()
        return LicenseRow(
            id=row["id"],
            seq=row["seq"],
            state=row["state"],
            last_event_created=row["last_event_created"],
            stripe_customer_id=row["stripe_customer_id"],
            stripe_subscription_id=row["stripe_subscription_id"],
        )

    @staticmethod
    async def find(conn: AsyncConnection, *, customer: str | None, subscription: str | None) -> str | None:
        """The license a customer or subscription was linked to by an earlier event."""
        for column, value in (
            (licenses.c.stripe_subscription_id, subscription),
            (licenses.c.stripe_customer_id, customer),
        ):
            if value:
                found = await conn.scalar(sa.select(licenses.c.id).where(column == value).limit(1))
                if found is not None:
                    return str(found)
        return None

    @staticmethod
    async def save(conn: AsyncConnection, row: LicenseRow) -> None:
        await conn.execute(
            licenses.update()
            .where(licenses.c.id == row.id)
            .values(
                seq=row.seq,
                status=row.state["status"],
                entitled=row.state["entitled"],
                state=row.state,
                last_event_created=row.last_event_created,
                stripe_customer_id=row.stripe_customer_id,
                stripe_subscription_id=row.stripe_subscription_id,
                updated_at=datetime.now(UTC),
            )
        )
