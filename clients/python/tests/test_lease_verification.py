"""license_broker_client without a server: lease verification, the cache, offline answers.
Leases are signed here the way the broker signs them (EdDSA compact JWS, kid = thumbprint)."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import httpx
import jwt
import license_broker_client
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from license_broker_client import InvalidLease, LeaseCache, LeaseVerifier, LicenseClient, key_id

LICENSE = "lic_client_test"
NOW = 1_900_000_000.0


def pem(key: Ed25519PrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def jwk(key: Ed25519PrivateKey) -> dict[str, str]:
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    x = base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
    return {"kty": "OKP", "crv": "Ed25519", "x": x, "kid": key_id(key.public_key()), "alg": "EdDSA", "use": "sig"}


def lease(key: Ed25519PrivateKey, *, sub: str = LICENSE, seq: int = 3, entitled: bool = True, ttl: int = 600) -> str:
    claims = {
        "sub": sub,
        "seq": seq,
        "status": "active" if entitled else "canceled",
        "entitled": entitled,
        "features": ["pro"],
        "current_period_end": "2030-01-01T00:00:00+00:00",
        "iat": int(NOW),
        "exp": int(NOW) + ttl,
    }
    return jwt.encode(claims, key, algorithm="EdDSA", headers={"kid": key_id(key.public_key())})


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def pinned(key: Ed25519PrivateKey, now: float = NOW) -> LeaseVerifier:
    return LeaseVerifier([pem(key)], clock=lambda: now)


def test_these_tests_run_against_the_installed_wheel_not_the_source_tree() -> None:
    assert "site-packages" in license_broker_client.__file__


def test_a_lease_verifies_with_the_pinned_key_and_says_what_the_broker_signed(key: Ed25519PrivateKey) -> None:
    verified = pinned(key).verify(lease(key), LICENSE)
    assert (verified.license_id, verified.seq, verified.entitled, verified.features) == (LICENSE, 3, True, ("pro",))
    assert verified.expires_at == int(NOW) + 600 and verified.kid == key_id(key.public_key())


def test_a_tampered_lease_is_rejected(key: Ed25519PrivateKey) -> None:
    header, payload, signature = lease(key, entitled=False).split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["entitled"] = True  # what a user would edit
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    with pytest.raises(InvalidLease, match="does not verify"):
        pinned(key).verify(f"{header}.{forged}.{signature}", LICENSE)
    with pytest.raises(InvalidLease, match="does not verify"):
        pinned(key).verify(f"{header}.{payload}.{signature[:-4]}AAAA", LICENSE)


def test_a_lease_signed_by_another_key_or_algorithm_is_rejected(key: Ed25519PrivateKey) -> None:
    other = Ed25519PrivateKey.generate()
    with pytest.raises(InvalidLease, match="unknown key"):
        pinned(key).verify(lease(other), LICENSE)
    # The attacker's key, claiming the trusted key's kid.
    spoofed = jwt.encode({"sub": LICENSE, "seq": 9, "entitled": True, "iat": 1, "exp": int(NOW) + 60}, other,
                         algorithm="EdDSA", headers={"kid": key_id(key.public_key())})  # fmt: skip
    with pytest.raises(InvalidLease, match="does not verify"):
        pinned(key).verify(spoofed, LICENSE)
    hs256 = jwt.encode({"sub": LICENSE, "seq": 9, "entitled": True, "iat": 1, "exp": int(NOW) + 60}, "s" * 32)
    with pytest.raises(InvalidLease, match="algorithm 'HS256'"):
        pinned(key).verify(hs256, LICENSE)


def test_an_expired_lease_is_rejected_and_does_not_entitle(key: Ed25519PrivateKey, tmp_path: Path) -> None:
    token = lease(key, ttl=600)
    with pytest.raises(InvalidLease, match="expired"):
        pinned(key, now=NOW + 600).verify(token, LICENSE)
    LeaseCache(tmp_path / "lease").save(token)
    now = [NOW]
    client = LicenseClient("http://127.0.0.1:9", LICENSE, "t", cache=tmp_path / "lease",
                           verifier=LeaseVerifier([pem(key)], clock=lambda: now[0]))  # fmt: skip
    assert client.is_entitled()
    now[0] = NOW + 600  # the lease runs out while the app runs, offline
    assert not client.is_entitled()


def test_a_lease_for_another_license_is_refused(key: Ed25519PrivateKey, tmp_path: Path) -> None:
    with pytest.raises(InvalidLease, match="another license"):
        pinned(key).verify(lease(key, sub="lic_someone_else"), LICENSE)
    LeaseCache(tmp_path / "lease").save(lease(key, sub="lic_someone_else"))
    assert not LicenseClient(
        "http://127.0.0.1:9", LICENSE, "t", verifier=pinned(key), cache=tmp_path / "lease"
    ).is_entitled()


def test_an_app_started_offline_is_entitled_by_a_valid_cached_lease_and_locked_without_one(
    key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    # Nothing listens on port 9: the client never connects in this test anyway.
    def app(cache: Path) -> LicenseClient:
        return LicenseClient("http://127.0.0.1:9", LICENSE, "t", verifier=pinned(key), cache=cache)

    LeaseCache(tmp_path / "good").save(lease(key))
    assert app(tmp_path / "good").is_entitled()
    assert app(tmp_path / "good").lease is not None
    assert not app(tmp_path / "missing").is_entitled()
    (tmp_path / "garbage").write_bytes(b"\xff\xfe not a lease")
    assert not app(tmp_path / "garbage").is_entitled()
    LeaseCache(tmp_path / "unpaid").save(lease(key, entitled=False))
    assert not app(tmp_path / "unpaid").is_entitled()
    # Without a verifier nothing on disk is trusted: offline, it stays locked.
    assert not LicenseClient("http://127.0.0.1:9", LICENSE, "t", cache=tmp_path / "good").is_entitled()


async def test_accepted_leases_are_cached_and_an_older_state_never_replaces_a_newer_one(
    key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    seen: list[int] = []
    client = LicenseClient("http://127.0.0.1:9", LICENSE, "t", verifier=pinned(key), cache=tmp_path / "lease",
                           on_lease=lambda lease: seen.append(lease.seq))  # fmt: skip
    assert await client.accept_lease(lease(key, seq=5, entitled=False)) is not None
    assert await client.accept_lease(lease(key, seq=4, entitled=True)) is None  # replayed old lease
    assert await client.accept_lease(lease(key, sub="lic_other", seq=9)) is None
    assert (seen, client.is_entitled(), client.rejected_leases) == ([5], False, 1)
    assert LeaseCache(tmp_path / "lease").load() == lease(key, seq=5, entitled=False)
    assert await client.accept_lease(lease(key, seq=6, entitled=True)) is not None
    assert client.is_entitled() and seen == [5, 6]


async def test_after_a_rotation_the_old_key_verifies_until_the_jwks_drops_it(key: Ed25519PrivateKey) -> None:
    new = Ed25519PrivateKey.generate()
    published: list[dict[str, Any]] = [jwk(key)]
    fetches = [0]

    def jwks(request: httpx.Request) -> httpx.Response:
        fetches[0] += 1
        return httpx.Response(200, json={"keys": published})

    async with httpx.AsyncClient(transport=httpx.MockTransport(jwks)) as http:
        verifier = LeaseVerifier.for_server("https://broker.test", jwks_max_age=3600, http=http, clock=lambda: NOW)
        old_lease, new_lease = lease(key), lease(new, seq=4)
        assert (await verifier.averify(old_lease, LICENSE)).kid == key_id(key.public_key())
        assert fetches[0] == 1
        published[:] = [jwk(new), jwk(key)]  # the rotation: the new key signs, the old one stays published
        assert (await verifier.averify(new_lease, LICENSE)).seq == 4  # an unknown kid fetches at once
        assert (await verifier.averify(old_lease, LICENSE)).seq == 3
        assert fetches[0] == 2
        published[:] = [jwk(new)]  # the old key removed
        verifier.jwks_max_age = 0  # (as once the cached set is older than jwks_max_age)
        with pytest.raises(InvalidLease, match="unknown key"):
            await verifier.averify(old_lease, LICENSE)
        assert (await verifier.averify(new_lease, LICENSE)).seq == 4


async def test_an_unreachable_jwks_leaves_the_keys_already_known(key: Ed25519PrivateKey) -> None:
    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("offline", request=request)

    async with httpx.AsyncClient(transport=httpx.MockTransport(down)) as http:
        verifier = LeaseVerifier.for_server("https://broker.test", pem(key), http=http, clock=lambda: NOW)
        assert (await verifier.averify(lease(key), LICENSE)).entitled
        with pytest.raises(InvalidLease, match="unknown key"):
            await verifier.averify(lease(Ed25519PrivateKey.generate()), LICENSE)


def test_a_verifier_needs_some_key() -> None:
    with pytest.raises(ValueError, match="needs pinned public keys"):
        LeaseVerifier()
