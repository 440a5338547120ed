"""The license model: its state, and the row that holds it (locked while it changes)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NotRequired, TypedDict

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from broker.schema import license_payments, licenses


class LicenseState(TypedDict):
    """What a desktop app receives: enough to lock, unlock and tell its user why."""

    # Derived from the facets below (webhook.rules.derive): "none" until the first payment;
    # Stripe's subscription status; "paid" (perpetual); "revoked" (full refund or dispute).
    status: str
    entitled: bool
    kind: str | None  # "subscription" | "perpetual"
    features: list[str]  # lookup_keys of the customer's active entitlements
    cancel_at_period_end: bool
    current_period_end: str | None
    trial_end: str | None
    customer: str | None
    subscription: str | None
    notice: NotRequired[dict[str, Any] | None]  # e.g. {"type": "trial_will_end", "trial_end": ...}
    subscription_status: NotRequired[str | None]  # Stripe's, as the last subscription event said
    payment: NotRequired[dict[str, Any] | None]  # the Checkout purchase: mode, status, session
    last_invoice: NotRequired[dict[str, Any] | None]  # the newest invoice event: id, outcome, ...
    revocation: NotRequired[dict[str, Any] | None]  # the refund or dispute that revoked it
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
        # One round trip: the upsert's (no-op) update takes the row lock, as SELECT ... FOR UPDATE would.
        insert = _insert(conn).values(id=license_id, state=initial_state())
        query = insert.on_conflict_do_update(index_elements=["id"], set_={"id": insert.excluded.id}).returning(
            *licenses.c
        )
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
    async def find(
        conn: AsyncConnection,
        *,
        customer: str | None,
        subscription: str | None,
        payments: Iterable[str] = (),
    ) -> str | None:
        """The license a subscription, charge or payment intent, or else a customer, was linked to
        by an earlier event (most specific first: one customer may hold several licenses)."""
        if subscription:
            found = await conn.scalar(
                sa.select(licenses.c.id).where(licenses.c.stripe_subscription_id == subscription).limit(1)
            )
            if found is not None:
                return str(found)
        ids = [p for p in payments if p]
        if ids:
            found = await conn.scalar(
                sa.select(license_payments.c.license_id).where(license_payments.c.id.in_(ids)).limit(1)
            )
            if found is not None:
                return str(found)
        if customer:
            found = await conn.scalar(
                sa.select(licenses.c.id).where(licenses.c.stripe_customer_id == customer).limit(1)
            )
            if found is not None:
                return str(found)
        return None

    @staticmethod
    async def link_payments(conn: AsyncConnection, license_id: str, payments: Iterable[str]) -> None:
        """Remember which license a charge or payment intent paid for: a dispute names only those."""
        insert = (postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert)(license_payments)
        for payment in sorted({p for p in payments if p}):
            await conn.execute(
                insert.values(id=payment, license_id=license_id, recorded_at=datetime.now(UTC)).on_conflict_do_nothing(
                    index_elements=["id"]
                )
            )

    @staticmethod
    async def payments_of(conn: AsyncConnection, license_id: str) -> set[str]:
        query = sa.select(license_payments.c.id).where(license_payments.c.license_id == license_id)
        return {str(p) for p in (await conn.scalars(query))}

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
