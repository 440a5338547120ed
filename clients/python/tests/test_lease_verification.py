"""license_broker_client without a server: lease verification, pinned keys, the cache and the
watermark, offline answers, the clock. Leases are signed here the way the broker signs them
(EdDSA compact JWS, kid = thumbprint)."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from pathlib import Path
from typing import Any

import jwt
import license_broker_client
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa, x25519
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from license_broker_client import (
    InvalidKey,
    InvalidLease,
    LeaseCache,
    LeaseVerifier,
    LicenseClient,
    Watermark,
    key_id,
)

LICENSE = "lic_client_test"
NOW = 1_900_000_000.0
OFFLINE = "http://127.0.0.1:9"  # nothing listens there: these clients never connect


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


def lease(
    key: Ed25519PrivateKey,
    *,
    sub: str = LICENSE,
    seq: int = 3,
    entitled: bool = True,
    ttl: int = 600,
    iat: float = NOW,
) -> str:
    claims = {
        "sub": sub,
        "seq": seq,
        "status": "active" if entitled else "canceled",
        "entitled": entitled,
        "features": ["pro"],
        "current_period_end": "2030-01-01T00:00:00+00:00",
        "iat": int(iat),
        "exp": int(iat) + ttl,
    }
    return jwt.encode(claims, key, algorithm="EdDSA", headers={"kid": key_id(key.public_key())})


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def pinned(key: Ed25519PrivateKey, now: float = NOW) -> LeaseVerifier:
    return LeaseVerifier([pem(key)], clock=lambda: now)


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def app(key: Ed25519PrivateKey, cache: Path, clock: Clock | None = None, **options: Any) -> LicenseClient:
    """The app, started offline, with `cache` as its lease cache (and its watermark beside it)."""
    verifier = LeaseVerifier([pem(key)], clock=clock or Clock())
    return LicenseClient(OFFLINE, LICENSE, "t", verifier=verifier, cache=cache, **options)


async def ran_and_held(key: Ed25519PrivateKey, cache: Path, *tokens: str, clock: Clock | None = None) -> None:
    """An earlier run of the app that received `tokens` from the broker (and wrote them down)."""
    client = app(key, cache, clock)
    for token in tokens:
        await client.accept_lease(token)


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
    with pytest.raises(InvalidLease, match="does not pin"):
        pinned(key).verify(lease(other), LICENSE)
    # The attacker's key, claiming the trusted key's kid.
    spoofed = jwt.encode({"sub": LICENSE, "seq": 9, "entitled": True, "iat": 1, "exp": int(NOW) + 60}, other,
                         algorithm="EdDSA", headers={"kid": key_id(key.public_key())})  # fmt: skip
    with pytest.raises(InvalidLease, match="does not verify"):
        pinned(key).verify(spoofed, LICENSE)
    hs256 = jwt.encode({"sub": LICENSE, "seq": 9, "entitled": True, "iat": 1, "exp": int(NOW) + 60}, "s" * 32)
    with pytest.raises(InvalidLease, match="algorithm 'HS256'"):
        pinned(key).verify(hs256, LICENSE)


async def test_an_expired_lease_is_rejected_and_does_not_entitle(key: Ed25519PrivateKey, tmp_path: Path) -> None:
    token = lease(key, ttl=600)
    with pytest.raises(InvalidLease, match="expired"):
        pinned(key, now=NOW + 600).verify(token, LICENSE)
    await ran_and_held(key, tmp_path / "lease", token)
    clock = Clock()
    client = app(key, tmp_path / "lease", clock)
    assert client.is_entitled()
    clock.now = NOW + 600  # the lease runs out while the app runs, offline
    assert not client.is_entitled()


async def test_a_lease_for_another_license_is_refused(key: Ed25519PrivateKey, tmp_path: Path) -> None:
    with pytest.raises(InvalidLease, match="another license"):
        pinned(key).verify(lease(key, sub="lic_someone_else"), LICENSE)
    await ran_and_held(key, tmp_path / "lease", lease(key))
    LeaseCache(tmp_path / "lease").save(lease(key, sub="lic_someone_else"))
    assert not app(key, tmp_path / "lease").is_entitled()


async def test_an_app_started_offline_is_entitled_by_a_valid_cached_lease_and_locked_without_one(
    key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    await ran_and_held(key, tmp_path / "good", lease(key))
    assert app(key, tmp_path / "good").is_entitled()
    assert app(key, tmp_path / "good").lease is not None
    assert not app(key, tmp_path / "missing").is_entitled()
    await ran_and_held(key, tmp_path / "garbage", lease(key))
    (tmp_path / "garbage").write_bytes(b"\xff\xfe not a lease")
    assert not app(key, tmp_path / "garbage").is_entitled()
    await ran_and_held(key, tmp_path / "unpaid", lease(key, entitled=False))
    assert not app(key, tmp_path / "unpaid").is_entitled()
    # Without a verifier nothing on disk is trusted: offline, it stays locked.
    assert not LicenseClient(OFFLINE, LICENSE, "t", cache=tmp_path / "good").is_entitled()


async def test_accepted_leases_are_cached_and_an_older_state_never_replaces_a_newer_one(
    key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    seen: list[int] = []
    rejected: list[InvalidLease] = []
    client = app(key, tmp_path / "lease", on_lease=lambda lease: seen.append(lease.seq), on_rejected=rejected.append)
    assert await client.accept_lease(lease(key, seq=5, entitled=False)) is not None
    assert await client.accept_lease(lease(key, seq=4, entitled=True)) is None  # replayed old lease
    assert await client.accept_lease(lease(key, sub="lic_other", seq=9)) is None
    assert (seen, client.is_entitled(), client.rejected_leases, len(rejected)) == ([5], False, 1, 1)
    assert LeaseCache(tmp_path / "lease").load() == lease(key, seq=5, entitled=False)
    assert await client.accept_lease(lease(key, seq=6, entitled=True)) is not None
    assert client.is_entitled() and seen == [5, 6]


# --- pinned keys ------------------------------------------------------------------------------


def keys_public_output(*keys: Ed25519PrivateKey) -> str:
    """What `license-broker keys public` prints: a comment line before each PEM block."""
    return "".join(
        f"# kid {key_id(k.public_key())}{' (signs)' if i == 0 else ' (published only)'}\n{pem(k)}"
        for i, k in enumerate(keys)
    )


def test_the_verifier_takes_what_keys_public_prints_comments_and_every_block(key: Ed25519PrivateKey) -> None:
    old = Ed25519PrivateKey.generate()
    verifier = LeaseVerifier(keys_public_output(key, old), clock=lambda: NOW)  # one text, as read from the file
    assert verifier.kids == {key_id(key.public_key()), key_id(old.public_key())}
    assert verifier.verify(lease(key), LICENSE).entitled
    assert verifier.verify(lease(old), LICENSE).entitled
    # A list of texts, bytes, Windows line ends, and a PEM with literal "\n" (an environment variable).
    crlf = keys_public_output(key).replace("\n", "\r\n").encode()
    assert LeaseVerifier([crlf, pem(old).replace("\n", "\\n")]).kids == verifier.kids
    assert LeaseVerifier(jwks={"keys": [jwk(key)]}).kids == {key_id(key.public_key())}  # `keys public --jwks`


def _pem_of(public: Any) -> str:
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    return str(public.public_bytes(serialization.Encoding.PEM, spki).decode())


@pytest.mark.parametrize(
    ("given", "error"),
    [
        ("", "no PEM public key"),
        ("# kid abc\n", "no PEM public key"),
        ("not a key at all", "no PEM public key"),
        ("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n", "cannot be read"),
        ("private", "private key"),
        ("rsa", "Ed25519"),
        ("x25519", "Ed25519"),
        ("certificate", "CERTIFICATE block"),
    ],
)
def test_a_key_the_client_cannot_use_is_an_error_at_construction(given: str, error: str) -> None:
    ed = Ed25519PrivateKey.generate()
    text = {
        "private": ed.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode()
        + pem(ed),  # the whole output of `keys generate`
        "rsa": _pem_of(rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()),
        "x25519": _pem_of(x25519.X25519PrivateKey.generate().public_key()),
        "certificate": "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    }.get(given, given)
    with pytest.raises(InvalidKey, match=error):
        LeaseVerifier([text])
    # One bad key among good ones is still an error: it would never verify anything.
    with pytest.raises(InvalidKey, match=error):
        LeaseVerifier([pem(ed), text])


def test_a_pinned_jwks_with_a_key_the_client_cannot_use_is_an_error_at_construction() -> None:
    ec_key = ec.generate_private_key(ec.SECP256R1()).public_key()
    with pytest.raises(InvalidKey, match="non-empty"):
        LeaseVerifier(jwks={"keys": []})
    with pytest.raises(InvalidKey, match="only Ed25519"):
        LeaseVerifier(jwks={"keys": [json.loads(jwt.algorithms.ECAlgorithm.to_jwk(ec_key))]})
    with pytest.raises(InvalidKey, match="cannot be read"):
        LeaseVerifier(jwks={"keys": [{"kty": "OKP", "crv": "Ed25519", "x": "short"}]})


def test_a_verifier_without_a_pinned_key_verifies_nothing_and_the_broker_jwks_is_not_an_option(
    key: Ed25519PrivateKey, caplog: pytest.LogCaptureFixture
) -> None:
    for unpinned in (LeaseVerifier(), LeaseVerifier([]), LeaseVerifier.for_server("https://licenses.example.com")):
        assert unpinned.kids == set()
        with pytest.raises(InvalidLease, match="pins no lease key"):
            unpinned.verify(lease(key), LICENSE)
        with caplog.at_level(logging.WARNING, "license_broker_client"):
            client = LicenseClient("https://licenses.example.com", LICENSE, "t", verifier=unpinned)
        assert client.trust == "unverified" and "no pinned lease key" in caplog.text
    with pytest.raises(TypeError, match="jwks_url"):
        LeaseVerifier([pem(key)], jwks_url="https://licenses.example.com/.well-known/jwks.json")


def test_for_server_pins_the_keys_given_and_nothing_else(key: Ed25519PrivateKey) -> None:
    verifier = LeaseVerifier.for_server("https://licenses.example.com", pem(key), clock=lambda: NOW)
    assert verifier.kids == {key_id(key.public_key())}
    with pytest.raises(InvalidLease, match="does not pin"):
        verifier.verify(lease(Ed25519PrivateKey.generate()), LICENSE)


def test_a_rotation_verifies_the_keys_the_app_pins_and_no_other(key: Ed25519PrivateKey) -> None:
    new = Ed25519PrivateKey.generate()
    old_only = LeaseVerifier([pem(key)], clock=lambda: NOW)
    both = LeaseVerifier([pem(new), pem(key)], clock=lambda: NOW)  # the app update of rotation step 1
    assert both.verify(lease(key), LICENSE).seq == both.verify(lease(new, seq=3), LICENSE).seq
    with pytest.raises(InvalidLease, match="does not pin"):
        old_only.verify(lease(new), LICENSE)


def test_a_client_without_a_verifier_says_so(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, "license_broker_client"):
        client = LicenseClient("https://licenses.example.com", LICENSE, "t")
    assert client.trust == "unverified"
    assert "no pinned lease key" in caplog.text and "https://licenses.example.com" in caplog.text
    pinned_client = LicenseClient(OFFLINE, LICENSE, "t", verifier=pinned(Ed25519PrivateKey.generate()))
    assert pinned_client.trust == "pinned"


# --- the clock and the watermark --------------------------------------------------------------


def test_a_lease_issued_in_the_future_beyond_the_skew_is_refused(key: Ed25519PrivateKey) -> None:
    assert pinned(key).verify(lease(key, iat=NOW + 299), LICENSE).entitled  # clocks differ a little
    with pytest.raises(InvalidLease, match="issued in the future"):
        pinned(key).verify(lease(key, iat=NOW + 301), LICENSE)
    strict = LeaseVerifier([pem(key)], clock=lambda: NOW, max_skew=10)
    with pytest.raises(InvalidLease, match="the clock is behind"):
        strict.verify(lease(key, iat=NOW + 11), LICENSE)


async def test_turning_the_clock_back_below_a_cached_leases_issue_time_locks(
    key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    # A lease of 30 days, received now; the app is closed, the clock is set back a year and the
    # app restarted offline: the lease's `iat` is in the future.
    await ran_and_held(key, tmp_path / "lease", lease(key, ttl=30 * 86400))
    assert app(key, tmp_path / "lease").is_entitled()
    assert not app(key, tmp_path / "lease", Clock(NOW - 365 * 86400)).is_entitled()


async def test_turning_the_clock_back_does_not_revive_an_expired_cached_lease(
    key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    await ran_and_held(key, tmp_path / "lease", lease(key, ttl=600))
    # The app runs past the lease's expiry: it notes the time it saw.
    later = app(key, tmp_path / "lease", Clock(NOW + 610))
    assert not later.is_entitled()
    # The user sets the clock back to within the lease's life and restarts: still locked.
    rolled_back = app(key, tmp_path / "lease", Clock(NOW + 100))
    assert not rolled_back.is_entitled() and rolled_back.lease is None
    # A clock back within the skew (a correction of a few seconds) changes nothing.
    assert not app(key, tmp_path / "lease", Clock(NOW + 560)).is_entitled()


async def test_the_clock_turned_back_while_the_app_runs_does_not_stop_a_lease_from_expiring(
    key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    clock = Clock()
    client = app(key, tmp_path / "lease", clock)
    await client.accept_lease(lease(key, ttl=600))
    clock.now = NOW + 500
    assert client.is_entitled()  # (it notes the time it sees)
    clock.now = NOW + 10  # turned back by more than the skew
    assert not client.is_entitled()


async def test_a_cached_lease_older_than_the_watermark_is_refused(key: Ed25519PrivateKey, tmp_path: Path) -> None:
    paid = lease(key, seq=5, entitled=True, ttl=30 * 86400)
    await ran_and_held(key, tmp_path / "lease", paid)
    backup = (tmp_path / "lease").read_bytes()  # the user keeps a copy of the paid lease
    await ran_and_held(key, tmp_path / "lease", lease(key, seq=6, entitled=False, iat=NOW + 60))  # refunded
    assert not app(key, tmp_path / "lease", Clock(NOW + 120)).is_entitled()
    (tmp_path / "lease").write_bytes(backup)  # ... copies it back, offline
    restarted = app(key, tmp_path / "lease", Clock(NOW + 120))
    assert not restarted.is_entitled() and restarted.lease is None


async def test_deleting_the_watermark_does_not_revive_a_cached_lease(key: Ed25519PrivateKey, tmp_path: Path) -> None:
    await ran_and_held(key, tmp_path / "lease", lease(key))
    watermark = tmp_path / "lease.watermark"
    assert json.loads(watermark.read_text())["seq"] == 3  # a file of its own, beside the cache
    watermark.unlink()
    assert not app(key, tmp_path / "lease").is_entitled()
    watermark.write_text("{not json")
    assert not app(key, tmp_path / "lease").is_entitled()


async def test_a_replayed_older_lease_is_refused_even_once_the_one_held_has_expired(
    key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    clock = Clock()
    client = app(key, tmp_path / "lease", clock)
    paid = lease(key, seq=5, entitled=True, ttl=86400)
    assert await client.accept_lease(paid) is not None
    refunded = lease(key, seq=6, entitled=False, ttl=600, iat=NOW + 60)
    clock.now = NOW + 60
    assert await client.accept_lease(refunded) is not None
    clock.now = NOW + 1000  # the refund's lease has expired; the paid one has not
    assert await client.accept_lease(paid) is None  # replayed (by a fake server holding a copy)
    assert not client.is_entitled() and client.rejected_leases == 1


async def test_the_brokers_newer_lease_wins_by_issue_time_even_with_a_lower_seq(
    key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    clock = Clock()
    client = app(key, tmp_path / "lease", clock)
    assert await client.accept_lease(lease(key, seq=7, entitled=True)) is not None
    # The broker's database was restored from a backup: its current state has seq 3 and no payment.
    clock.now = NOW + 60
    restored = await client.accept_lease(lease(key, seq=3, entitled=False, iat=NOW + 60))
    assert restored is not None and restored.seq == 3 and not client.is_entitled()
    # A restart reads it back: the watermark followed the broker.
    again = app(key, tmp_path / "lease", Clock(NOW + 61))
    assert again.lease is not None and again.lease.seq == 3
    assert Watermark(tmp_path / "lease.watermark").load() is not None


async def test_a_watermark_left_ahead_by_a_wrong_clock_is_reset_by_the_brokers_next_lease(
    key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    # The machine's clock was a year ahead once (the watermark noted it), then corrected.
    app(key, tmp_path / "lease", Clock(NOW + 365 * 86400)).is_entitled()
    client = app(key, tmp_path / "lease")
    assert not client.is_entitled()  # the clock now looks turned back
    assert await client.accept_lease(lease(key)) is not None  # the broker's signed time says otherwise
    assert client.is_entitled()
    assert app(key, tmp_path / "lease").is_entitled()


async def test_the_same_state_signed_a_moment_earlier_is_ignored_not_rejected(
    key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    # Two broker processes whose clocks differ by a second: reconnecting to the slower one.
    client = app(key, tmp_path / "lease", Clock(NOW + 5))
    assert await client.accept_lease(lease(key, seq=4, iat=NOW + 2)) is not None
    assert await client.accept_lease(lease(key, seq=4, iat=NOW + 1)) is None
    assert client.rejected_leases == 0 and client.lease is not None and client.lease.issued_at == NOW + 2
    assert await client.accept_lease(lease(key, seq=5, entitled=False, iat=NOW + 1)) is not None  # a new state
    assert not client.is_entitled()


# --- stopping ---------------------------------------------------------------------------------


async def test_the_app_stops_following_when_cancelled_even_as_a_lease_arrives_in_that_turn(
    key: Ed25519PrivateKey, tmp_path: Path
) -> None:
    """Cancelling the task that iterates the client ends it, even when a lease arrives in the same
    turn of the event loop: the lease-expiry timer is woken and cancelled at once. (On Python 3.11
    `asyncio.wait_for` returned the wait's result there and lost the cancellation: the timer ran
    for ever, and the app's task never ended. It hung a test of the broker's CI.)"""
    reconnecting = asyncio.Event()

    def on_status(status: str) -> None:
        if status == "reconnecting":  # nothing listens at OFFLINE
            reconnecting.set()

    client = app(key, tmp_path / "lease", on_status=on_status, min_backoff=0.05, max_backoff=0.05)

    async def follow() -> None:
        async for _ in client:
            pass

    # The lease before or after the cancellation, some turns of the loop apart: one of them lands
    # where the client's stop cancels the timer as the lease wakes it (cancel first, one turn).
    for seq, (lease_first, turns) in enumerate(((a, t) for a in (True, False) for t in range(4)), 1):
        reconnecting.clear()
        task = asyncio.create_task(follow())
        async with asyncio.timeout(5):
            await reconnecting.wait()

        async def new_lease(seq: int = seq) -> None:
            assert await client.accept_lease(lease(key, seq=seq)) is not None  # wakes the timer

        async def cancel(task: asyncio.Task[None] = task) -> None:
            task.cancel()

        first, second = (new_lease, cancel) if lease_first else (cancel, new_lease)
        await first()
        for _ in range(turns):
            await asyncio.sleep(0)
        await second()
        done, _ = await asyncio.wait({task}, timeout=5)
        assert done, f"{first.__name__} first, {turns} turns apart: the client did not stop"
        assert task.cancelled() and client.status == "stopped"
