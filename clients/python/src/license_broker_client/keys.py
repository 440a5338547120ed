"""The lease keys an app pins: what `license-broker keys public` prints (a `# kid ...` comment line
before each PEM public key, one key or several during a rotation), a PEM string, a key object, or
a JWKS document shipped with the app (`keys public --jwks`).

Every key given must be usable, or the constructor that reads it fails: a key that cannot verify
anything would otherwise leave the app locked with no error."""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Iterable, Mapping
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

ALGORITHM = "EdDSA"
_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----.+?-----END \1-----", re.S)

PinnedKey = str | bytes | Ed25519PublicKey


class InvalidKey(ValueError):
    """A pinned key that cannot verify leases. The message never quotes key material."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def key_id(key: Ed25519PublicKey) -> str:
    """The broker's `kid`: the RFC 7638 thumbprint of the key, so a pinned key needs no name."""
    x = _b64(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))
    return _b64(hashlib.sha256(f'{{"crv":"Ed25519","kty":"OKP","x":"{x}"}}'.encode()).digest())


def keys_of_pem(text: str | bytes) -> list[Ed25519PublicKey]:
    """Every PEM block of the text; lines outside the blocks (comments) are ignored."""
    data = text.encode() if isinstance(text, str) else text
    # An environment variable often holds a PEM on one line with literal "\n".
    blocks = list(_PEM_BLOCK.finditer(data.replace(b"\\n", b"\n")))
    if not blocks:
        raise InvalidKey(
            "no PEM public key in the text given (pin what `license-broker keys public` prints: "
            "-----BEGIN PUBLIC KEY----- ...); is the file empty?"
        )
    keys = []
    for block in blocks:
        label = block.group(1).decode()
        if "PRIVATE" in label:
            raise InvalidKey(
                "a private key was given to pin: ship the public key (`license-broker keys public`), "
                "never the private one"
            )
        if label != "PUBLIC KEY":
            raise InvalidKey(f"a {label} block: expected a PUBLIC KEY block")
        try:
            key = serialization.load_pem_public_key(block.group(0))
        except ValueError:
            raise InvalidKey("a PUBLIC KEY block that cannot be read") from None
        if not isinstance(key, Ed25519PublicKey):
            raise InvalidKey("a pinned lease key must be an Ed25519 public key (`license-broker keys public`)")
        keys.append(key)
    return keys


def keys_of_jwks(jwks: Mapping[str, Any]) -> list[Ed25519PublicKey]:
    entries = jwks.get("keys") if isinstance(jwks, Mapping) else None
    if not isinstance(entries, list) or not entries:
        raise InvalidKey('a pinned JWKS must hold a non-empty "keys" list')
    keys = []
    for jwk in entries:
        if not isinstance(jwk, Mapping) or jwk.get("kty") != "OKP" or jwk.get("crv") != "Ed25519":
            raise InvalidKey("a pinned JWKS may hold only Ed25519 keys (kty OKP, crv Ed25519)")
        try:
            key = jwt.PyJWK.from_dict({"kty": "OKP", "crv": "Ed25519", "x": jwk.get("x")}, algorithm=ALGORITHM).key
        except (jwt.PyJWTError, ValueError, TypeError):
            raise InvalidKey("a pinned JWK that cannot be read") from None
        if not isinstance(key, Ed25519PublicKey):
            raise InvalidKey("a pinned JWK must be an Ed25519 public key")
        keys.append(key)
    return keys


def pinned_keys(
    public_keys: Iterable[PinnedKey] | PinnedKey, jwks: Mapping[str, Any] | None
) -> dict[str, Ed25519PublicKey]:
    """The keys by thumbprint (never by a document's `kid`: a `kid` cannot alias another key)."""
    # One PEM text (not an iterable of characters), or one key object.
    given_keys = [public_keys] if isinstance(public_keys, str | bytes | Ed25519PublicKey) else list(public_keys)
    keys: list[Ed25519PublicKey] = []
    for given in given_keys:
        if isinstance(given, Ed25519PublicKey):
            keys.append(given)
        elif isinstance(given, str | bytes):
            keys.extend(keys_of_pem(given))
        else:
            raise InvalidKey(f"a pinned key must be PEM text or an Ed25519PublicKey, not {type(given).__name__}")
    if jwks is not None:
        keys.extend(keys_of_jwks(jwks))
    return {key_id(key): key for key in keys}
