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
    # applied | unchanged | stale | ignored | unmatched | pending | rejected (migration 0003)
    sa.Column("outcome", sa.String(20), nullable=False, index=True),
    # The ledger object the event reported, and why it changed nothing where it did not (0003).
    sa.Column("object_id", sa.String(255), index=True),
    sa.Column("reason", sa.String(200)),
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
    # The exact bytes (one JSON object) sent on the stream and published to Redis, encoded once by
    # the webhook and never decoded on the way out (migration 0004).
    sa.Column("data", sa.Text, nullable=False),
    sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now(), index=True),
    sa.UniqueConstraint("license_id", "seq", name="uq_subscription_event_logs_license_seq"),
)

# The ledger (migration 0003): one row per Stripe object a license depends on (broker.stripe_ledger.ledger).
stripe_objects = sa.Table(
    "stripe_objects",
    metadata,
    sa.Column("id", sa.String(255), primary_key=True),
    sa.Column("kind", sa.String(40), nullable=False),
    # `created` of the event whose snapshot this is, and the tie-break rank within that second.
    sa.Column("version", sa.BigInteger, nullable=False),
    sa.Column("rank", sa.BigInteger, nullable=False),
    sa.Column("customer", sa.String(255), index=True),
    sa.Column("state", sa.JSON, nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
)

# Links between objects (a session names its subscription, an invoice its payments); they only
# accumulate, and a binding follows them both ways.
stripe_links = sa.Table(
    "stripe_links",
    metadata,
    sa.Column("object_id", sa.String(255), primary_key=True),
    sa.Column("linked_id", sa.String(255), primary_key=True, index=True),
)

# Which license a Stripe id belongs to, for ids with or without a ledger row of their own (a
# payment intent is known through its session and its charges). Set once, never moved.
stripe_bindings = sa.Table(
    "stripe_bindings",
    metadata,
    sa.Column("stripe_id", sa.String(255), primary_key=True),
    sa.Column("license_id", sa.String(200), nullable=False, index=True),
    sa.Column("bound_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
)

# License keys (migration 0006): never the key itself. `digest` finds a typed key (HMAC under a key
# derived from LICENSE_KEY_SECRET), `sealed` shows it again (AES-GCM); `secret_id` names the secret
# that sealed it (broker.licensing.keys). One key per license; a rotation replaces the row's values.
license_keys = sa.Table(
    "license_keys",
    metadata,
    sa.Column("license_id", sa.String(200), sa.ForeignKey("licenses.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("digest", sa.LargeBinary(32), nullable=False),
    sa.Column("sealed", sa.LargeBinary(128), nullable=False),
    sa.Column("secret_id", sa.String(16), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.Column("rotated_at", sa.DateTime(timezone=True)),
    # The last activation with this key (its row is locked then, which serialises them).
    sa.Column("used_at", sa.DateTime(timezone=True)),
    sa.UniqueConstraint("digest", name="uq_license_keys_digest"),
)

# Machines activated on a license (0006). A released machine's row is deleted: a machine token
# whose row is gone is refused, and the rows a license can hold stay bounded.
machines = sa.Table(
    "machines",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column(
        "license_id", sa.String(200), sa.ForeignKey("licenses.id", ondelete="CASCADE"), nullable=False, index=True
    ),
    # SHA-256 of the fingerprint the client sent (itself a salted hash of the OS machine id).
    sa.Column("fingerprint", sa.LargeBinary(32), nullable=False),
    sa.Column("name", sa.String(200)),
    sa.Column("platform", sa.String(100)),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now(), index=True),
    sa.UniqueConstraint("license_id", "fingerprint", name="uq_machines_license_fingerprint"),
)

# Checkouts the broker created for an app (migration 0007, broker.licensing.checkout): the Checkout
# Session, the license and machine it is for, and the client address that asked (what its per-address
# bound counts). `pending_license`: the license was created for this checkout, and is removed with it
# when unpaid by `expires_at` (CHECKOUT_PENDING_TTL). A row goes once its session is settled.
checkouts = sa.Table(
    "checkouts",
    metadata,
    sa.Column("id", sa.String(255), primary_key=True),
    sa.Column(
        "license_id", sa.String(200), sa.ForeignKey("licenses.id", ondelete="CASCADE"), nullable=False, index=True
    ),
    sa.Column("machine_id", sa.String(40)),
    sa.Column("pending_license", sa.Boolean, nullable=False),
    sa.Column("address", sa.String(80), nullable=False, index=True),
    sa.Column("price", sa.String(255), nullable=False),
    sa.Column("mode", sa.String(20), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    # When an unpaid checkout (and its pending license) is removed; when Stripe stops taking payment.
    sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False, index=True),
    sa.Column("closes_at", sa.DateTime(timezone=True), nullable=False),
    # When the broker asked Stripe to expire the session (the removal waits for Stripe's word).
    sa.Column("expiring_at", sa.DateTime(timezone=True)),
)

# Trials without a card (0007, broker.licensing.trials): one per machine fingerprint, ever. The row is
# never deleted (a reinstall of the app finds it); `ended_at` is set by the one transaction that ends
# the trial (its license's event), whichever stream process's clock gets there first.
trials = sa.Table(
    "trials",
    metadata,
    # SHA-256 of the fingerprint the client sent, as machines.fingerprint.
    sa.Column("fingerprint", sa.LargeBinary(32), primary_key=True),
    sa.Column("license_id", sa.String(200), nullable=False, unique=True),
    sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("ends_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("ended_at", sa.DateTime(timezone=True)),
    # The clock's question: the earliest end among the trials still running.
    sa.Index(
        "ix_trials_running_ends_at",
        "ends_at",
        postgresql_where=sa.text("ended_at IS NULL"),
        sqlite_where=sa.text("ended_at IS NULL"),
    ),
)
