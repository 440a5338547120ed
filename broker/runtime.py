"""What a process holds while it runs: the engine, the event log, the transport and the lease
signer (None without LICENSE_SIGNING_KEY)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncEngine

from broker.settings import Settings
from broker.signing.leases import LeaseSigner
from broker.storage.db import create_engine, migrate
from broker.storage.eventlog import EventLog
from broker.transports import Transport, create_transport
from broker.web.metrics_server import metrics_server
from broker.web.readiness import ReadinessProbe


@dataclass(frozen=True)
class Runtime:
    settings: Settings
    engine: AsyncEngine
    event_log: EventLog
    transport: Transport
    readiness: ReadinessProbe
    leases: LeaseSigner | None = None


@asynccontextmanager
async def open_runtime(settings: Settings) -> AsyncIterator[Runtime]:
    engine = create_engine(settings)
    try:
        if settings.is_sqlite:
            await migrate(engine)  # the embedded default sets itself up; Postgres uses `migrate`
        events = EventLog(engine)
        transport = create_transport(settings, events)
        await transport.connect()
        try:
            leases = LeaseSigner(settings.lease_keys, ttl=settings.lease_ttl) if settings.lease_keys else None
            async with metrics_server(settings):
                yield Runtime(settings, engine, events, transport, ReadinessProbe(engine, transport), leases)
        finally:
            await transport.close()
    finally:
        await engine.dispose()
