"""Stripe signature verification on the exact bytes received, with the `stripe` package."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson
import stripe


class BadWebhook(Exception):
    """400. The message says why, for the log; the client gets only `public`, so that it cannot
    tell a forged signature from a stale one (which would tell it which signatures are genuine)."""

    public = "invalid signature"


class BadSignature(BadWebhook):
    """A missing, malformed, forged or stale Stripe-Signature."""


class BadPayload(BadWebhook):
    """A body that is not a Stripe event (checked after its signature, when there is one)."""

    public = "invalid payload"


def single_header(values: Sequence[str]) -> str | None:
    """Stripe sends one Stripe-Signature header: several are refused rather than one picked."""
    if len(values) > 1:
        raise BadSignature(f"{len(values)} Stripe-Signature headers")
    return values[0] if values else None


class WebhookVerifier:
    def __init__(self, secrets: tuple[str, ...], tolerance: int) -> None:
        if not secrets:
            raise ValueError("at least one webhook secret")
        self.secrets = secrets
        self.tolerance = tolerance

    def verify(self, payload: bytes, header: str | None) -> dict[str, Any]:
        if not header:
            raise BadSignature("missing Stripe-Signature header")
        # The stripe package compares with hmac.compare_digest, which raises TypeError on a
        # non-ASCII str: such a header (headers arrive decoded as latin-1) is refused here.
        if not (header.isascii() and header.isprintable()):
            raise BadSignature("Stripe-Signature header is not printable ASCII")
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError:
            raise BadPayload("body is not UTF-8") from None
        # During a secret rotation any configured secret may have signed it.
        for secret in self.secrets:
            try:
                # The tolerance must be explicit: verify_header defaults to no age check at all.
                stripe.WebhookSignature.verify_header(text, header, secret, tolerance=self.tolerance)
                break
            except stripe.SignatureVerificationError as exc:
                error = str(exc.user_message or exc)
            except (TypeError, ValueError) as exc:
                # Whatever else a hostile header can make the stripe package trip on is a 400 too.
                error = f"malformed header ({type(exc).__name__})"
        else:
            raise BadSignature(f"signature verification failed: {error}")
        # Parsed from the verified bytes, without building Stripe objects.
        try:
            event = orjson.loads(payload)
        except orjson.JSONDecodeError:
            raise BadPayload("body is not JSON") from None
        if not (
            isinstance(event, dict)
            and isinstance(event.get("id"), str)
            and isinstance(event.get("type"), str)
            and isinstance(event.get("created"), int)
            and isinstance(event.get("data"), dict)
            and isinstance(event["data"].get("object"), dict)
        ):
            raise BadPayload("body is not a Stripe event (id, type, created, data.object)")
        return event


def sign(payload: bytes, secret: str, timestamp: int | None = None) -> str:
    """A Stripe-Signature header for `payload` (tests, `license-broker send`)."""
    return str(stripe.WebhookSignature.generate_signature_header(payload.decode(), secret, timestamp=timestamp))
