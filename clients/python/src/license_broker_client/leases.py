"""Lease verification: a lease is an Ed25519 compact JWS (EdDSA) that the broker signs for one
state of one license. It is trusted only if its signature verifies with a key the app trusts,
it is for this app's license, and it has not expired.

Which keys to trust:
- pinned public keys (PEM, or a JWKS document shipped with the app): they work offline, and are
  the only way to verify a cached lease when the app starts without a network. A key set fetched
  earlier and saved to disk would be as easy for a user to edit as the cached lease itself.
- the broker's JWKS URL: fetched when a lease names a key not yet known, and again once the set
  is older than `jwks_max_age`, so a key the broker stops publishing stops verifying.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

ALGORITHM = "EdDSA"
JWKS_PATH = "/.well-known/jwks.json"


class InvalidLease(Exception):
    """The lease is forged, tampered with, expired, for another license, or signed by an unknown key."""


@dataclass(frozen=True, slots=True)
class Lease:
    """A verified lease: what the broker vouched for, until `expires_at` (epoch seconds)."""

    token: str
    license_id: str
    seq: int
    status: str
    entitled: bool
    features: tuple[str, ...]
    current_period_end: str | None
    issued_at: int
    expires_at: int
    kid: str

    def valid_at(self, now: float) -> bool:
        return now < self.expires_at

    def supersedes(self, other: Lease | None, now: float) -> bool:
        """Whether this lease should replace `other`: a newer state, the same state renewed, or
        anything when `other` has expired. An older state's lease, still unexpired, never wins
        (a user replaying the lease of a state before a refund gains nothing)."""
        if other is None or not other.valid_at(now):
            return True
        return self.seq > other.seq or (self.seq == other.seq and self.expires_at >= other.expires_at)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def key_id(key: Ed25519PublicKey) -> str:
    """The broker's `kid`: the RFC 7638 thumbprint of the key, so a pinned key needs no name."""
    x = _b64(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))
    return _b64(hashlib.sha256(f'{{"crv":"Ed25519","kty":"OKP","x":"{x}"}}'.encode()).digest())


def _keys_of_jwks(jwks: Mapping[str, Any]) -> dict[str, Ed25519PublicKey]:
    keys: dict[str, Ed25519PublicKey] = {}
    for jwk in jwks.get("keys", []):
        if jwk.get("kty") != "OKP" or jwk.get("crv") != "Ed25519":
            continue  # a set may hold other keys; leases are only ever Ed25519
        key = jwt.PyJWK.from_dict(dict(jwk), algorithm=ALGORITHM).key
        if isinstance(key, Ed25519PublicKey):
            keys[key_id(key)] = key  # by thumbprint: a `kid` in the document cannot alias a key
    return keys


def _keys_of_pem(pem: str | bytes) -> Ed25519PublicKey:
    key = serialization.load_pem_public_key(pem.encode() if isinstance(pem, str) else pem)
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError("a pinned lease key must be an Ed25519 public key")
    return key


class LeaseVerifier:
    def __init__(
        self,
        public_keys: Iterable[str | bytes | Ed25519PublicKey] = (),
        *,
        jwks: Mapping[str, Any] | None = None,
        jwks_url: str | None = None,
        jwks_max_age: float = 300.0,
        http: httpx.AsyncClient | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        pinned = {
            key_id(k): k for k in (p if isinstance(p, Ed25519PublicKey) else _keys_of_pem(p) for p in public_keys)
        }
        if jwks is not None:
            pinned.update(_keys_of_jwks(jwks))
        if not pinned and jwks_url is None:
            raise ValueError("LeaseVerifier needs pinned public keys, a JWKS or a JWKS URL")
        self._pinned = pinned
        self._fetched: dict[str, Ed25519PublicKey] = {}
        self._fetched_at: float | None = None
        self.jwks_url = jwks_url
        self.jwks_max_age = jwks_max_age
        self._http = http
        self.clock = clock

    @classmethod
    def for_server(cls, base_url: str, *pinned: str | bytes | Ed25519PublicKey, **options: Any) -> LeaseVerifier:
        """The broker's own JWKS (`/.well-known/jwks.json`), plus any keys pinned in the app."""
        return cls(pinned, jwks_url=base_url.rstrip("/") + JWKS_PATH, **options)

    @property
    def kids(self) -> set[str]:
        return set(self._pinned) | set(self._fetched)

    async def refresh(self) -> None:
        """Fetch the JWKS: it replaces the keys fetched before (pinned keys stay)."""
        if self.jwks_url is None:
            return
        http = self._http or httpx.AsyncClient(timeout=10)
        try:
            response = await http.get(self.jwks_url, headers={"accept": "application/json"})
            response.raise_for_status()
            self._fetched = _keys_of_jwks(response.json())
            self._fetched_at = time.monotonic()
        finally:
            if self._http is None:
                await http.aclose()

    def _stale(self, kid: str) -> bool:
        if self.jwks_url is None or kid in self._pinned:
            return False
        if kid not in self._fetched:
            return True
        return self._fetched_at is None or time.monotonic() - self._fetched_at >= self.jwks_max_age

    async def averify(self, token: str, license_id: str) -> Lease:
        """`verify`, after fetching the JWKS if the lease names an unknown key or the set is
        stale. Offline, the keys known already decide."""
        if self._stale(_kid(token)):
            # Unreachable, or not a JWKS: keep the keys we have.
            with contextlib.suppress(httpx.HTTPError, OSError, ValueError):
                await self.refresh()
        return self.verify(token, license_id)

    def verify(self, token: str, license_id: str) -> Lease:
        """The lease, if it verifies with a key known now, is for `license_id` and is unexpired."""
        kid = _kid(token)
        key = self._pinned.get(kid) or self._fetched.get(kid)
        if key is None:
            raise InvalidLease(f"signed by an unknown key (kid {kid!r})")
        try:
            # Expiry is checked below against `clock`, so that it can be tested and so that one
            # clock decides both here and in is_entitled().
            claims = jwt.decode(
                token,
                key,
                algorithms=[ALGORITHM],
                options={"require": ["sub", "seq", "exp", "iat"], "verify_exp": False, "verify_iat": False},
            )
        except jwt.PyJWTError as exc:
            raise InvalidLease(f"does not verify: {exc}") from None
        if claims["sub"] != license_id:
            raise InvalidLease("for another license")
        lease = _lease(token, kid, claims)
        if not lease.valid_at(self.clock()):
            raise InvalidLease("expired")
        return lease


def _kid(token: str) -> str:
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError as exc:
        raise InvalidLease(f"not a JWS: {exc}") from None
    if header.get("alg") != ALGORITHM:
        raise InvalidLease(f"algorithm {header.get('alg')!r}, expected {ALGORITHM}")
    return str(header.get("kid", ""))


def _lease(token: str, kid: str, claims: dict[str, Any]) -> Lease:
    try:
        return Lease(
            token=token,
            license_id=str(claims["sub"]),
            seq=int(claims["seq"]),
            status=str(claims.get("status", "none")),
            entitled=claims.get("entitled") is True,
            features=tuple(str(f) for f in claims.get("features") or ()),
            current_period_end=claims.get("current_period_end"),
            issued_at=int(claims["iat"]),
            expires_at=int(claims["exp"]),
            kid=kid,
        )
    except (TypeError, ValueError) as exc:
        raise InvalidLease(f"malformed claims: {exc}") from None
