from __future__ import annotations

import time

import orjson
import pytest

from webhook.samples import SampleEvents
from webhook.signature import BadWebhook, WebhookVerifier, sign

SECRET = "whsec_unit"


@pytest.fixture
def payload() -> bytes:
    return orjson.dumps(SampleEvents("lic_unit").checkout_completed(int(time.time())))


def test_a_valid_signature_yields_the_parsed_event(payload: bytes) -> None:
    event = WebhookVerifier((SECRET,), 300).verify(payload, sign(payload, SECRET))
    assert event["type"] == "checkout.session.completed"
    assert event["data"]["object"]["metadata"]["license_id"] == "lic_unit"


def test_any_secret_of_a_rotation_verifies(payload: bytes) -> None:
    verifier = WebhookVerifier(("whsec_old", SECRET), 300)
    assert verifier.verify(payload, sign(payload, SECRET))["id"]
    assert verifier.verify(payload, sign(payload, "whsec_old"))["id"]


def test_a_header_with_one_signature_per_live_secret_verifies(payload: bytes) -> None:
    timestamp = int(time.time())
    old = sign(payload, "whsec_retired", timestamp)
    new = sign(payload, SECRET, timestamp)
    header = f"{old},{new.split(',')[1]}"
    assert WebhookVerifier((SECRET,), 300).verify(payload, header)["id"]


@pytest.mark.parametrize(
    ("make_header", "message"),
    [
        (lambda p: None, "missing Stripe-Signature"),
        (lambda p: "", "missing Stripe-Signature"),
        (lambda p: sign(p, "whsec_forged"), "signature verification failed"),
        (lambda p: sign(p, SECRET, int(time.time()) - 301), "tolerance"),
        (lambda p: "t=abc,v1=zzz", "signature verification failed"),
    ],
    ids=["absent", "empty", "forged", "stale", "garbled"],
)
def test_bad_signatures_are_rejected(payload: bytes, make_header, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(BadWebhook, match=message):
        WebhookVerifier((SECRET,), 300).verify(payload, make_header(payload))


def test_a_tampered_body_is_rejected(payload: bytes) -> None:
    header = sign(payload, SECRET)
    tampered = payload.replace(b'"paid"', b'"unpaid"')
    with pytest.raises(BadWebhook, match="signature verification failed"):
        WebhookVerifier((SECRET,), 300).verify(tampered, header)


@pytest.mark.parametrize("body", [b"not json", b"[1,2]", b'{"id": "evt_1", "type": "x"}', b"\xff\xfe"])
def test_a_signed_body_that_is_not_a_stripe_event_is_rejected(body: bytes) -> None:
    header = f"t={int(time.time())},v1={'0' * 64}"
    if body != b"\xff\xfe":
        header = sign(body, SECRET)
    with pytest.raises(BadWebhook):
        WebhookVerifier((SECRET,), 300).verify(body, header)
