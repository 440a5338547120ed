"""Signed leases on the server: keys and settings, the lease event after each state the client
ends up holding, renewal before half the lease is spent, the JWKS and `GET /api/licenses/{id}`."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import jwt
import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from httpx_sse import aconnect_sse

from broker.settings import Settings, SettingsError
from broker.signing.leases import LeaseKeys, LeaseSigner, key_id, private_pem, public_pem
from broker.storage.db import create_engine
from broker.storage.eventlog import EventLog
from broker.transports.memory import MemoryTransport
from license_broker.embedded import create_app
from stream.catchup import license_stream
from stream.hub import SubscriptionHub
from tests.support.licenses import append, make_settings, new_license, post_event, token_for
from tests.support.processes import run_module, serving
from webhook.samples import SampleEvents

KEYS = LeaseKeys.generate()


def decode(token: str, keys: LeaseKeys = KEYS) -> dict[str, Any]:
    claims: dict[str, Any] = jwt.decode(
        token, keys.signing.public_key(), algorithms=["EdDSA"], options={"require": ["exp", "iat", "sub"]}
    )
    return claims


def chunk_kind(chunk: bytes) -> str:
    return "lease" if chunk.startswith(b"event: lease\n") else "state" if chunk.startswith(b"id: ") else "other"


def chunk_data(chunk: bytes) -> dict[str, Any]:
    line = next(line for line in chunk.split(b"\n") if line.startswith(b"data: "))
    data: dict[str, Any] = orjson.loads(line.removeprefix(b"data: "))
    return data


# --- keys and settings --------------------------------------------------------------------------


def test_the_kid_is_the_rfc_7638_thumbprint_of_the_public_key() -> None:
    # RFC 8037, appendix A.2 and A.3: the Ed25519 test key and its thumbprint.
    x = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
    assert key_id(Ed25519PublicKey.from_public_bytes(x)) == "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"


def test_the_first_pem_block_signs_and_the_others_are_published_for_a_rotation() -> None:
    new, old = LeaseKeys.generate(), LeaseKeys.generate()
    # The new private key first; the old key as its public half, and once more as a duplicate.
    text = private_pem(new.signing) + public_pem(old.signing.public_key()) + private_pem(old.signing)
    settings = Settings.from_env({"LICENSE_SIGNING_KEY": text})
    assert settings.lease_keys is not None
    kids = [key_id(k) for k in settings.lease_keys.published]
    assert kids == [key_id(new.signing.public_key()), key_id(old.signing.public_key())]
    signer = LeaseSigner(settings.lease_keys)
    assert signer.kid == kids[0]
    assert [k["kid"] for k in orjson.loads(signer.jwks())["keys"]] == kids
    # A PEM on one line with literal \n, as environment files hold it.
    escaped = private_pem(new.signing).replace("\n", "\\n")
    assert Settings.from_env({"LICENSE_SIGNING_KEY": escaped}).lease_keys is not None


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("not a key", "expected PEM text"),
        ("PUBLIC", "the first PEM block must be the Ed25519 private key"),
        ("RSA", "is not an Ed25519 key"),
        ("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----", "cannot be read"),
    ],
)
def test_a_bad_signing_key_stops_start_up_naming_the_variable(value: str, reason: str) -> None:
    if value == "PUBLIC":
        value = public_pem(KEYS.signing.public_key())
    elif value == "RSA":
        rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        value = rsa_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode()
    with pytest.raises(SettingsError, match=f"^LICENSE_SIGNING_KEY: .*{reason}") as caught:
        Settings.from_env({"LICENSE_SIGNING_KEY": value})
    assert "AAAA" not in str(caught.value)  # never quotes key material


def test_leases_are_off_without_a_key_and_ephemeral_in_development_mode() -> None:
    assert Settings.from_env({}).lease_keys is None
    dev = Settings.from_env({"BROKER_DEV": "1"}).lease_keys
    assert dev is not None and dev.ephemeral
    assert Settings.from_env({"LICENSE_LEASE_TTL": "3600"}).lease_ttl == 3600
    assert Settings.from_env({}).lease_ttl == 7 * 86400
    with pytest.raises(SettingsError, match=r"^LICENSE_LEASE_TTL: "):
        Settings.from_env({"LICENSE_LEASE_TTL": "a week"})


def test_keys_generate_prints_a_pair_that_the_setting_accepts() -> None:
    def cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return run_module("license_broker", *args, env=env)

    generated = cli("keys", "generate")
    assert generated.returncode == 0, generated.stderr
    keys = LeaseKeys.from_pem(generated.stdout)  # the whole output can be pasted as it is
    kid = key_id(keys.signing.public_key())
    assert f"# kid {kid}" in generated.stdout
    assert [key_id(k) for k in keys.published] == [kid]  # its public half, printed too, is the same key
    public = cli("keys", "public", "--jwks", LICENSE_SIGNING_KEY=generated.stdout)
    assert [k["kid"] for k in orjson.loads(public.stdout)["keys"]] == [kid]
    assert cli("keys", "generate").stdout != generated.stdout  # a new pair each time


# --- the stream, generator level (no HTTP) ------------------------------------------------------


@pytest.fixture
async def parts(pg_url: str) -> AsyncIterator[tuple[Any, EventLog, SubscriptionHub, MemoryTransport]]:
    engine = create_engine(Settings(database_url=pg_url))
    transport = MemoryTransport()
    events = EventLog(engine)
    hub = SubscriptionHub(transport, buffer=64)
    await hub.start()
    try:
        yield engine, events, hub, transport
    finally:
        await hub.close()
        await engine.dispose()


async def collect(stream: Any, n: int) -> list[bytes]:
    return [await asyncio.wait_for(anext(stream), 5) for _ in range(n)]


async def test_each_state_is_followed_by_its_lease_and_the_state_bytes_are_unchanged(pg_url: str, parts: Any) -> None:
    engine, events, hub, transport = parts
    license_id = new_license()
    settings = make_settings(pg_url, heartbeat_interval=30)
    stream = license_stream(events, hub, settings, license_id, None, LeaseSigner(KEYS))
    try:
        chunks = await collect(stream, 3)  # retry, the current state, its lease
        live = await append(engine, license_id, "active")
        await transport.publish(license_id, live.data)
        chunks += await collect(stream, 2)
    finally:
        await stream.aclose()
    assert [chunk_kind(c) for c in chunks[1:]] == ["state", "lease", "state", "lease"]
    # The state events are exactly what they are without leases (the same bytes as in the log).
    assert chunks[3] == b"id: %d\ndata: %s\n\n" % (live.seq, live.data)
    assert b"id:" not in chunks[2] and b"id:" not in chunks[4]  # Last-Event-ID stays the state's seq
    for state, lease in ((chunks[1], chunks[2]), (chunks[3], chunks[4])):
        sent = chunk_data(lease)
        claims = decode(sent["lease"])
        assert claims["sub"] == license_id
        assert claims["seq"] == sent["seq"] == chunk_data(state)["seq"]
        assert claims["exp"] == sent["exp"] == claims["iat"] + 7 * 86400
        assert (claims["status"], claims["entitled"]) == (chunk_data(state)["status"], chunk_data(state)["entitled"])
    assert jwt.get_unverified_header(chunk_data(chunks[4])["lease"])["kid"] == key_id(KEYS.signing.public_key())


async def test_a_replay_sends_one_lease_for_the_newest_state(pg_url: str, parts: Any) -> None:
    engine, events, hub, _ = parts
    license_id = new_license()
    for status in ("active", "past_due", "canceled"):
        await append(engine, license_id, status)
    settings = make_settings(pg_url, heartbeat_interval=30, replay_batch=2)
    stream = license_stream(events, hub, settings, license_id, 1, LeaseSigner(KEYS))
    try:
        chunks = await collect(stream, 4)
    finally:
        await stream.aclose()
    assert [chunk_kind(c) for c in chunks[1:]] == ["state", "state", "lease"]
    claims = decode(chunk_data(chunks[3])["lease"])
    assert (claims["seq"], claims["status"], claims["entitled"]) == (3, "canceled", False)


async def test_a_resumed_stream_with_nothing_missed_renews_the_lease_of_the_state_held(pg_url: str, parts: Any) -> None:
    engine, events, hub, _ = parts
    license_id = new_license()
    await append(engine, license_id, "active")
    await append(engine, license_id, "active")
    stream = license_stream(events, hub, make_settings(pg_url, heartbeat_interval=30), license_id, 2, LeaseSigner(KEYS))
    try:
        chunks = await collect(stream, 2)
    finally:
        await stream.aclose()
    assert chunk_kind(chunks[1]) == "lease"  # no state sent again: the client has it
    assert (decode(chunk_data(chunks[1])["lease"])["seq"], decode(chunk_data(chunks[1])["lease"])["entitled"]) == (
        2,
        True,
    )


async def test_an_open_stream_gets_a_renewed_lease_before_half_of_the_last_is_spent(pg_url: str, parts: Any) -> None:
    _, events, hub, _ = parts
    license_id = new_license()
    # Heartbeats every 30 s: the renewal after ~1.5 s (half of a 4 s lease, whose iat is whole
    # seconds) must come from its own deadline.
    settings = make_settings(pg_url, heartbeat_interval=30)
    stream = license_stream(events, hub, settings, license_id, None, LeaseSigner(KEYS, ttl=4))
    try:
        chunks = await collect(stream, 3)
        first = decode(chunk_data(chunks[2])["lease"])
        renewed_chunk = await asyncio.wait_for(anext(stream), 5)
        received_at = time.time()
    finally:
        await stream.aclose()
    assert chunk_kind(renewed_chunk) == "lease"
    renewed = decode(chunk_data(renewed_chunk)["lease"])
    assert renewed["seq"] == first["seq"] == 0
    assert renewed["exp"] > first["exp"]
    assert received_at < first["exp"]  # the client never held an expired lease


async def test_without_a_signer_the_stream_is_as_before(pg_url: str, parts: Any) -> None:
    engine, events, hub, transport = parts
    license_id = new_license()
    stream = license_stream(events, hub, make_settings(pg_url, heartbeat_interval=0.05), license_id, None)
    try:
        chunks = await collect(stream, 2)
        live = await append(engine, license_id, "active")
        await transport.publish(license_id, live.data)
        chunks.append(await asyncio.wait_for(anext(stream), 5))
        while chunk_kind(chunks[-1]) != "state":  # heartbeats (every 0.05 s) until the event
            chunks.append(await asyncio.wait_for(anext(stream), 5))
    finally:
        await stream.aclose()
    kinds = [chunk_kind(c) for c in chunks[1:]]
    assert kinds[0] == kinds[-1] == "state" and set(kinds[1:-1]) <= {"other"}
    assert chunks[-1] == b"id: %d\ndata: %s\n\n" % (live.seq, live.data)


# --- over HTTP ----------------------------------------------------------------------------------


async def test_the_jwks_the_state_endpoint_and_the_stream_agree(pg_url: str) -> None:
    license_id = new_license()
    headers = {"authorization": f"Bearer {token_for(license_id)}"}
    async with serving(create_app(make_settings(pg_url, lease_keys=KEYS))) as url, httpx.AsyncClient() as client:
        for event in SampleEvents(license_id).for_action("pay"):
            assert (await post_event(client, url, event)).status_code == 200
        jwks = (await client.get(f"{url}/.well-known/jwks.json")).json()
        state = (await client.get(f"{url}/api/licenses/{license_id}", headers=headers)).json()
        seen: list[tuple[str, str, dict[str, Any]]] = []
        async with aconnect_sse(client, "GET", f"{url}/api/licenses/{license_id}/events", headers=headers) as source:
            async for sse in source.aiter_sse():
                if not sse.data:
                    continue  # the retry: hint
                seen.append((sse.event, sse.id, sse.json()))
                if len(seen) == 2:
                    break
    key = jwt.PyJWKSet.from_dict(jwks)[key_id(KEYS.signing.public_key())]
    from_get = jwt.decode(state["lease"], key, algorithms=["EdDSA"])
    assert (from_get["sub"], from_get["seq"], from_get["entitled"]) == (license_id, state["seq"], True)
    assert from_get["features"] == state["state"]["features"]
    assert from_get["current_period_end"] == state["state"]["current_period_end"] is not None
    (kind, seq_id, current), (lease_kind, lease_id, lease) = seen
    assert (kind, lease_kind) == ("message", "lease")
    assert lease_id == seq_id == str(state["seq"])  # the lease event left the last event id alone
    assert jwt.decode(lease["lease"], key, algorithms=["EdDSA"])["seq"] == current["seq"] == state["seq"]


async def test_without_a_key_there_is_no_lease_and_an_empty_jwks(pg_url: str) -> None:
    license_id = new_license()
    headers = {"authorization": f"Bearer {token_for(license_id)}"}
    async with serving(create_app(make_settings(pg_url))) as url, httpx.AsyncClient() as client:
        assert (await client.get(f"{url}/.well-known/jwks.json")).json() == {"keys": []}
        assert "lease" not in (await client.get(f"{url}/api/licenses/{license_id}", headers=headers)).json()


@pytest.mark.parametrize("keys", [None, KEYS], ids=["without a key", "with a key"])
async def test_the_stream_app_says_at_start_up_whether_it_signs_leases(
    pg_url: str, keys: LeaseKeys | None, caplog: pytest.LogCaptureFixture
) -> None:
    from stream.app import create_app as create_stream_app

    caplog.set_level(logging.INFO, logger="stream")
    async with serving(create_stream_app(make_settings(pg_url, lease_keys=keys))):
        pass
    lines = [r.getMessage() for r in caplog.records if r.name == "stream" and r.getMessage().startswith("leases:")]
    expected = (
        "LICENSE_SIGNING_KEY is not set" if keys is None else f"signing with kid {key_id(KEYS.signing.public_key())}"
    )
    assert len(lines) == 1 and expected in lines[0], lines
