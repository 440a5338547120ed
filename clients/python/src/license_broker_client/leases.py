"""Lease verification: a lease is an Ed25519 compact JWS (EdDSA) that the broker signs for one
state of one license. It is trusted only if its signature verifies with a key pinned in the app,
it is for this app's license, it was not issued in the future and it has not expired.

Only pinned keys verify. The broker's JWKS (`/.well-known/jwks.json`) is never consulted: it is
served by whatever answers at the broker's address, so a fake broker (or anyone between the app
and the broker) would serve its own key with it, and a key set saved to disk would be as easy to
edit as the cached lease. A rotation ships the next public key in an app update before it signs
(docs/desktop.md, "Rotating the key")."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import jwt

from license_broker_client.keys import ALGORITHM, PinnedKey, pinned_keys

# How far a lease's `iat` may be ahead of this machine's clock: the broker's clock and the
# machine's are never exactly equal. Beyond it the machine's clock is behind (or was turned back).
DEFAULT_MAX_SKEW = 300.0


NO_PINNED_KEY = (
    "this app pins no lease key: leases are not verified, and nothing unlocks offline (pin what "
    "`license-broker keys public` prints)"
)


class InvalidLease(Exception):
    """The lease is forged, tampered with, expired, issued in the future, for another license, or
    signed by a key the app does not pin."""


class LeaseExpired(InvalidLease):
    """The lease verifies but its time is over."""


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
    # A lease issued to a machine (activated with a key) names it: the machine id and the
    # fingerprint hash the client sent. None for a lease of a subscriber token.
    machine_id: str | None = None
    fingerprint: str | None = None
    # A running trial's lease: when the trial ends (epoch seconds; `expires_at` is never later).
    trial_end: int | None = None

    def valid_at(self, now: float) -> bool:
        return now < self.expires_at

    def supersedes(self, other: Lease | None, now: float) -> bool:
        """Whether this lease should replace `other`: a newer state, a lease signed later (a
        renewal; or the broker's current state after its database was restored from a backup,
        whose seq can be lower), or anything when `other` has expired. An older lease (lower seq
        and earlier `iat`) never wins: a user replaying the lease of a state before a refund
        gains nothing."""
        if other is None or not other.valid_at(now):
            return True
        if self.seq > other.seq or self.issued_at > other.issued_at:
            return True
        return self.seq == other.seq and self.issued_at == other.issued_at and self.expires_at >= other.expires_at


@dataclass(frozen=True, slots=True)
class MachineBinding:
    """This machine, as a lease issued to it must name it: the machine id the activation gave, and
    the fingerprint computed here now (never read from a file: a copy elsewhere computes another)."""

    machine_id: str
    fingerprint: str


def check_binding(lease: Lease, machine: MachineBinding | None) -> None:
    """A lease that names a machine verifies only on that machine; a client that has a machine
    takes only leases issued to it. So a lease copied to another computer verifies nothing."""
    if machine is None:
        if lease.machine_id is not None or lease.fingerprint is not None:
            raise InvalidLease(f"issued to machine {lease.machine_id}: this client has no machine activated")
        return
    if lease.machine_id != machine.machine_id:
        raise InvalidLease(f"issued to another machine ({lease.machine_id}, this one is {machine.machine_id})")
    if lease.fingerprint is None or lease.fingerprint.lower() != machine.fingerprint.lower():
        raise InvalidLease("issued to another computer: its fingerprint is not this machine's")


class LeaseVerifier:
    """Verifies leases against the keys pinned in the app, and nothing else (no network). With no
    key pinned it verifies nothing."""

    def __init__(
        self,
        public_keys: Iterable[PinnedKey] | PinnedKey = (),
        *,
        jwks: Mapping[str, Any] | None = None,
        clock: Callable[[], float] = time.time,
        max_skew: float = DEFAULT_MAX_SKEW,
        **removed: Any,
    ) -> None:
        if removed:
            raise TypeError(
                f"LeaseVerifier: {', '.join(sorted(removed))} no longer exist (0.2): leases verify only "
                "with pinned keys, never with the broker's JWKS, which a fake broker serves too"
            )
        # Every key given must be usable (InvalidKey otherwise). None given at all: this verifier
        # verifies nothing, and a client holding it follows the live state only, and says so.
        self._pinned = pinned_keys(public_keys, jwks)
        self.clock = clock
        self.max_skew = max_skew

    @classmethod
    def for_server(cls, base_url: str, *pinned: PinnedKey, **options: Any) -> LeaseVerifier:
        """Kept for the code written for 0.1: the same as `LeaseVerifier(pinned, ...)`. `base_url`
        is not used: the broker's JWKS is not trusted (see the module's docstring)."""
        return cls(pinned, **options)

    @property
    def kids(self) -> set[str]:
        return set(self._pinned)

    async def averify(
        self, token: str, license_id: str, *, now: float | None = None, machine: MachineBinding | None = None
    ) -> Lease:
        """`verify`, for the code written for 0.1 (it fetched the JWKS; nothing is fetched now)."""
        return self.verify(token, license_id, now=now, machine=machine)

    def verify(
        self, token: str, license_id: str, *, now: float | None = None, machine: MachineBinding | None = None
    ) -> Lease:
        """The lease, if it verifies with a pinned key, is for `license_id` (and, for a lease
        issued to a machine, for `machine`: see check_binding), was not issued after the clock
        (beyond `max_skew`) and is unexpired at `now` (default: the clock)."""
        if not self._pinned:
            raise InvalidLease(NO_PINNED_KEY)
        kid = _kid(token)
        key = self._pinned.get(kid)
        if key is None:
            raise InvalidLease(f"signed by a key this app does not pin (kid {kid!r})")
        try:
            # Time is checked below against `clock`, so that it can be tested and so that one
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
        check_binding(lease, machine)
        clock = self.clock()
        if lease.issued_at > clock + self.max_skew:
            raise InvalidLease(
                f"issued in the future ({lease.issued_at - clock:.0f} s ahead of this machine's clock): "
                "the clock is behind"
            )
        if not lease.valid_at(clock if now is None else now):
            raise LeaseExpired("expired")
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
            machine_id=_optional_str(claims, "machine"),
            fingerprint=_optional_str(claims, "fingerprint"),
            trial_end=None if claims.get("trial_end") is None else int(claims["trial_end"]),
        )
    except (TypeError, ValueError) as exc:
        raise InvalidLease(f"malformed claims: {exc}") from None


def _optional_str(claims: dict[str, Any], name: str) -> str | None:
    value = claims.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidLease(f"malformed claims: {name}")
    return value
