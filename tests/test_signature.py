from __future__ import annotations

import time

import orjson
import pytest

from webhook.samples import SampleEvents
from webhook.signature import BadPayload, BadSignature, BadWebhook, WebhookVerifier, sign, single_header

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


@pytest.mark.parametrize(
    "header",
    [
        "t=1,v1=\xe9\xe9",  # a latin-1 byte, as headers arrive decoded
        "t=1,v1=\u00e9" + "0" * 63,
        "t=\u0661\u0662,v1=" + "0" * 64,  # digits int() accepts, in another script
        "t=1,v1=00\x00",
        "t=" + "9" * 5000 + ",v1=00",
        "t=,v1=,=,,,t=x",
        ",,,,",
        "v1=" + "0" * 64,
    ],
    ids=["latin-1", "utf-8", "arabic-digits", "nul", "huge-timestamp", "empty-fields", "commas", "no-timestamp"],
)
def test_a_malformed_header_is_a_bad_signature_never_another_error(payload: bytes, header: str) -> None:
    with pytest.raises(BadSignature) as raised:
        WebhookVerifier((SECRET,), 300).verify(payload, header)
    assert raised.value.public == "invalid signature"


def test_repeated_signature_headers_are_refused_rather_than_one_picked(payload: bytes) -> None:
    header = sign(payload, SECRET)
    assert single_header([header]) == header
    assert single_header([]) is None
    with pytest.raises(BadSignature, match="2 Stripe-Signature headers"):
        single_header([header, header])


def test_the_public_answer_is_the_same_for_every_signature_failure_and_names_the_payload_otherwise() -> None:
    stale = BadSignature("signature verification failed: Timestamp outside the tolerance zone")
    forged = BadSignature("signature verification failed: No signatures found matching")
    assert stale.public == forged.public == "invalid signature"
    assert BadPayload("body is not JSON").public == "invalid payload"
