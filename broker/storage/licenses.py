"""The license model: its state, and the row that holds it (locked while it changes)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypedDict

from sqlalchemy.ext.asyncio import AsyncConnection

from broker.storage.db import upsert_into
from broker.storage.schema import licenses


class LicenseState(TypedDict):
    """What a desktop app receives: enough to lock, unlock and tell its user why. Derived from the
    license's ledger objects by broker.stripe_ledger.ledger.LicenseRules.derive (docs/stripe.md)."""

    # "none" until the first purchase; else the deciding object's status: Stripe's subscription
    # status, "paid" (a one-time purchase), "revoked" (refunded or charged back), "expired", ...
    status: str
    entitled: bool
    kind: str | None  # "subscription" | "perpetual" | "trial" (a trial without a card), of the deciding object
    features: list[str]  # lookup_keys of the entitling customer's active entitlements; [] unless entitled
    features_partial: bool  # Stripe listed more entitlements than `features` holds, and they could not be read
    cancels_at: str | None  # when the entitlement is scheduled to end, if every entitling object ends
    cancel_at_period_end: bool
    current_period_end: str | None
    trial_end: str | None
    customer: str | None
    subscription: str | None  # the deciding subscription
    subscriptions: list[dict[str, Any]]  # the entitling subscriptions: id, status, current_period_end, cancels_at
    notice: dict[str, Any] | None  # {"type": "trial_will_end" | "payment_action_required", ...}


def initial_state() -> LicenseState:
    """A license without objects (what `derive([])` gives)."""
    return {
        "status": "none",
        "entitled": False,
        "kind": None,
        "features": [],
        "features_partial": False,
        "cancels_at": None,
        "cancel_at_period_end": False,
        "current_period_end": None,
        "trial_end": None,
        "customer": None,
        "subscription": None,
        "subscriptions": [],
        "notice": None,
    }


@dataclass(slots=True)
class LicenseRow:
    id: str
    seq: int
    state: LicenseState
    stripe_customer_id: str | None
    stripe_subscription_id: str | None


class LicenseStore:
    """License rows, inside the caller's transaction."""

    @staticmethod
    async def lock(conn: AsyncConnection, license_id: str) -> LicenseRow:
        """Create the license if new, then lock its row until the transaction ends.

        The lock serialises every change of one license, so seq N+1 is taken only after the
        transaction that wrote seq N has committed: per license, seq order is commit order.
        (SQLite has no row locks; it serialises every writer, which gives the same order.)"""
        # One round trip: the upsert's (no-op) update takes the row lock, as SELECT ... FOR UPDATE would.
        insert = upsert_into(conn, licenses).values(id=license_id, state=initial_state())
        query = insert.on_conflict_do_update(index_elements=["id"], set_={"id": insert.excluded.id}).returning(
            *licenses.c
        )
        row = (await conn.execute(query)).mappings().one()
        return LicenseRow(
            id=row["id"],
            seq=row["seq"],
            state=row["state"],
            stripe_customer_id=row["stripe_customer_id"],
            stripe_subscription_id=row["stripe_subscription_id"],
        )

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
                stripe_customer_id=row.stripe_customer_id,
                stripe_subscription_id=row.stripe_subscription_id,
                updated_at=datetime.now(UTC),
            )
        )
