"""Subscriber tokens: HS256 JWTs whose `sub` is the license id. The seller's web app mints them
for a signed-in user (`typ` "stream"), `license-broker token` too, and the broker mints machine
tokens on activation (`typ` "machine").

A token is accepted only if it was meant for this broker: its `aud` must be the broker's audience
(STREAM_TOKEN_AUDIENCE, `license-broker` unless set), and a `typ`, when present, one the broker
expects. A web app that signs its own session or refresh tokens with the same secret (which it
should not: docs/deploy.md) has tokens without that audience, or with another `typ`, and none of
them opens a stream here."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import jwt

from broker.settings import DEFAULT_TOKEN_AUDIENCE, Settings

ALGORITHM = "HS256"
# The minting machine's clock may run ahead of ours: a token minted for exactly the maximum
# lifetime there is still accepted here.
CLOCK_SKEW = 60
# The `typ` claims the broker accepts (docs/security.md): subscriber tokens, and machine tokens
# the broker mints on activation. Absent `typ` is a subscriber token (what sellers' web apps minted
# before `typ` existed); any other `typ` (a web app's "refresh", "id", "session") is refused.
STREAM = "stream"
MACHINE = "machine"
TOKEN_TYPES = frozenset({STREAM, MACHINE})


class InvalidToken(Exception):
    """The reason is for the log only: a client is told `invalid token`, never which check failed."""


MACHINE = "machine"


@dataclass(frozen=True, slots=True)
class Grant:
    license_id: str
    expires_at: float  # epoch seconds: the stream ends then, and the client reconnects with a fresh token
    # A machine token's machine (its row is checked on every use: a released machine's token is
    # refused) and the fingerprint hash the client sent when it activated; None for other tokens.
    machine_id: str | None = None
    fingerprint: str | None = None


def mint(
    secret: str,
    license_id: str,
    ttl: float = 3600.0,
    *,
    audience: str = DEFAULT_TOKEN_AUDIENCE,
    issuer: str | None = None,
    typ: str = STREAM,
) -> str:
    """A token as the broker mints it: always with its audience and its `typ`."""
    now = int(time.time())
    claims: dict[str, object] = {"sub": license_id, "aud": audience, "typ": typ, "iat": now, "exp": now + int(ttl)}
    if issuer is not None:
        claims["iss"] = issuer
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def mint_for(settings: Settings, license_id: str, ttl: float) -> str:
    """A token this broker accepts: its audience and issuer, at most its maximum lifetime."""
    assert settings.token_secret is not None
    ttl = min(ttl, settings.token_max_ttl)
    return mint(settings.token_secret, license_id, ttl, audience=settings.token_audience, issuer=settings.token_issuer)


def mint_machine(
    settings: Settings, license_id: str, machine_id: str, fingerprint: str, *, now: float | None = None
) -> tuple[str, int]:
    """A machine token (and its `exp`): minted by the broker on activation and renewed on the
    stream; the broker's own audience and issuer, MACHINE_TOKEN_TTL."""
    assert settings.token_secret is not None
    iat = int(time.time() if now is None else now)
    exp = iat + int(settings.machine_token_ttl)
    claims: dict[str, object] = {
        "sub": license_id,
        "iat": iat,
        "exp": exp,
        "typ": MACHINE,
        "machine": machine_id,
        "fingerprint": fingerprint,
    }
    if settings.token_audience is not None:
        claims["aud"] = settings.token_audience
    if settings.token_issuer is not None:
        claims["iss"] = settings.token_issuer
    return jwt.encode(claims, settings.token_secret, algorithm=ALGORITHM), exp


def verify(
    secrets: str | Sequence[str],
    token: str,
    *,
    max_ttl: float | None = None,
    audience: str = DEFAULT_TOKEN_AUDIENCE,
    issuer: str | None = None,
) -> Grant:
    """What the token grants, or InvalidToken. `exp`, `sub` and `aud` (= `audience`) are required,
    `iss` too when an issuer is configured; a `typ` must be one of TOKEN_TYPES; an `exp` further
    away than `max_ttl` is refused, so that a leaked token cannot be one that never expires.
    Several secrets during a rotation: the token may be signed with any of them."""
    required = ["exp", "sub", "aud", *(["iss"] if issuer else [])]
    for key in [secrets] if isinstance(secrets, str) else list(secrets):
        try:
            claims = jwt.decode(
                token, key, algorithms=[ALGORITHM], audience=audience, issuer=issuer, options={"require": required}
            )
            break
        except jwt.InvalidSignatureError:
            # The signature is checked before any claim: only this error means "another key".
            continue
        except jwt.PyJWTError as exc:
            raise InvalidToken(str(exc)) from None
    else:
        raise InvalidToken("Signature verification failed")
    typ = claims.get("typ", STREAM)
    if not isinstance(typ, str) or typ not in TOKEN_TYPES:
        raise InvalidToken(f"typ {str(typ)[:40]!r} is not a token type this broker accepts")
    expires_at = int(claims["exp"])  # PyJWT has checked that it is an integer in the future
    if max_ttl is not None and expires_at > time.time() + max_ttl + CLOCK_SKEW:
        raise InvalidToken(f"expires more than {max_ttl:g} s from now (STREAM_TOKEN_MAX_TTL)")
    expires = float(min(expires_at, 2**62))  # any int PyJWT took fits a float
    if claims.get("typ") == MACHINE:
        machine, fingerprint = claims.get("machine"), claims.get("fingerprint")
        if not isinstance(machine, str) or not machine or not isinstance(fingerprint, str):
            raise InvalidToken("a machine token without its machine and fingerprint")
        return Grant(str(claims["sub"]), expires, machine, fingerprint)
    return Grant(str(claims["sub"]), expires)


def verify_for(settings: Settings, token: str) -> Grant:
    return verify(
        settings.token_secrets,
        token,
        max_ttl=settings.token_max_ttl,
        audience=settings.token_audience,
        issuer=settings.token_issuer,
    )
