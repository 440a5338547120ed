"""The peer that `make bench` compares the project with: Flask-SSE (the `flask-sse` package) as its
documentation deploys it, a Flask app served by gunicorn with the gevent worker, every stream its
own Redis subscription (`sse.stream`, `?channel=`), events published with `sse.publish`.

Its webhook endpoint takes the same signed Stripe events the project's webhook takes, from the
same driver (bench.measure): it checks the Stripe signature, takes the license id from the event's
object, numbers the license's events in process memory (no database: nothing is stored, nothing
decided) and publishes a small state on the license's channel with that number as the event's
`id:`, then answers `{"seq": n}` as the project's webhook does. Per event that is all it does; the
project does its Postgres transaction (and its stream the live check) besides.

FLASK_SSE_PUBLISH says how it publishes: `sse` (the default, as Flask-SSE's docs do):
`sse.publish`, which makes a new Redis client, so a new connection (a connect and redis-py's
handshake), per call; `pooled`: the same message (`Message(...).to_dict()` as JSON, on the same
channel) on one Redis client made once, the peer at its fastest.

Run as the bench does: `gunicorn --worker-class gevent bench.flask_sse_peer:app` with
`REDIS_URL` and `STRIPE_WEBHOOK_SECRET` set. Not part of the project (Flask and Flask-SSE are in
the `bench` extra only)."""

from __future__ import annotations

import os
from collections import defaultdict
from typing import Any

import orjson
import stripe
from flask import Flask, Response, json, request
from flask_sse import Message, sse  # type: ignore[import-untyped]
from redis import Redis

# The project's webhook path, so that the driver posts to both the same way.
WEBHOOK_PATH = "/api/stripe/webhooks"
STREAM_PATH = "/stream"

app = Flask(__name__)
app.config["REDIS_URL"] = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
app.register_blueprint(sse, url_prefix=STREAM_PATH)

_secret = os.environ.get("STRIPE_WEBHOOK_SECRET", "")
PUBLISH = os.environ.get("FLASK_SSE_PUBLISH", "sse")
if PUBLISH not in ("sse", "pooled"):
    raise SystemExit(f"FLASK_SSE_PUBLISH: expected sse or pooled, got {PUBLISH!r}")
_publisher = Redis.from_url(app.config["REDIS_URL"])
# One gevent worker: greenlets switch only at I/O, and nothing below does I/O between reading and
# bumping a license's number, so the numbers are unique and in order per license.
_seqs: defaultdict[str, int] = defaultdict(int)


@app.get("/readyz")
def readyz() -> Response:
    sse.redis.ping()
    return Response("ok", mimetype="text/plain")


@app.post(WEBHOOK_PATH)
def webhook() -> Response:
    payload = request.get_data()
    try:
        stripe.WebhookSignature.verify_header(
            payload.decode(), request.headers.get("Stripe-Signature", ""), _secret, tolerance=300
        )
    except stripe.SignatureVerificationError:
        return Response('{"error":"invalid signature"}', status=400, mimetype="application/json")
    event: dict[str, Any] = orjson.loads(payload)
    obj = event["data"]["object"]
    license_id = obj["metadata"]["license_id"]
    _seqs[license_id] += 1
    seq = _seqs[license_id]
    state = {
        "license_id": license_id,
        "seq": seq,
        "status": obj.get("status"),
        "entitled": obj.get("status") in ("active", "trialing", "past_due"),
        "stripe_event_id": event["id"],
        "stripe_event_type": event["type"],
        "occurred_at": event["created"],
    }
    if PUBLISH == "sse":
        sse.publish(state, id=seq, channel=f"license:{license_id}")
    else:  # what sse.publish sends, on the one client
        _publisher.publish(f"license:{license_id}", json.dumps(Message(state, id=seq).to_dict()))
    return Response(orjson.dumps({"seq": seq}), mimetype="application/json")
