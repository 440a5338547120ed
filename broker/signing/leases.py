"""Signed leases: a license's state as an Ed25519 compact JWS (EdDSA) that a desktop app can
verify offline, until `exp`, against the public keys at /.well-known/jwks.json.

A lease is signed when it is sent and never stored. `exp` is the offline grace: an app that loses
its connection stays unlocked until then with the last lease it received, and no longer.

Keys. `LICENSE_SIGNING_KEY` holds one or more PEM blocks: the first must be an Ed25519 private
key and signs every lease; the blocks after it (public keys, or private keys whose public half is
used) are only published, so that a rotation can (1) publish the next key before it signs and
(2) keep publishing the previous key until the last lease it signed has expired. Each key's `kid`
is its RFC 7638 thumbprint, so the same key has the same `kid` in every process, with no setting.
"""

from __future__ import annotations

import base64
import hashlib
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from jwt.api_jws import PyJWS

from broker.wire import LicenseEvent, add_member, lease_frame

ALGORITHM = "EdDSA"
DEFAULT_TTL = 7 * 86400.0
_PEM_BLOCK = re.compile(r"-----BEGIN ([A-Z0-9 ]+)-----.+?-----END \1-----", re.S)
_JWS = PyJWS()


class InvalidKey(ValueError):
    """The text is not the PEM this module expects; the message never quotes key material."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _raw(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(key: Ed25519PublicKey) -> str:
    """The RFC 7638 JWK thumbprint: SHA-256 of the required members in lexical order."""
    canonical = f'{{"crv":"Ed25519","kty":"OKP","x":"{_b64(_raw(key))}"}}'
    return _b64(hashlib.sha256(canonical.encode()).digest())


def public_jwk(key: Ed25519PublicKey) -> dict[str, str]:
    return {"kty": "OKP", "crv": "Ed25519", "x": _b64(_raw(key)), "kid": key_id(key), "alg": ALGORITHM, "use": "sig"}


def public_pem(key: Ed25519PublicKey) -> str:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def private_pem(key: Ed25519PrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def public_pems(keys: LeaseKeys) -> str:
    """Every published key as PEM, each after a `# kid` comment line: what `license-broker keys
    public` prints and what an app pins (both client packages read it as it is)."""
    lines = []
    for i, key in enumerate(keys.published):
        lines.append(f"# kid {key_id(key)}{' (signs)' if i == 0 else ' (published only)'}\n")
        lines.append(public_pem(key))
    return "".join(lines)


@dataclass(frozen=True)
class LeaseKeys:
    """The key that signs, and every public key to publish (the signing key's first)."""

    signing: Ed25519PrivateKey
    published: tuple[Ed25519PublicKey, ...]
    ephemeral: bool = False  # generated at start-up (development mode): gone at the next restart

    @classmethod
    def generate(cls, *, ephemeral: bool = False) -> LeaseKeys:
        key = Ed25519PrivateKey.generate()
        return cls(key, (key.public_key(),), ephemeral)

    @classmethod
    def from_pem(cls, text: str) -> LeaseKeys:
        # Environment files often hold a PEM on one line with literal "\n".
        blocks = [(m.group(1), m.group(0).encode()) for m in _PEM_BLOCK.finditer(text.replace("\\n", "\n"))]
        if not blocks:
            raise InvalidKey("expected PEM text (-----BEGIN PRIVATE KEY----- ...)")
        label, first = blocks[0]
        if "PRIVATE" not in label:
            raise InvalidKey("the first PEM block must be the Ed25519 private key that signs")
        signing = _load(label, first)
        assert isinstance(signing, Ed25519PrivateKey)
        published = [signing.public_key()]
        for label, block in blocks[1:]:
            key = _load(label, block)
            public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
            if key_id(public) not in {key_id(k) for k in published}:
                published.append(public)
        return cls(signing, tuple(published))

    def with_published(self, *keys: Ed25519PublicKey) -> LeaseKeys:
        known = {key_id(k) for k in self.published}
        return LeaseKeys(self.signing, (*self.published, *(k for k in keys if key_id(k) not in known)), self.ephemeral)


def _load(label: str, block: bytes) -> Ed25519PrivateKey | Ed25519PublicKey:
    try:
        if "PRIVATE" in label:
            key: Any = serialization.load_pem_private_key(block, password=None)
        else:
            key = serialization.load_pem_public_key(block)
    except (ValueError, TypeError) as exc:
        # TypeError: an encrypted private key (no password is ever asked for).
        raise InvalidKey(f"a {label} block cannot be read ({type(exc).__name__})") from None
    if not isinstance(key, Ed25519PrivateKey | Ed25519PublicKey):
        raise InvalidKey(f"a {label} block is not an Ed25519 key (generate one with `license-broker keys generate`)")
    return key


def lease_claims(event: LicenseEvent | Mapping[str, Any]) -> dict[str, Any]:
    """What a lease says about the license, from one event of the stream: its fields, decoded once
    per event (LicenseEvent.fields), or a state already decoded. A fresh dict each call."""
    obj: Mapping[str, Any] = event.fields() if isinstance(event, LicenseEvent) else event
    state = obj.get("state") or {}
    claims = {
        "sub": obj["license_id"],
        "seq": obj["seq"],
        "status": obj["status"],
        "entitled": obj["entitled"],
        "features": state.get("features") or [],
        "current_period_end": state.get("current_period_end"),
    }
    if state.get("kind") == "trial" and obj["entitled"] and state.get("trial_end"):
        # A trial without a card: offline, its lease ends with it (LeaseSigner.sign caps `exp`).
        claims["trial_end"] = int(datetime.fromisoformat(state["trial_end"]).timestamp())
    return claims


@dataclass(frozen=True, slots=True)
class Lease:
    token: str
    seq: int
    iat: int
    exp: int

    def frame(self) -> bytes:
        """The lease as the stream sends it (`event: lease`)."""
        return lease_frame(self.token, self.seq, self.exp)


class LeaseSigner:
    """Signs leases with the first key; publishes every key. Holds no state per license."""

    def __init__(self, keys: LeaseKeys, *, ttl: float = DEFAULT_TTL, clock: Callable[[], float] = time.time) -> None:
        self.keys = keys
        self.kid = key_id(keys.signing.public_key())
        self.ttl = max(1, int(ttl))
        self._clock = clock
        self._headers = {"kid": self.kid}
        self._jwks = orjson.dumps({"keys": [public_jwk(k) for k in keys.published]})

    def sign(self, claims: dict[str, Any]) -> Lease:
        iat = int(self._clock())
        exp = iat + self.ttl
        if isinstance(ends := claims.get("trial_end"), int):
            exp = min(exp, ends)  # a trial's lease expires when the trial does, not later
        payload = orjson.dumps({**claims, "iat": iat, "exp": exp})
        # PyJWS with a pre-encoded payload: ~55 us a lease, most of it the Ed25519 signature.
        token = _JWS.encode(payload, self.keys.signing, algorithm=ALGORITHM, headers=self._headers)
        return Lease(token, int(claims["seq"]), iat, exp)

    def renew_after(self) -> float:
        """Seconds after signing when a connected client gets a fresh lease: before half of the
        current one is spent, so a client that misses one renewal still has a valid lease. `iat`
        is whole seconds, so a lease lives between ttl - 1 and ttl seconds from its signing."""
        return max(self.ttl - 1, 0.5) / 2

    def jwks(self) -> bytes:
        return self._jwks

    def describe(self) -> str:
        """The start-up log line."""
        if self.keys.ephemeral:
            return (
                f"leases: signing with an ephemeral development key (kid {self.kid}); "
                "its leases stop verifying when the process restarts"
            )
        others = len(self.keys.published) - 1
        extra = f", publishing {others} more key(s) for rotation" if others else ""
        return f"leases: signing with kid {self.kid}, valid {self.ttl} s{extra}"


NO_LEASES = "leases: LICENSE_SIGNING_KEY is not set; license states are sent unsigned (no leases, no JWKS)"


def with_lease(current: LicenseEvent, signer: LeaseSigner | None, extra: Mapping[str, Any] | None = None) -> bytes:
    """`GET /api/licenses/{id}`: the current state (its stored bytes), plus its lease when leases
    are on, with `extra` claims (a machine's). The bytes are extended, not decoded and encoded again."""
    if signer is None:
        return current.data
    claims = lease_claims(current)
    if extra:
        claims |= extra
    return add_member(current.data, "lease", signer.sign(claims).token)
