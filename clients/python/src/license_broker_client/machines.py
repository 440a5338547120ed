"""This machine's activation, and the machines of a license as the broker lists them.

The activation (license id, machine id, machine token) is kept in a file of its own beside the
lease cache (`<cache>.machine`), readable by the user only (0600): the token opens the license's
stream and its machine routes. The fingerprint is never stored: it is computed again on every
start, so the file copied to another computer binds nothing there (leases name the fingerprint)."""

from __future__ import annotations

import base64
import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from license_broker_client.cache import write_atomically


@dataclass(frozen=True, slots=True)
class Machine:
    """A machine of the license, as the broker lists it."""

    id: str
    name: str | None
    platform: str | None
    created_at: str | None = None
    last_seen_at: str | None = None
    current: bool = False  # the machine whose token asked (this one)

    @classmethod
    def of(cls, data: dict[str, Any]) -> Machine:
        return cls(
            id=str(data["id"]),
            name=data.get("name"),
            platform=data.get("platform"),
            created_at=data.get("created_at"),
            last_seen_at=data.get("last_seen_at"),
            current=data.get("current") is True,
        )


@dataclass(frozen=True, slots=True)
class MachineList:
    license_id: str
    machines: tuple[Machine, ...]
    used: int
    max: int | None  # None: no limit

    def __iter__(self) -> Iterator[Machine]:
        return iter(self.machines)

    def __len__(self) -> int:
        return len(self.machines)


@dataclass(frozen=True, slots=True)
class Activation:
    """What `activate()` answered: this machine (`created` False when the same fingerprint was
    already active: a reinstall is not a new machine) and how many of the license's places are
    used. The lease, when it verifies, is already held by the client."""

    license_id: str
    machine: Machine
    created: bool
    used: int
    max: int | None
    lease: str | None


@dataclass(frozen=True, slots=True)
class Credentials:
    license_id: str
    machine_id: str
    token: str

    def token_times(self) -> tuple[float, float] | None:
        """(iat, exp) of the machine token, read without verifying (only the broker can: HS256)."""
        try:
            payload = self.token.split(".")[1]
            claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
            return float(claims.get("iat", 0)), float(claims["exp"])
        except (IndexError, ValueError, KeyError, TypeError):
            return None


class MachineFile:
    """The activation on disk: JSON, written atomically, mode 0600."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).expanduser()

    def load(self) -> Credentials | None:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            credentials = Credentials(str(data["license_id"]), str(data["machine_id"]), str(data["token"]))
        except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError):
            return None
        return credentials

    def save(self, credentials: Credentials) -> None:
        # mkstemp creates the file 0600; os.replace keeps that mode.
        write_atomically(self.path, json.dumps(asdict(credentials)) + "\n")

    def clear(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
