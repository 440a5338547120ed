"""Subscriber tokens: HS256 JWTs whose `sub` is the license id. The customer's web app mints
them for a signed-in user; the broker only verifies."""

from __future__ import annotations

import time

import jwt

ALGORITHM = "HS256"


class InvalidToken(Exception):
    pass


def mint(secret: str, license_id: str, ttl: float = 3600.0) -> str:
    now = int(time.time())
    return jwt.encode({"sub": license_id, "iat": now, "exp": now + int(ttl)}, secret, algorithm=ALGORITHM)


def verify(secret: str, token: str) -> str:
    """The license id the token grants, or InvalidToken."""
    try:
        claims = jwt.decode(token, secret, algorithms=[ALGORITHM], options={"require": ["exp", "sub"]})
    except jwt.PyJWTError as exc:
        raise InvalidToken(str(exc)) from None
    return str(claims["sub"])
