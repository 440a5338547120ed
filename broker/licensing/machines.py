"""The machine use cases: activate with a key, list, release, renew a machine token, expire the
machines not seen for LICENSE_MACHINE_TTL. No HTTP here (stream.desktop answers for them)."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from broker.licensing import keys
from broker.licensing.metrics import RELEASED
from broker.licensing.store import KeyStore, Machine, MachineStore
from broker.settings import MACHINES_CEILING, Settings
from broker.signing import tokens
from broker.signing.leases import LeaseSigner, lease_claims
from broker.storage.eventlog import EventLog
from broker.stripe_ledger.ledger import StripeObject
from broker.stripe_ledger.store import LedgerStore
from broker.transports import Transport
from broker.wire import notice

log = logging.getLogger("broker.licensing")

_FINGERPRINT = re.compile(r"[0-9a-fA-F]{64}")
MAX_NAME = 200
MAX_PLATFORM = 100


class BadRequest(ValueError):
    """Input the use case cannot take (400); the message says which field and why."""


class InvalidKey(Exception):
    """No license has this key: never issued, or rotated away (the same answer for both)."""


class LimitReached(Exception):
    def __init__(self, machines: list[Machine], limit: int) -> None:
        super().__init__("machine limit reached")
        self.machines = machines
        self.limit = limit


def fingerprint_of(value: Any) -> str:
    """The fingerprint the client sent: hex SHA-256 of its app's salt and the OS machine id."""
    if not isinstance(value, str) or not _FINGERPRINT.fullmatch(value):
        raise BadRequest("fingerprint: 64 hex characters (SHA-256 of your app's salt and the OS machine id)")
    return value.lower()


def label(value: Any, field: str, longest: int) -> str | None:
    """An optional name or platform: printable text, trimmed, at most `longest` characters."""
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > longest or not value.isprintable():
        raise BadRequest(f"{field}: at most {longest} printable characters")
    return value.strip() or None


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def machine_limit(objects: Iterable[StripeObject], default: int) -> int | None:
    """How many machines a license may hold: `metadata.max_machines` of its Checkout Sessions or
    subscriptions, else of their prices, else `default` (LICENSE_MAX_MACHINES); 0 means no limit,
    answered None. Several objects saying different things: the largest (a license that bought
    more seats keeps them). Never beyond MACHINES_CEILING."""
    own = [o for o in objects if o.kind in ("checkout", "subscription")]
    for field in ("max_machines", "price_max_machines"):
        values = [v for o in own if (v := _count(o.state.get(field))) is not None]
        if values:
            limit = max(values)
            break
    else:
        limit = default
    return None if limit == 0 else min(limit, MACHINES_CEILING)


@dataclass(frozen=True, slots=True)
class MachineGrant:
    """What a machine holds after activating or renewing: its token, and a lease bound to it."""

    token: str
    token_expires_at: int
    lease: str | None


@dataclass(frozen=True, slots=True)
class Activated:
    license_id: str
    machine: Machine
    created: bool  # False: the fingerprint was already active (a reinstall), the same machine
    used: int
    limit: int | None
    grant: MachineGrant

    def body(self) -> dict[str, Any]:
        return {
            "license_id": self.license_id,
            "machine": {"id": self.machine.id, "name": self.machine.name, "platform": self.machine.platform},
            "token": self.grant.token,
            "lease": self.grant.lease,
            "machines": {"used": self.used, "max": self.limit},
        }


def machine_claims(machine_id: str, fingerprint: str) -> dict[str, str]:
    """What a lease issued to a machine adds: the client checks both against its own machine."""
    return {"machine": machine_id, "fingerprint": fingerprint}


class Machines:
    def __init__(
        self,
        engine: AsyncEngine,
        settings: Settings,
        key_store: KeyStore,
        transport: Transport,
        events: EventLog,
        leases: LeaseSigner | None,
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.keys = key_store
        self.transport = transport
        self.events = events
        self.leases = leases

    async def activate(
        self, key_text: str, fingerprint: str, name: str | None = None, platform: str | None = None
    ) -> Activated:
        """Bind a machine to the license of `key_text`, or find it again (the same fingerprint).
        MalformedKey (400), InvalidKey (403), LimitReached (409); nothing is written on failure."""
        key = keys.normalize(key_text)
        digest = keys.fingerprint_digest(fingerprint)
        async with self.engine.begin() as conn:
            # The key row stays locked to the end: activations of one license take turns, so two
            # at once cannot both take the last free place.
            license_id = await self.keys.take(conn, key)
            if license_id is None:
                raise InvalidKey
            machine = await MachineStore.by_fingerprint(conn, license_id, digest)
            limit = machine_limit(await LedgerStore.license_objects(conn, license_id), self.settings.max_machines)
            used = await MachineStore.count(conn, license_id)
            created = machine is None
            if machine is not None:
                # A reinstall is not a new machine, even over a lowered limit.
                machine = await MachineStore.seen(conn, license_id, machine.id, name=name, platform=platform)
                assert machine is not None
            else:
                if used >= (limit or MACHINES_CEILING):
                    raise LimitReached(await MachineStore.of_license(conn, license_id), limit or MACHINES_CEILING)
                machine = await MachineStore.add(conn, license_id, digest, name, platform)
                used += 1
        grant = await self.grant(license_id, machine.id, fingerprint)
        log.info("license %s: machine %s %s", license_id, machine.id, "activated" if created else "activated again")
        return Activated(license_id, machine, created, used, limit, grant)

    async def grant(self, license_id: str, machine_id: str, fingerprint: str) -> MachineGrant:
        """A fresh machine token, and the lease of the license's current state (read from the
        database) bound to the machine."""
        token, exp = tokens.mint_machine(self.settings, license_id, machine_id, fingerprint)
        lease = None
        if self.leases is not None:
            current = await self.events.current(license_id)
            claims = lease_claims(current) | machine_claims(machine_id, fingerprint)
            lease = self.leases.sign(claims).token
        return MachineGrant(token, exp, lease)

    async def seen(self, license_id: str, machine_id: str) -> Machine | None:
        """The machine, marked seen now; None when it is released (or not of this license)."""
        async with self.engine.begin() as conn:
            return await MachineStore.seen(conn, license_id, machine_id)

    async def list(self, license_id: str) -> tuple[list[Machine], int | None]:
        async with self.engine.connect() as conn:
            found = await MachineStore.of_license(conn, license_id)
            limit = machine_limit(await LedgerStore.license_objects(conn, license_id), self.settings.max_machines)
        return found, limit

    async def release(self, license_id: str, machine_id: str) -> bool:
        """Release a machine of the license: its token is refused from this commit on, and its
        streams end at once in every stream process (the notice), or at the latest at their next
        sweep (BROKER_POLL_INTERVAL). False when it is not an active machine of the license."""
        async with self.engine.begin() as conn:
            released = await MachineStore.delete(conn, license_id, machine_id)
        if released:
            RELEASED.labels("request").inc()
            log.info("license %s: machine %s released", license_id, machine_id)
            await self.announce([license_id])
        return released

    async def expire(self, ttl: float) -> int:
        """Release the machines not seen for `ttl` seconds (LICENSE_MACHINE_TTL); how many."""
        before = datetime.now(UTC) - timedelta(seconds=ttl)
        async with self.engine.begin() as conn:
            gone = await MachineStore.expire(conn, before)
        if gone:
            RELEASED.labels("ttl").inc(len(gone))
            log.info("released %d machine(s) not seen for %g s (LICENSE_MACHINE_TTL)", len(gone), ttl)
            await self.announce({license_id for license_id, _ in gone})
        return len(gone)

    async def announce(self, license_ids: Iterable[str]) -> None:
        """After the commit: ask every stream process that follows these licenses to look at
        their machines now. A lost notice costs time, not correctness (the sweep looks anyway)."""
        for license_id in sorted(set(license_ids)):
            try:
                await self.transport.publish(license_id, notice(license_id))
            except Exception as exc:
                log.warning("notice for license %s not published (%s); streams end at the next sweep", license_id, exc)
