"""Hostile input, generated: bodies, headers and query strings against the webhook and the stream
apps (random bytes, deep or huge JSON, huge numbers, unicode, repeated headers, odd resume points
and tokens). Every answer is 2xx or 4xx, never 5xx; a webhook without a valid signature, or a
signed body that is no Stripe event, is a 4xx and writes nothing; a well-signed event of any content
is a 2xx (Stripe retries anything else for three days)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import string
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from broker.storage.schema import metadata
from stream.app import create_app as create_stream_app
from tests.support.licenses import TOKEN_SECRET, WEBHOOK_SECRET, make_settings
from tests.support.processes import serving
from tests.support.services import psycopg_connect
from webhook.app import create_app as create_webhook_app
from webhook.signature import sign

# Modest: the module stays well under 20 s; the database is real, so is every request.
HOSTILE = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
HOSTILE_MORE = settings(HOSTILE, max_examples=100)

EVENT_TYPES = [
    "checkout.session.completed",
    "checkout.session.async_payment_succeeded",
    "customer.subscription.created",
    "customer.subscription.updated",
    "customer.subscription.deleted",
    "invoice.paid",
    "invoice.payment_failed",
    "charge.succeeded",
    "charge.refunded",
    "charge.dispute.created",
    "entitlements.active_entitlement_summary.updated",
    "product.created",
]

MAX_BODY = make_settings("").webhook_max_body  # the webhook fixture's WEBHOOK_MAX_BODY

# A few bodies too big or too deep to generate one by one.
HUGE_BODIES = [
    b"[" * 100_000 + b"]" * 100_000,
    b'{"a":' * 20_000 + b"1" + b"}" * 20_000,
    b"[" + b",".join([b"1e308"] * 100_000) + b"]",
    b'{"id":"evt_1","type":"invoice.paid","created":' + b"9" * 50_000 + b',"data":{"object":{}}}',
    json.dumps(
        {"id": "evt_big", "type": "invoice.paid", "created": 1, "data": {"object": {"x": "é" * 300_000}}}
    ).encode(),
]

# Any text (NUL included: Postgres text cannot hold it, so ids with one are refused before any
# insert) and integers of any size (a BIGINT column holds none beyond 2^63).
TEXT = st.text(st.characters(blacklist_categories=["Cs"]), max_size=40)
NUMBERS = (
    st.integers()
    | st.sampled_from([2**63 - 1, -(2**63), -(2**63) - 1, 2**64, 10**30, -1, 0])
    | st.floats(allow_nan=False)
)
JSON = st.recursive(
    st.none() | st.booleans() | NUMBERS | TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=20,
)


STRIPE_OBJECT = st.fixed_dictionaries(
    {},
    optional={
        "id": TEXT | JSON,
        "object": st.sampled_from(["subscription", "invoice", "charge", "checkout.session"]) | TEXT,
        "metadata": st.fixed_dictionaries({}, optional={"license_id": TEXT | JSON}) | JSON,
        "client_reference_id": TEXT | JSON,
        "customer": TEXT | JSON,
        "subscription": TEXT | JSON,
        "payment_intent": TEXT | JSON,
        "charge": TEXT | JSON,
        "status": st.sampled_from(["active", "past_due", "canceled", "paid", "trialing"]) | TEXT | JSON,
        "payment_status": st.sampled_from(["paid", "unpaid"]) | JSON,
        "current_period_end": NUMBERS | JSON,
        "cancel_at_period_end": JSON,
        "created": NUMBERS,
        "amount": NUMBERS,
        "amount_refunded": NUMBERS,
        "refunded": JSON,
        "items": JSON,
        "lines": JSON,
        "entitlements": JSON,
    },
)
STRIPE_EVENT = st.fixed_dictionaries(
    {
        # Mostly fresh ids (hypothesis repeats its values, and a repeated id is only a duplicate).
        "id": st.builds(lambda: f"evt_{uuid.uuid4().hex}") | TEXT,
        "type": st.sampled_from(EVENT_TYPES) | TEXT,
        "created": st.one_of(*[st.integers(min_value=0, max_value=2**63 - 1)] * 3, JSON),
        "data": st.fixed_dictionaries({"object": STRIPE_OBJECT}, optional={"previous_attributes": JSON}),
    },
    optional={"livemode": JSON, "account": JSON, "api_version": JSON, "object": JSON},
)
STRIPE_EVENT_BODIES = STRIPE_EVENT.map(lambda event: json.dumps(event, ensure_ascii=False).encode())
BODIES = (
    st.binary(max_size=2000)
    | JSON.map(lambda value: json.dumps(value).encode())
    | STRIPE_EVENT_BODIES
    | st.sampled_from(HUGE_BODIES)
)
ASCII = st.text(string.printable.replace("\r", "").replace("\n", "").replace("\x0b", "").replace("\x0c", ""))
SIGNATURES = (
    ASCII
    | st.builds(lambda t, v: f"t={t},v1={v}", st.integers() | ASCII, ASCII)
    | st.builds(lambda t: f"t={t},v1={'0' * 64},v0={'f' * 64}", st.integers())
    | st.builds(lambda text: sign(text.encode(), "whsec_someone_else"), TEXT)
    | st.builds(lambda body: sign(b"{}", WEBHOOK_SECRET, timestamp=int(time.time()) - 3600), st.none())
)


def header_value(raw: str | bytes) -> bytes:
    """The bytes of `raw` that HTTP allows in a header value (obs-text included), without the
    surrounding whitespace HTTP drops: what any client can get through to the app."""
    data = raw.encode() if isinstance(raw, str) else raw
    return bytes(b for b in data if b >= 0x20 and b != 0x7F).strip(b" \t")


HEADER_VALUES = st.binary(max_size=60).map(header_value)


def signed_headers(body: bytes) -> dict[str, str]:
    return {"stripe-signature": sign(body, WEBHOOK_SECRET), "content-type": "application/json"}


def stripe_event(body: bytes) -> bool:
    """Whether `body` is a Stripe event as the contract reads one: JSON with a string id and type,
    an integer created and an object data.object (anything else is a malformed body, a 400)."""
    try:
        event = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    return (
        isinstance(event, dict)
        and isinstance(event.get("id"), str)
        and isinstance(event.get("type"), str)
        and isinstance(event.get("created"), int)
        and isinstance(event.get("data"), dict)
        and isinstance(event["data"].get("object"), dict)
    )


def rows_written(url: str) -> dict[str, int]:
    with psycopg_connect(url) as conn:
        counts = {t.name: conn.execute(f"SELECT count(*) FROM {t.name}").fetchone() for t in metadata.sorted_tables}
    return {name: int(row[0]) if row else 0 for name, row in counts.items() if row and row[0]}


@pytest.fixture
async def webhook(pg_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with serving(create_webhook_app(make_settings(pg_url))) as url, httpx.AsyncClient(base_url=url) as http:
        yield http


AUDIENCE, ISSUER = "licenses", "shop"


@pytest.fixture
async def stream(pg_url: str) -> AsyncIterator[httpx.AsyncClient]:
    # Audience and issuer configured: odd `aud` and `iss` claims are checked, not just refused.
    app = create_stream_app(make_settings(pg_url, token_audience=AUDIENCE, token_issuer=ISSUER))
    async with serving(app) as url, httpx.AsyncClient(base_url=url) as http:
        yield http


@HOSTILE
@given(
    body=BODIES,
    signatures=st.lists(SIGNATURES, max_size=3),
    content_type=st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded"]) | ASCII,
    extra=st.lists(st.tuples(st.sampled_from(["x-request-id", "content-encoding", "accept"]), HEADER_VALUES)),
)
async def test_an_unsigned_webhook_is_a_4xx_and_writes_nothing(
    webhook: httpx.AsyncClient, pg_url: str, body: bytes, signatures: list[str], content_type: str, extra: list[Any]
) -> None:
    headers = [
        ("content-type", header_value(content_type)),
        *(("stripe-signature", header_value(s)) for s in signatures),
    ]
    headers += extra
    response = await webhook.post("/api/stripe/webhooks", content=body, headers=headers)
    event(f"{response.status_code}")
    assert 400 <= response.status_code < 500, response.text
    assert rows_written(pg_url) == {}


@HOSTILE_MORE
@given(body=st.one_of(STRIPE_EVENT_BODIES, STRIPE_EVENT_BODIES, BODIES))
async def test_a_signed_body_of_any_shape_is_a_2xx_unless_it_is_no_stripe_event(
    webhook: httpx.AsyncClient, pg_url: str, body: bytes
) -> None:
    try:
        signature = sign(body, WEBHOOK_SECRET)
    except UnicodeDecodeError:
        signature = f"t={int(time.time())},v1={'0' * 64}"  # the stripe package signs text only
    headers = {"stripe-signature": signature, "content-type": "application/json"}
    before = rows_written(pg_url)
    response = await webhook.post("/api/stripe/webhooks", content=body, headers=headers)
    event(f"{response.status_code} {response.json().get('outcome', '')}")
    # Stripe retries any answer but a 2xx for three days: a signed event of any content is
    # answered 2xx; only a body beyond WEBHOOK_MAX_BODY (413) or one that is no Stripe event at
    # all (400) is refused, with nothing written.
    if len(body) > MAX_BODY:
        assert response.status_code == 413, response.text
    elif stripe_event(body):
        assert response.status_code == 200 and response.json()["received"] is True, response.text
    else:
        assert response.status_code == 400, response.text
    if response.status_code != 200:
        assert rows_written(pg_url) == before


LICENSE_IDS = st.sampled_from(["lic_1", "lic_2", "lic_\x00", "l" * 201, "é" * 200, "lic_1/..", "%00"]) | st.text(
    min_size=1, max_size=300
)
CLAIM_VALUES = JSON | st.integers() | st.sampled_from([10**40, -1, 0, "9999999999", 1e308])


def hs256(claims: dict[str, Any], header: dict[str, Any] | None = None) -> str:
    """A JWT signed with the stream's secret, whatever its claims (PyJWT's encode would refuse
    some of them)."""

    def part(data: bytes) -> bytes:
        return base64.urlsafe_b64encode(data).rstrip(b"=")

    signing_input = (
        part(json.dumps(header or {"alg": "HS256", "typ": "JWT"}).encode()) + b"." + part(json.dumps(claims).encode())
    )
    signature = hmac.new(TOKEN_SECRET.encode(), signing_input, hashlib.sha256).digest()
    return (signing_input + b"." + part(signature)).decode()


@st.composite
def tokens(draw: st.DrawFn, license_id: str) -> str:
    """Nonsense, or well-signed tokens with odd claims (huge, negative or missing exp, odd sub,
    aud and iss) and odd headers."""
    kind = draw(st.sampled_from(["valid", "signed", "garbage"]))
    if kind == "garbage":
        return draw(ASCII)
    now = int(time.time())
    claims: dict[str, Any] = {"sub": license_id, "exp": now + 600, "aud": AUDIENCE, "iss": ISSUER}
    if kind == "signed":
        claims = draw(
            st.fixed_dictionaries(
                {},
                optional={
                    "sub": st.just(license_id) | CLAIM_VALUES,
                    "exp": st.just(now + 600) | CLAIM_VALUES,
                    "iat": CLAIM_VALUES,
                    "nbf": CLAIM_VALUES,
                    "aud": st.just(AUDIENCE) | st.just([AUDIENCE, [1]]) | CLAIM_VALUES,
                    "iss": st.just(ISSUER) | CLAIM_VALUES,
                },
            )
        )
        header = draw(st.none() | st.fixed_dictionaries({"alg": st.sampled_from(["HS256", "none", "RS256"]) | JSON}))
        return hs256(claims, header)
    return hs256(claims)


RESUME_POINTS = (
    st.none()
    | st.integers().map(str)
    | st.sampled_from([str(2**63 - 1), str(2**63), "9" * 5000, "", " ", "1e3", "0x1", "٣", "-0"])
    | ASCII
)


@HOSTILE_MORE
@given(data=st.data())
async def test_stream_requests_with_odd_tokens_resume_points_and_queries_are_never_a_5xx(
    stream: httpx.AsyncClient, data: st.DataObject
) -> None:
    license_id = data.draw(LICENSE_IDS, label="license_id")
    token_for = data.draw(st.sampled_from([license_id, license_id, "lic_1"]), label="token for")
    token = data.draw(tokens(token_for), label="token")
    resume = data.draw(RESUME_POINTS, label="resume point")
    headers: list[tuple[str, bytes]] = []
    params: list[tuple[str, str]] = data.draw(st.lists(st.tuples(ASCII, ASCII), max_size=3), label="params")
    where = data.draw(st.sampled_from(["header", "query", "both"]), label="token in")
    if where in ("header", "both"):
        scheme = data.draw(st.sampled_from(["Bearer ", "bearer ", "BEARER\t", "Basic "]), label="scheme")
        headers.append(("authorization", header_value(scheme + token)))
    if where in ("query", "both"):
        params.append(("token", token))
    if resume is not None:
        if data.draw(st.booleans(), label="resume in header"):
            headers.append(("last-event-id", header_value(resume)))
        else:
            params.append(("lastEventId", resume))
    repeated = st.tuples(st.sampled_from(["last-event-id", "authorization"]), HEADER_VALUES)
    headers += data.draw(st.lists(repeated, max_size=2), label="repeated headers")
    path = quote(license_id, safe="")
    async with stream.stream("GET", f"/api/licenses/{path}/events", headers=headers, params=params) as response:
        assert response.status_code < 500, (response.status_code, await response.aread())
    state = await stream.get(f"/api/licenses/{path}", headers=headers, params=params)
    event(f"events {response.status_code}, state {state.status_code}")
    assert state.status_code < 500, state.text


async def test_a_non_ascii_signature_header_is_a_400(webhook: httpx.AsyncClient, pg_url: str) -> None:
    for value in ("t=1,v1=é".encode("latin-1"), "t=1,v1=é".encode()):
        response = await webhook.post("/api/stripe/webhooks", content=b"{}", headers={"stripe-signature": value})
        assert response.status_code == 400
    assert rows_written(pg_url) == {}


async def test_a_signed_event_with_a_nul_character_is_a_2xx_and_changes_nothing(
    webhook: httpx.AsyncClient, pg_url: str
) -> None:
    body = b'{"id":"evt_\\u0000","type":"invoice.paid","created":1700000000,"data":{"object":{"id":"in_1"}}}'
    response = await webhook.post("/api/stripe/webhooks", content=body, headers=signed_headers(body))
    assert (response.status_code, response.json().get("outcome")) == (200, "unmatched"), response.text
    assert rows_written(pg_url) == {}  # an id Postgres cannot hold is not even recorded


async def test_a_signed_event_created_beyond_a_bigint_is_a_2xx_and_changes_nothing(
    webhook: httpx.AsyncClient, pg_url: str
) -> None:
    body = b'{"id":"evt_late","type":"invoice.paid","created":9223372036854775808,"data":{"object":{"id":"in_1"}}}'
    response = await webhook.post("/api/stripe/webhooks", content=body, headers=signed_headers(body))
    assert (response.status_code, response.json().get("outcome")) == (200, "unmatched"), response.text
    assert rows_written(pg_url) == {}


async def test_a_signed_event_with_ids_longer_than_their_columns_is_a_2xx_and_changes_nothing(
    webhook: httpx.AsyncClient, pg_url: str
) -> None:
    # Stripe's metadata values may be 500 characters; licenses.id and the Stripe id columns hold 200.
    obj = {"id": "sub_1", "object": "subscription", "status": "active", "customer": "cus_" + "c" * 300,
           "metadata": {"license_id": "l" * 250}}  # fmt: skip
    kind = "customer.subscription.updated"
    event = {"id": "evt_long_ids", "type": kind, "created": 1_700_000_000, "data": {"object": obj}}
    body = json.dumps(event).encode()
    response = await webhook.post("/api/stripe/webhooks", content=body, headers=signed_headers(body))
    assert (response.status_code, response.json().get("outcome")) == (200, "unmatched"), response.text
    assert rows_written(pg_url) == {"stripe_events": 1}  # recorded, and no license, object or log row
