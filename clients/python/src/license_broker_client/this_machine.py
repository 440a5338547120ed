"""This machine's side of a license activated with a key: its fingerprint (computed, never
stored), its activation (kept in `<cache>.machine`, 0600) and when its token wants renewing.
LicenseClient holds one when it is created with `app_id`; no network here but through
MachineRoutes, no asyncio state."""

from __future__ import annotations

import logging
import socket
import sys
import time

from license_broker_client.fingerprint import machine_fingerprint
from license_broker_client.leases import MachineBinding
from license_broker_client.license_keys import normalize_license_key
from license_broker_client.machine_routes import MachineRoutes
from license_broker_client.machines import Activation, Credentials, MachineFile

log = logging.getLogger("license_broker_client")


def default_name() -> str | None:
    """The computer's name, as the machine lists show it ("deactivate my old laptop")."""
    try:
        name = socket.gethostname()
    except OSError:
        return None
    return "".join(c for c in name if c.isprintable())[:200] or None


class ThisMachine:
    def __init__(
        self, app_id: str, routes: MachineRoutes, file: MachineFile | None, os_machine_id: str | None = None
    ) -> None:
        if not app_id:
            raise ValueError("app_id: your app's own salt for the machine fingerprint (e.g. 'com.example.draw')")
        self.app_id = app_id
        self.routes = routes
        self.file = file
        self._os_machine_id = os_machine_id
        self._fingerprint: str | None = None
        self._credentials: Credentials | None = None
        self._loaded = file is None

    @property
    def fingerprint(self) -> str:
        """hex SHA-256 of the app id and the OS machine id; MachineIdUnavailable if unreadable."""
        if self._fingerprint is None:
            self._fingerprint = machine_fingerprint(self.app_id, machine_id=self._os_machine_id)
        return self._fingerprint

    @property
    def credentials(self) -> Credentials | None:
        """The activation: read from its file on first use (no I/O in constructors)."""
        if not self._loaded:
            self._loaded = True
            assert self.file is not None
            self._credentials = self.file.load()
        return self._credentials

    def binding(self) -> MachineBinding | None:
        credentials = self.credentials
        return None if credentials is None else MachineBinding(credentials.machine_id, self.fingerprint)

    def store(self, credentials: Credentials) -> None:
        self._loaded = True
        self._credentials = credentials
        if self.file is not None:
            try:
                self.file.save(credentials)
            except OSError as exc:  # the activation still holds for this run
                log.warning("activation not written to %s: %s", self.file.path, exc)

    def forget(self) -> None:
        self._loaded = True
        self._credentials = None
        if self.file is not None:
            try:
                self.file.clear()
            except OSError as exc:
                log.warning("activation not removed from %s: %s", self.file.path, exc)

    async def activate(self, key: str, name: str | None, platform: str | None) -> tuple[Activation, Credentials]:
        """MalformedLicenseKey before anything is sent; the broker's refusals as errors."""
        display = normalize_license_key(key)
        return await self.routes.activate(
            display, self.fingerprint, default_name() if name is None else name, platform or sys.platform
        )

    def token_wants_renewal(self, now: float | None = None) -> bool:
        """More than half of the machine token's life is spent (the broker's stream renews it at
        the same point; this is for a client that connects, or reconnects, after it)."""
        credentials = self.credentials
        times = credentials.token_times() if credentials is not None else None
        if times is None:
            return False
        issued, expires = times
        return (time.time() if now is None else now) >= issued + (expires - issued) / 2
