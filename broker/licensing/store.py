"""The rows of keys and machines (license_keys, machines), inside the caller's transaction or on
their own connection."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from broker.licensing import keys
from broker.licensing.keys import KeyVault, UnreadableKey
from broker.storage.db import upsert_into
from broker.storage.schema import license_keys, licenses, machines

log = logging.getLogger("broker.licensing")

# Keeps each IN (...) list well under every driver's parameter limit.
_CHUNK = 1000


def utc(value: datetime) -> datetime:
    """SQLite hands timestamps back without their zone; they were written in UTC."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def new_machine_id() -> str:
    return "mch_" + secrets.token_hex(12)


def new_license_id() -> str:
    """A license the broker creates itself (a checkout or a trial from the app)."""
    return "lic_" + secrets.token_hex(12)


class KeyStore:
    """One key per license, created when first needed (`reveal`), replaced by `rotate`."""

    def __init__(self, engine: AsyncEngine, vault: KeyVault) -> None:
        self.engine = engine
        self.vault = vault

    async def reveal(self, license_id: str) -> str | None:
        """The license's key (normalised), created now if it has none; None for a license that
        does not exist. A key sealed under an older LICENSE_KEY_SECRET is sealed again under the
        current one."""
        async with self.engine.begin() as conn:
            row = await self._row(conn, license_id)
            if row is None:
                if not await conn.scalar(sa.select(sa.literal(1)).where(licenses.c.id == license_id)):
                    return None
                key = keys.generate()
                sealed = self.vault.seal(license_id, key)
                # Two first requests at once: one row wins, the other reads it below.
                insert = upsert_into(conn, license_keys).values(
                    license_id=license_id, digest=sealed.digest, sealed=sealed.sealed, secret_id=sealed.secret_id
                )
                await conn.execute(insert.on_conflict_do_nothing())
                row = await self._row(conn, license_id)
                assert row is not None
            try:
                key = self.vault.open(license_id, row.sealed, row.secret_id)
            except UnreadableKey:
                if not self.vault.ephemeral:
                    raise
                # Development mode generates LICENSE_KEY_SECRET per run; a key of an earlier run's
                # database is replaced rather than shown as an error.
                log.warning("license %s: key of an earlier development run replaced", license_id)
                return await self._replace(conn, license_id)
            if row.secret_id != self.vault.current.id:
                await self._reseal(conn, license_id, key)
            return key

    async def rotate(self, license_id: str) -> str | None:
        """A new key for the license; the old one stops working with this commit. None for a
        license that does not exist."""
        async with self.engine.begin() as conn:
            if not await conn.scalar(sa.select(sa.literal(1)).where(licenses.c.id == license_id)):
                return None
            return await self._replace(conn, license_id)

    async def _replace(self, conn: AsyncConnection, license_id: str) -> str:
        key = keys.generate()
        sealed = self.vault.seal(license_id, key)
        values = {"digest": sealed.digest, "sealed": sealed.sealed, "secret_id": sealed.secret_id}
        insert = upsert_into(conn, license_keys).values(license_id=license_id, **values)
        now = datetime.now(UTC)
        await conn.execute(
            insert.on_conflict_do_update(index_elements=["license_id"], set_={**values, "rotated_at": now})
        )
        return key

    async def _reseal(self, conn: AsyncConnection, license_id: str, key: str) -> None:
        sealed = self.vault.seal(license_id, key)
        values = {"digest": sealed.digest, "sealed": sealed.sealed, "secret_id": sealed.secret_id}
        await conn.execute(license_keys.update().where(license_keys.c.license_id == license_id).values(**values))

    @staticmethod
    async def _row(conn: AsyncConnection, license_id: str) -> Any:
        t = license_keys
        query = sa.select(t.c.sealed, t.c.secret_id).where(t.c.license_id == license_id)
        return (await conn.execute(query)).first()

    async def take(self, conn: AsyncConnection, key: str) -> str | None:
        """The license of a normalised key, its key row locked until the transaction ends (which
        serialises the activations of one license), or None: unknown, or rotated away."""
        t = license_keys
        query = (
            t.update()
            .where(t.c.digest.in_(self.vault.digests(key)))
            .values(used_at=datetime.now(UTC))
            .returning(t.c.license_id)
        )
        found = (await conn.execute(query)).scalar_one_or_none()
        return None if found is None else str(found)

    async def find(self, key: str) -> str | None:
        """The license of a normalised key, or None (unknown, or rotated away)."""
        t = license_keys
        async with self.engine.connect() as conn:
            found = await conn.scalar(sa.select(t.c.license_id).where(t.c.digest.in_(self.vault.digests(key))))
        return None if found is None else str(found)

    async def reseal_all(self) -> int:
        """Seal every key sealed under an older secret again under the current one (before that
        secret is removed from LICENSE_KEY_SECRET); how many were."""
        done = 0
        async with self.engine.begin() as conn:
            t = license_keys
            rows = (
                await conn.execute(
                    sa.select(t.c.license_id, t.c.sealed, t.c.secret_id).where(t.c.secret_id != self.vault.current.id)
                )
            ).all()
            for row in rows:
                key = self.vault.open(row.license_id, row.sealed, row.secret_id)
                await self._reseal(conn, row.license_id, key)
                done += 1
        return done


@dataclass(frozen=True, slots=True)
class Machine:
    id: str
    license_id: str
    name: str | None
    platform: str | None
    created_at: datetime
    last_seen_at: datetime

    @classmethod
    def from_row(cls, row: Any) -> Machine:
        return cls(row.id, row.license_id, row.name, row.platform, utc(row.created_at), utc(row.last_seen_at))

    def public(self) -> dict[str, Any]:
        """As the API shows it (no fingerprint, not even hashed)."""
        return {
            "id": self.id,
            "name": self.name,
            "platform": self.platform,
            "created_at": self.created_at.isoformat(),
            "last_seen_at": self.last_seen_at.isoformat(),
        }


class MachineStore:
    """Machine rows. Released machines are deleted: a row that exists is an active machine."""

    @staticmethod
    async def of_license(conn: AsyncConnection, license_id: str) -> list[Machine]:
        m = machines
        query = sa.select(m).where(m.c.license_id == license_id).order_by(m.c.created_at, m.c.id)
        return [Machine.from_row(row) for row in await conn.execute(query)]

    @staticmethod
    async def count(conn: AsyncConnection, license_id: str) -> int:
        m = machines
        return int(await conn.scalar(sa.select(sa.func.count()).where(m.c.license_id == license_id)) or 0)

    @staticmethod
    async def by_fingerprint(conn: AsyncConnection, license_id: str, digest: bytes) -> Machine | None:
        m = machines
        row = (await conn.execute(sa.select(m).where(m.c.license_id == license_id, m.c.fingerprint == digest))).first()
        return None if row is None else Machine.from_row(row)

    @staticmethod
    async def add(
        conn: AsyncConnection, license_id: str, digest: bytes, name: str | None, platform: str | None
    ) -> Machine:
        """A new machine. The caller holds the license's key row (KeyStore.take), so no other
        activation of the license can add the same fingerprint meanwhile."""
        now = datetime.now(UTC)
        machine = Machine(new_machine_id(), license_id, name, platform, now, now)
        await conn.execute(
            machines.insert().values(
                id=machine.id,
                license_id=license_id,
                fingerprint=digest,
                name=name,
                platform=platform,
                created_at=now,
                last_seen_at=now,
            )
        )
        return machine

    @staticmethod
    async def seen(
        conn: AsyncConnection, license_id: str, machine_id: str, *, name: str | None = None, platform: str | None = None
    ) -> Machine | None:
        """Mark the machine seen now (and rename it when asked); None when it is not an active
        machine of that license: released, or never was."""
        m = machines
        values: dict[str, Any] = {"last_seen_at": datetime.now(UTC)}
        if name is not None:
            values["name"] = name
        if platform is not None:
            values["platform"] = platform
        query = m.update().where(m.c.id == machine_id, m.c.license_id == license_id).values(**values).returning(*m.c)
        row = (await conn.execute(query)).first()
        return None if row is None else Machine.from_row(row)

    @staticmethod
    async def get(conn: AsyncConnection, license_id: str, machine_id: str) -> Machine | None:
        m = machines
        row = (await conn.execute(sa.select(m).where(m.c.id == machine_id, m.c.license_id == license_id))).first()
        return None if row is None else Machine.from_row(row)

    @staticmethod
    async def delete(conn: AsyncConnection, license_id: str, machine_id: str) -> bool:
        m = machines
        result = await conn.execute(m.delete().where(m.c.id == machine_id, m.c.license_id == license_id))
        return bool(result.rowcount)

    @staticmethod
    async def existing(conn: AsyncConnection, machine_ids: Iterable[str]) -> set[str]:
        """Which of these machines are still active."""
        ids = sorted(set(machine_ids))
        found: set[str] = set()
        for start in range(0, len(ids), _CHUNK):
            query = sa.select(machines.c.id).where(machines.c.id.in_(ids[start : start + _CHUNK]))
            found |= {str(i) for i in await conn.scalars(query)}
        return found

    @staticmethod
    async def touch_all(conn: AsyncConnection, machine_ids: Sequence[str], now: datetime) -> None:
        ids = sorted(set(machine_ids))
        for start in range(0, len(ids), _CHUNK):
            await conn.execute(
                machines.update().where(machines.c.id.in_(ids[start : start + _CHUNK])).values(last_seen_at=now)
            )

    @staticmethod
    async def expire(conn: AsyncConnection, before: datetime, limit: int = 1000) -> list[tuple[str, str]]:
        """Release (delete) machines not seen since `before`, at most `limit`: (license, machine)."""
        m = machines
        stale = sa.select(m.c.id).where(m.c.last_seen_at < before).order_by(m.c.last_seen_at).limit(limit)
        query = m.delete().where(m.c.id.in_(stale)).returning(m.c.license_id, m.c.id)
        return [(str(row.license_id), str(row.id)) for row in await conn.execute(query)]
