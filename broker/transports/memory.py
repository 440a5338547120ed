"""In-process transport: the embedded default, for one process that runs both apps."""

from __future__ import annotations

from broker.transports.base import GapHandler, MessageHandler, Transport, ignore_gap
from broker.wire import decode


class MemoryTransport(Transport):
    name = "memory"
    # Nothing between publish and handler can fail; the only loss is the process dying, which
    # takes its clients with it (they reconnect with Last-Event-ID and replay from the database).
    reliable = True

    def __init__(self) -> None:
        self._handler: MessageHandler | None = None
        self._listening: set[str] = set()

    async def start(self, on_message: MessageHandler, on_gap: GapHandler = ignore_gap) -> None:
        self._handler = on_message

    async def publish(self, license_id: str, payload: bytes) -> None:
        if self._handler is None or license_id not in self._listening:
            return
        if (event := decode(license_id, payload)) is not None:
            self._handler(event)

    async def listen(self, license_id: str) -> None:
        self._listening.add(license_id)

    async def unlisten(self, license_id: str) -> None:
        self._listening.discard(license_id)

    async def close(self) -> None:
        self._handler = None
        self._listening.clear()
