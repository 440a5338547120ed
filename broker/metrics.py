"""Prometheus metrics, served at /metrics by both apps."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

WEBHOOKS = Counter(
    "license_broker_webhooks_total",
    "Stripe webhooks by outcome (applied, unchanged, duplicate, stale, ignored, unmatched, pending, rejected, error)",
    ["outcome"],
)
# Every outcome exported from the start, at 0: an alert on rate(...{outcome="rejected"}) needs the series.
WEBHOOK_OUTCOMES = (
    "applied",
    "unchanged",
    "duplicate",
    "stale",
    "ignored",
    "unmatched",
    "pending",
    "rejected",
    "error",
)
# Bound once: `labels()` is a locked dict lookup that the webhook would otherwise pay per request.
WEBHOOKS_BY_OUTCOME = {outcome: WEBHOOKS.labels(outcome) for outcome in WEBHOOK_OUTCOMES}
PUBLISH_FAILURES = Counter("license_broker_publish_failures_total", "Publishes that failed after the commit")
OPEN_STREAMS = Gauge("license_broker_open_streams", "SSE connections open in this process")
DELIVERED = Counter("license_broker_events_delivered_total", "Events written to SSE clients")
REPLAYED = Counter("license_broker_events_replayed_total", "Events sent from the database on catch-up or gap fill")
STREAMS_REFUSED = Counter(
    "license_broker_streams_refused_total",
    "New streams refused: 503 for a full process (capacity), 429 for a license over its limit (license)",
    ["limit"],
)
for _limit in ("capacity", "license"):
    STREAMS_REFUSED.labels(_limit)
RESYNCED = Counter(
    "license_broker_stream_resyncs_total",
    "Resuming clients sent the current state instead of a replay (further behind than STREAM_REPLAY_LIMIT, or ahead)",
)
SLOW_CLIENTS = Counter("license_broker_slow_clients_total", "Clients disconnected for not reading fast enough")
SWEPT_EVENTS = Counter("license_broker_swept_events_total", "Events the database sweep found that the transport missed")
LIVE_REJECTED = Counter(
    "license_broker_live_messages_rejected_total",
    "Live transport (Redis) messages dropped: no stored event for their seq (unknown) or other bytes than "
    "the stored one (mismatch): someone else publishes on the broker's channels",
    ["reason"],
)
LIVE_REJECTED_BY_REASON = {reason: LIVE_REJECTED.labels(reason) for reason in ("unknown", "mismatch")}
LIVE_CHECK_SECONDS = Histogram(
    "license_broker_live_check_seconds",
    "From a live message's arrival to the end of its check against the database (the oldest of each batch)",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
)
LIVE_UNCHECKED = Counter(
    "license_broker_live_messages_unchecked_total",
    "Live transport messages left to the database sweep: their check could not read the database, or too many waited",
)
SWEEP_FAILURES = Counter("license_broker_sweep_failures_total", "Database sweeps that failed")
TRANSPORT_UP = Gauge("license_broker_transport_up", "1 while the transport's subscriber is connected", ["transport"])
DELIVERY_LAG = Histogram(
    "license_broker_delivery_lag_seconds",
    "From the event's commit to its delivery on this process",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
REFRESHES = Counter(
    "license_broker_stripe_refreshes_total",
    "Reads of Stripe's API (STRIPE_API_KEY): stale events' objects, and what webhooks do not carry, by result",
    ["result"],
)
for _result in ("ok", "failed"):
    REFRESHES.labels(_result)
INGEST_BATCH = Histogram(
    "license_broker_ingest_batch_events",
    "Events per transaction of the webhook's common path (several when they arrive together: group commit)",
    buckets=(1, 2, 4, 8, 16, 32, 64),
)
