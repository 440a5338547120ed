"""Stripe signature verification on the exact bytes received, with the `stripe` package."""

from __future__ import annotations

from typing import Any

import orjson
import stripe


class BadWebhook(Exception):
    """400: a missing, forged or stale signature, or a body that is not a Stripe event."""


class WebhookVerifier:
    def __init__(self, secrets: tuple[str, ...], tolerance: int) -> None:
        if not secrets:
            raise ValueError("at least one webhook secret")
        self.secrets = secrets
        self.tolerance = tolerance

    def verify(self, payload: bytes, header: str | None) -> dict[str, Any]:
        if not header:
            raise BadWebhook("missing Stripe-Signature header")
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError:
            raise BadWebhook("body is not UTF-8") from None
        # During a secret rotation any configured secret may have signed it.
        for secret in self.secrets:
            try:
                # The tolerance must be explicit: verify_header defaults to no age check at all.
                stripe.WebhookSignature.verify_header(text, header, secret, tolerance=self.tolerance)
                break
            except stripe.SignatureVerificationError as exc:
                error = str(exc.user_message or exc)
        else:
            raise BadWebhook(f"signature verification failed: {error}")
        # Parsed from the verified bytes, without building Stripe objects.
        try:
            event = orjson.loads(payload)
        except orjson.JSONDecodeError:
            raise BadWebhook("body is not JSON") from None
        if not (
            isinstance(event, dict)
            and isinstance(event.get("id"), str)
            and isinstance(event.get("type"), str)
            and isinstance(event.get("created"), int)
            and isinstance(event.get("data"), dict)
            and isinstance(event["data"].get("object"), dict)
        ):
            raise BadWebhook("body is not a Stripe event (id, type, created, data.object)")
        return event


def sign(payload: bytes, secret: str, timestamp: int | None = None) -> str:
    """A Stripe-Signature header for `payload` (tests, `license-broker send`)."""
    return str(stripe.WebhookSignature.generate_signature_header(payload.decode(), secret, timestamp=timestamp))
