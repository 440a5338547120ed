"""Subscriber tokens: HS256 JWTs whose `sub` is the license id. The customer's web app mints
them for a signed-in user; the broker only verifies."""

from __future__ import annotations

import time
from collections.abc import Sequence

import jwt

ALGORITHM = "HS256"


class InvalidToken(Exception):
    pass


def mint(secret: str, license_id: str, ttl: float = 3600.0) -> str:
    now = int(time.time())
    return jwt.encode({"sub": license_id, "iat": now, "exp": now + int(ttl)}, secret, algorithm=ALGORITHM)


def verify(secrets: str | Sequence[str], token: str) -> str:
    """The license id the token grants, or InvalidToken. Several secrets during a rotation: the
    token may be signed with any of them."""
    keys = [secrets] if isinstance(secrets, str) else list(secrets)
    for key in keys:
        try:
            claims = jwt.decode(token, key, algorithms=[ALGORITHM], options={"require": ["exp", "sub"]})
            return str(claims["sub"])
        except jwt.InvalidSignatureError:
            # The signature is checked before any claim: only this error means "another key".
            continue
        except jwt.PyJWTError as exc:
            raise InvalidToken(str(exc)) from None
    raise InvalidToken("Signature verification failed")
