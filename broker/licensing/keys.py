"""License keys: what a buyer types, and how the broker keeps them without keeping them.

Format. 25 characters of Crockford's base32 (0-9 and A-Z without I, L, O and U), shown in five
groups of five: `7KX2M-9QRTB-...`. The first 21 carry the secret (105 random bits), the last 4
are Reed-Solomon check symbols over GF(32): any typo of up to four characters, and any swap of
two, is "malformed" before the database is asked (tests/test_license_keys.py checks every single
substitution and adjacent swap of a key). Input is case-insensitive; dashes and whitespace are
ignored; O reads as 0, and I and L as 1, as Crockford's decoding does.

Storage. Never the key itself: a lookup digest, HMAC-SHA256 under a key derived (HKDF) from
LICENSE_KEY_SECRET, and the key sealed with AES-GCM under another derived key (the license id as
associated data, so that a sealed key cannot be moved to another license's row), so that it can
be shown again to the rightful party. A database dump alone yields no key. Several secrets,
comma-separated, for a rotation: the first seals and digests new rows, every one opens and finds.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
BODY = 21  # 105 bits of secret
CHECK = 4
LENGTH = BODY + CHECK
GROUP = 5
# What Crockford's decoding reads as a digit, and what a user types between groups.
_READ_AS = str.maketrans({"O": "0", "I": "1", "L": "1"})
_IGNORED = re.compile(r"[\s\-\u2010-\u2015\u2212]+")
_VALUE = {c: i for i, c in enumerate(ALPHABET)}
# The longest input looked at: a key with generous spacing. Longer is malformed without parsing.
MAX_INPUT = 100


class MalformedKey(ValueError):
    """Not a key: wrong length, a character outside the alphabet, or a failed check."""


# GF(32) with the primitive polynomial x^5 + x^2 + 1; alpha = x.
_EXP = [0] * 62
_LOG = [0] * 32
_x = 1
for _i in range(31):
    _EXP[_i] = _EXP[_i + 31] = _x
    _LOG[_x] = _i
    _x <<= 1
    if _x & 32:
        _x ^= 0b100101


def _mul(a: int, b: int) -> int:
    return 0 if a == 0 or b == 0 else _EXP[_LOG[a] + _LOG[b]]


def _generator() -> list[int]:
    """(x - a)(x - a^2)(x - a^3)(x - a^4), highest degree first: a code of minimum distance 5."""
    poly = [1]
    for i in range(1, CHECK + 1):
        root = _EXP[i]
        poly = [*poly, 0]
        for j in range(len(poly) - 1, 0, -1):
            poly[j] ^= _mul(poly[j - 1], root)
    return poly


_G = _generator()


def _remainder(symbols: list[int]) -> list[int]:
    """`symbols` (highest degree first, the last CHECK of them the remainder's place) mod g."""
    buf = list(symbols)
    for i in range(len(buf) - CHECK):
        coef = buf[i]
        if coef:
            for j in range(1, CHECK + 1):
                buf[i + j] ^= _mul(_G[j], coef)
    return buf[-CHECK:]


def _with_check(body: list[int]) -> list[int]:
    return [*body, *_remainder([*body, *([0] * CHECK)])]


def generate() -> str:
    """A new key, normalised (25 characters, no dashes)."""
    body = [secrets.randbelow(32) for _ in range(BODY)]
    return "".join(ALPHABET[v] for v in _with_check(body))


def normalize(text: str) -> str:
    """The key's canonical form, or MalformedKey. Pure: no database, no secret."""
    if len(text) > MAX_INPUT:
        raise MalformedKey("too long")
    key = _IGNORED.sub("", text).upper().translate(_READ_AS)
    if len(key) != LENGTH:
        raise MalformedKey(f"expected {LENGTH} characters, got {len(key)}")
    try:
        symbols = [_VALUE[c] for c in key]
    except KeyError:
        raise MalformedKey("a character outside the key alphabet") from None
    if any(_remainder(symbols)):
        raise MalformedKey("the check characters do not match (a typo?)")
    return key


def display(key: str) -> str:
    """Dash-separated groups of five, as shown to the buyer."""
    return "-".join(key[i : i + GROUP] for i in range(0, len(key), GROUP))


def fingerprint_digest(fingerprint: str) -> bytes:
    """What the database keeps of a machine fingerprint. The client sends a salted SHA-256 of the
    OS machine id (never the id itself); this hashes it again, under a fixed label rather than
    LICENSE_KEY_SECRET, so that rotating the secret keeps every machine recognisable."""
    return hashlib.sha256(b"license-broker/fingerprint\0" + fingerprint.lower().encode()).digest()


def _derive(secret: str, label: bytes, length: int = 32) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=b"license-broker/" + label).derive(
        secret.encode()
    )


class UnreadableKey(Exception):
    """A stored key that no configured LICENSE_KEY_SECRET opens (a secret removed too early)."""


@dataclass(frozen=True)
class KeySecret:
    id: str  # names the secret in the rows it sealed, without revealing it
    lookup: bytes
    seal: AESGCM

    @classmethod
    def derive(cls, secret: str) -> KeySecret:
        seal = AESGCM(_derive(secret, b"key-seal"))
        return cls(_derive(secret, b"key-id", 8).hex(), _derive(secret, b"key-lookup"), seal)


@dataclass(frozen=True)
class Sealed:
    digest: bytes
    sealed: bytes  # 12-byte nonce, then AES-GCM ciphertext and tag
    secret_id: str


class KeyVault:
    """LICENSE_KEY_SECRET, derived once: digests to find a key, seals to show it again."""

    def __init__(self, secrets_: tuple[str, ...], *, ephemeral: bool = False) -> None:
        if not secrets_:
            raise ValueError("at least one secret")
        self.secrets = tuple(KeySecret.derive(s) for s in secrets_)
        self.ephemeral = ephemeral  # generated at start-up (development mode)

    @property
    def current(self) -> KeySecret:
        return self.secrets[0]

    def digests(self, key: str) -> list[bytes]:
        """The lookup digest of a normalised key under every secret (a row may predate a rotation)."""
        return [hmac.digest(s.lookup, key.encode(), "sha256") for s in self.secrets]

    def seal(self, license_id: str, key: str) -> Sealed:
        secret = self.current
        nonce = secrets.token_bytes(12)
        sealed = nonce + secret.seal.encrypt(nonce, key.encode(), license_id.encode())
        return Sealed(hmac.digest(secret.lookup, key.encode(), "sha256"), sealed, secret.id)

    def open(self, license_id: str, sealed: bytes, secret_id: str) -> str:
        for secret in self.secrets:
            if secret.id != secret_id:
                continue
            try:
                return secret.seal.decrypt(sealed[:12], sealed[12:], license_id.encode()).decode()
            except InvalidTag:
                break
        raise UnreadableKey(f"license {license_id}: sealed under a secret not in LICENSE_KEY_SECRET ({secret_id})")
