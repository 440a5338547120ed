"""Database tables (SQLAlchemy Core). Changes to them are Alembic migrations."""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

# One row per license. `seq` is the last sequence number handed out; the row is locked
# (SELECT ... FOR UPDATE) while the next one is taken, so per license seq order is commit order.
licenses = sa.Table(
    "licenses",
    metadata,
    sa.Column("id", sa.String(200), primary_key=True),
    sa.Column("seq", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("status", sa.String(40), nullable=False, server_default="none"),
    sa.Column("entitled", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("state", sa.JSON, nullable=False),
    # `created` (unix seconds) of the Stripe event that last changed the license.
    sa.Column("last_event_created", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("stripe_customer_id", sa.String(200), index=True),
    sa.Column("stripe_subscription_id", sa.String(200), index=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
)

# Every Stripe event id received, once (idempotency), with its raw payload for audit.
stripe_events = sa.Table(
    "stripe_events",
    metadata,
    sa.Column("id", sa.String(255), primary_key=True),
    sa.Column("type", sa.String(200), nullable=False),
    sa.Column("created", sa.BigInteger, nullable=False),
    sa.Column("livemode", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("license_id", sa.String(200), index=True),
    # What a later event can use to find the license of an event that came too early.
    sa.Column("stripe_customer_id", sa.String(200), index=True),
    sa.Column("stripe_subscription_id", sa.String(200), index=True),
    # A dispute names only its charge and payment intent (migration 0002).
    sa.Column("stripe_charge_id", sa.String(200), index=True),
    sa.Column("stripe_payment_intent_id", sa.String(200), index=True),
    # applied | unchanged | stale | ignored | unmatched | pending
    sa.Column("outcome", sa.String(20), nullable=False, index=True),
    sa.Column("payload", sa.JSON, nullable=False),
    sa.Column("received_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
)

subscription_event_logs = sa.Table(
    "subscription_event_logs",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("license_id", sa.String(200), nullable=False),
    sa.Column("seq", sa.BigInteger, nullable=False),
    sa.Column("stripe_event_id", sa.String(255)),
    sa.Column("stripe_event_type", sa.String(200)),
    sa.Column("status", sa.String(40), nullable=False),
    sa.Column("entitled", sa.Boolean, nullable=False),
    # The exact JSON object sent on the stream and published to Redis.
    sa.Column("event", sa.JSON, nullable=False),
    sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now(), index=True),
    sa.UniqueConstraint("license_id", "seq", name="uq_subscription_event_logs_license_seq"),
)

# Which license a charge or payment intent paid for (migration 0002): `charge.dispute.created`
# names only the charge and payment intent, never the customer or subscription.
license_payments = sa.Table(
    "license_payments",
    metadata,
    sa.Column("id", sa.String(200), primary_key=True),  # ch_... or pi_...
    sa.Column("license_id", sa.String(200), nullable=False, index=True),
    sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
)
