"""Subscriber tokens: a maximum lifetime, audience and issuer, generic refusals, and streams that
end with their token."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator

import httpx
import jwt
import pytest

from broker.signing import tokens
from broker.storage.db import create_engine
from broker.storage.eventlog import EventLog
from broker.transports.memory import MemoryTransport
from license_broker.embedded import create_app
from stream.catchup import license_stream
from stream.hub import SubscriptionHub
from tests.support.licenses import TOKEN_SECRET, make_settings, new_license
from tests.support.processes import serving

DAY = 86400


def claims_token(secret: str = TOKEN_SECRET, **claims: object) -> str:
    return jwt.encode(claims, secret, algorithm="HS256")


def test_a_token_expiring_further_away_than_the_maximum_lifetime_is_refused() -> None:
    now = int(time.time())
    ok = claims_token(sub="lic_1", aud="license-broker", exp=now + 30 * DAY)
    assert tokens.verify(TOKEN_SECRET, ok, max_ttl=30 * DAY).license_id == "lic_1"
    for exp in (now + 31 * DAY, 10**12, 10**40):  # a month too long, the year 33,658, never
        with pytest.raises(tokens.InvalidToken, match="STREAM_TOKEN_MAX_TTL"):
            too_long = claims_token(sub="lic_1", aud="license-broker", exp=exp)
            tokens.verify(TOKEN_SECRET, too_long, max_ttl=30 * DAY)


def test_an_audience_is_required_by_default() -> None:
    settings = make_settings("sqlite://")
    assert settings.token_audience == "license-broker"
    exp = int(time.time()) + 600
    for claims in ({}, {"aud": "my-web-app"}, {"aud": ["my-web-app"]}):
        with pytest.raises(tokens.InvalidToken, match=r"(?i)aud"):
            tokens.verify_for(settings, claims_token(sub="lic_1", exp=exp, **claims))
    for aud in ("license-broker", ["my-web-app", "license-broker"]):
        assert tokens.verify_for(settings, claims_token(sub="lic_1", exp=exp, aud=aud)).license_id == "lic_1"


@pytest.mark.parametrize("typ", ["refresh", "id", "session", "Stream", "", 1, ["stream"], None])
def test_a_token_of_a_type_the_broker_does_not_expect_is_refused(typ: object) -> None:
    """A web app's own tokens signed with the same secret (which docs/deploy.md says not to do)."""
    settings = make_settings("sqlite://")
    token = claims_token(sub="lic_demo", aud="license-broker", typ=typ, exp=int(time.time()) + 600)
    with pytest.raises(tokens.InvalidToken, match="typ"):
        tokens.verify_for(settings, token)


def test_stream_and_machine_tokens_and_tokens_without_a_type_are_accepted() -> None:
    settings = make_settings("sqlite://")
    exp = int(time.time()) + 600
    machine = {"typ": "machine", "machine": "mch_1", "fingerprint": "a" * 64}
    for claims in ({"typ": "stream"}, machine, {}):
        token = claims_token(sub="lic_1", aud="license-broker", exp=exp, **claims)
        assert tokens.verify_for(settings, token).license_id == "lic_1"
    # A machine token names its machine and the fingerprint its leases are bound to.
    for missing in ("machine", "fingerprint"):
        partial = {k: v for k, v in machine.items() if k != missing}
        with pytest.raises(tokens.InvalidToken):
            tokens.verify_for(settings, claims_token(sub="lic_1", aud="license-broker", exp=exp, **partial))


def test_every_token_the_broker_mints_carries_its_audience_and_a_type() -> None:
    for settings in (make_settings("sqlite://"), make_settings("sqlite://", token_audience="licenses")):
        for token in (tokens.mint_for(settings, "lic_1", ttl=60), tokens.mint(TOKEN_SECRET, "lic_1")):
            claims = jwt.decode(token, options={"verify_signature": False})
            assert claims["typ"] == "stream"
            assert claims["aud"] in ("license-broker", settings.token_audience)
        assert tokens.verify_for(settings, tokens.mint_for(settings, "lic_1", ttl=60)).license_id == "lic_1"


async def test_a_web_session_token_signed_with_the_stream_secret_opens_no_stream(pg_url: str) -> None:
    license_id = new_license()
    now = int(time.time())
    session = claims_token(sub=license_id, typ="refresh", exp=now + 600)
    session_with_audience = claims_token(sub=license_id, typ="refresh", aud="license-broker", exp=now + 600)
    no_audience = claims_token(sub=license_id, exp=now + 600)
    async with serving(create_app(make_settings(pg_url))) as url, httpx.AsyncClient() as http:
        for token in (session, session_with_audience, no_audience):
            headers = {"authorization": f"Bearer {token}"}
            for path in (f"/api/licenses/{license_id}/events", f"/api/licenses/{license_id}"):
                response = await http.get(url + path, headers=headers)
                assert response.status_code == 401, (token, path)
        accepted = await http.get(
            f"{url}/api/licenses/{license_id}", params={"token": tokens.mint(TOKEN_SECRET, license_id)}
        )
        assert accepted.status_code == 200


def test_an_audience_and_an_issuer_are_required_once_configured() -> None:
    exp = int(time.time()) + 600
    good = claims_token(sub="lic_1", exp=exp, aud="licenses", iss="shop")
    grant = tokens.verify(TOKEN_SECRET, good, audience="licenses", issuer="shop")
    assert (grant.license_id, grant.expires_at) == ("lic_1", exp)
    for claims in (
        {"iss": "shop"},  # no audience
        {"aud": "other", "iss": "shop"},
        {"aud": "licenses"},  # no issuer
        {"aud": "licenses", "iss": "elsewhere"},
    ):
        with pytest.raises(tokens.InvalidToken):
            tokens.verify(
                TOKEN_SECRET, claims_token(sub="lic_1", exp=exp, **claims), audience="licenses", issuer="shop"
            )


def test_minting_for_the_settings_passes_their_own_checks() -> None:
    settings = make_settings("sqlite://", token_audience="licenses", token_issuer="shop", token_max_ttl=600.0)
    token = tokens.mint_for(settings, "lic_1", ttl=7 * DAY)  # more than allowed: cut to the maximum
    grant = tokens.verify_for(settings, token)
    assert grant.license_id == "lic_1"
    assert grant.expires_at <= time.time() + 600
    assert jwt.decode(token, options={"verify_signature": False})["aud"] == "licenses"


@pytest.fixture
async def strict(pg_url: str) -> AsyncIterator[str]:
    settings = make_settings(pg_url, token_audience="licenses", token_issuer="shop", token_max_ttl=float(DAY))
    async with serving(create_app(settings)) as url:
        yield url


async def test_every_refused_token_gets_the_same_body_and_the_reason_goes_to_the_log(
    strict: str, caplog: pytest.LogCaptureFixture
) -> None:
    license_id = new_license()
    now = int(time.time())
    good = {"sub": license_id, "aud": "licenses", "iss": "shop"}
    refused = {
        "typ 'refresh'": claims_token(**good, typ="refresh", exp=now + 60),
        "Signature has expired": claims_token(**good, exp=now - 10),
        "Signature verification failed": claims_token("another-secret-0123456789-abcdefghijkl", **good, exp=now + 60),
        "STREAM_TOKEN_MAX_TTL": claims_token(**good, exp=now + 2 * DAY),
        "Audience": claims_token(**{**good, "aud": "other"}, exp=now + 60),
        "iss": claims_token(**{**good, "iss": "elsewhere"}, exp=now + 60),
        "Not enough segments": "garbage",
    }
    caplog.set_level(logging.INFO, logger="stream")
    async with httpx.AsyncClient() as http:
        for reason, token in refused.items():
            for path in (f"/api/licenses/{license_id}/events", f"/api/licenses/{license_id}"):
                response = await http.get(strict + path, params={"token": token})
                assert (response.status_code, response.json()) == (401, {"error": "invalid token"}), reason
            assert reason in caplog.text
        fresh = claims_token(**good, exp=now + 60)
        accepted = await http.get(f"{strict}/api/licenses/{license_id}", params={"token": fresh})
        assert accepted.status_code == 200


async def test_a_stream_ends_when_its_token_expires(strict: str) -> None:
    license_id = new_license()
    token = tokens.mint(TOKEN_SECRET, license_id, ttl=2, audience="licenses", issuer="shop")
    expires_at = jwt.decode(token, options={"verify_signature": False})["exp"]
    lines: list[str] = []
    async with httpx.AsyncClient(timeout=10) as http:
        headers = {"authorization": f"Bearer {token}"}
        async with http.stream("GET", f"{strict}/api/licenses/{license_id}/events", headers=headers) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():  # ends by itself, heartbeats notwithstanding
                lines.append(line)
    assert "id: 0" in lines
    assert time.time() >= expires_at - 0.05  # not before the token's expiry


async def test_the_stream_ends_at_its_token_expiry_even_before_its_maximum_lifetime(pg_url: str) -> None:
    engine = create_engine(make_settings(pg_url))
    events = EventLog(engine)
    settings = make_settings(pg_url, heartbeat_interval=0.1, max_connection_lifetime=3600.0)
    hub = SubscriptionHub(MemoryTransport(), buffer=8)
    await hub.start()
    try:
        stream = license_stream(events, hub, settings, new_license(), None, expires_at=time.time() + 0.5)
        chunks = [chunk async for chunk in stream]
    finally:
        await hub.close()
        await engine.dispose()
    assert chunks[:2] == [b"retry: 2000\n\n", chunks[1]] and chunks[1].startswith(b"id: 0\n")
    assert set(chunks[2:]) <= {b": ping\n\n"}
