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
# Every series exported from the start, at 0, so that an alert on a rate has something to read.
for _outcome in ("created", "again", "malformed", "invalid", "limit", "throttled"):
    ACTIVATIONS.labels(_outcome)
for _outcome in ("found", "not_found", "malformed", "throttled"):
    SESSION_LOOKUPS.labels(_outcome)
for _by in ("request", "ttl"):
    RELEASED.labels(_by)
