"""Prometheus metrics of keys and machines (served at /metrics with the others)."""

from __future__ import annotations

from prometheus_client import Counter

ACTIVATIONS = Counter(
    "license_broker_activations_total",
    "POST /api/activations by outcome (created, again, malformed, invalid, limit, throttled)",
    ["outcome"],
)
SESSION_LOOKUPS = Counter(
    "license_broker_checkout_session_lookups_total",
    "Checkout Session lookups of the /activate page and its JSON, by outcome (found, not_found, malformed, throttled)",
    ["outcome"],
)
RELEASED = Counter("license_broker_machines_released_total", "Machines released, by whom (request, ttl)", ["by"])
STREAMS_ENDED = Counter(
    "license_broker_released_machine_streams_ended_total",
    "Streams of this process ended because their machine was released",
)
CHECKOUTS = Counter(
    "license_broker_checkouts_total",
    "POST /api/checkout by outcome (created, throttled, pending_limit, entitled, stripe_unavailable, stripe_refused)",
    ["outcome"],
)
CHECKOUTS_CLOSED = Counter(
    "license_broker_checkouts_closed_total",
    "Checkouts the broker created, closed by how (paid, removed: unpaid, its pending license removed; expired: "
    "unpaid, its license kept)",
    ["how"],
)
TRIALS = Counter("license_broker_trials_total", "POST /api/trials by outcome (started, used, throttled)", ["outcome"])
TRIALS_ENDED = Counter("license_broker_trials_ended_total", "Trials ended by this process's clock")
PORTALS = Counter(
    "license_broker_portal_sessions_total",
    "POST /api/portal by outcome (created, no_customer, stripe_unavailable, stripe_refused)",
    ["outcome"],
)
# Every series exported from the start, at 0, so that an alert on a rate has something to read.
for _outcome in ("created", "again", "malformed", "invalid", "limit", "throttled"):
    ACTIVATIONS.labels(_outcome)
for _outcome in ("found", "not_found", "malformed", "throttled"):
    SESSION_LOOKUPS.labels(_outcome)
for _by in ("request", "ttl", "checkout"):
    RELEASED.labels(_by)
for _outcome in ("created", "throttled", "pending_limit", "entitled", "stripe_unavailable", "stripe_refused"):
    CHECKOUTS.labels(_outcome)
for _how in ("paid", "removed", "expired"):
    CHECKOUTS_CLOSED.labels(_how)
for _outcome in ("started", "used", "throttled"):
    TRIALS.labels(_outcome)
for _outcome in ("created", "no_customer", "stripe_unavailable", "stripe_refused"):
    PORTALS.labels(_outcome)
