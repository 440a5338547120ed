"""An event log that notes what its reads returned, for tests of how the stream and the sweep read."""

from __future__ import annotations

from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from broker.storage.eventlog import EventLog, LicenseEvent


class ReadCountingEventLog(EventLog):
    """The event log, noting how many events each `read` returned. Its arguments are passed on as
    given, so the defaults (the limit) stay EventLog's own and a test sees them."""

    def __init__(self, engine: AsyncEngine) -> None:
        super().__init__(engine)
        self.reads: list[int] = []

    async def read(self, *args: Any, **kwargs: Any) -> list[LicenseEvent]:
        events = await super().read(*args, **kwargs)
        self.reads.append(len(events))
        return events
