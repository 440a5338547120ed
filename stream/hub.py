"""The per-process subscription hub: one transport subscription per followed license, fanned
out to a bounded queue per connected client."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

from broker import metrics
from broker.eventlog import LicenseEvent
from broker.transports import Transport

log = logging.getLogger("stream.hub")


class HubClosed(Exception):
    """The process is shutting down; the client should reconnect elsewhere."""


class Subscription:
    """One client's view of one license: a bounded queue. None in the queue means "stop"."""

    __slots__ = ("license_id", "overflowed", "queue")

    def __init__(self, license_id: str, size: int) -> None:
        self.license_id = license_id
        self.queue: asyncio.Queue[LicenseEvent | None] = asyncio.Queue(size)
        self.overflowed = False

    def push(self, event: LicenseEvent) -> None:
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            # The client is not reading fast enough. Dropping it keeps memory bounded; it
            # reconnects with Last-Event-ID and catches up from the database.
            self.overflowed = True
            metrics.SLOW_CLIENTS.inc()
            self.end()

    def end(self) -> None:
        while not self.queue.empty():
            self.queue.get_nowait()
        self.queue.put_nowait(None)

    async def get(self) -> LicenseEvent | None:
        return await self.queue.get()


class _Topic:
    __slots__ = ("listening", "lock", "subs")

    def __init__(self) -> None:
        self.subs: set[Subscription] = set()
        self.lock = asyncio.Lock()
        self.listening = False


class SubscriptionHub:
    """Takes a reliable transport (create_transport's): every committed event of a followed
    license reaches `_fan_out`, perhaps twice or out of order, which the stream sorts out."""

    def __init__(self, transport: Transport, *, buffer: int) -> None:
        assert transport.reliable, "a lossy transport needs the database sweep (create_transport)"
        self.transport = transport
        self.buffer = buffer
        self._topics: dict[str, _Topic] = {}
        self._closing = False

    async def start(self) -> None:
        await self.transport.start(self._fan_out)

    @property
    def closing(self) -> bool:
        return self._closing

    def end_streams(self) -> None:
        """End every stream and refuse new ones: the process is going away. Idempotent."""
        self._closing = True
        for topic in self._topics.values():
            for sub in topic.subs:
                sub.end()

    async def close(self) -> None:
        """End every stream (clients reconnect elsewhere) and release the transport. Idempotent."""
        self.end_streams()
        await self.transport.close()

    @contextlib.asynccontextmanager
    async def subscribe(self, license_id: str) -> AsyncIterator[Subscription]:
        """Register a client. Once this yields, every message for the license that the transport
        delivers is queued for it; the caller replays from the database afterwards and skips
        what it already sent (seq), so nothing published during the replay is missed."""
        if self._closing:
            raise HubClosed
        sub = Subscription(license_id, self.buffer)
        topic = self._topics.get(license_id)
        if topic is None:
            topic = self._topics[license_id] = _Topic()
        # Joined before taking the lock: a concurrent release then sees a non-empty topic.
        topic.subs.add(sub)
        try:
            async with topic.lock:
                if not topic.listening:
                    await self.transport.listen(license_id)
                    topic.listening = True
            yield sub
        finally:
            topic.subs.discard(sub)
            if not topic.subs:
                # Shielded: a cancelled client must still release the channel.
                await asyncio.shield(self._release(license_id, topic))

    async def _release(self, license_id: str, topic: _Topic) -> None:
        async with topic.lock:
            if topic.subs:
                return
            if self._topics.get(license_id) is topic:
                del self._topics[license_id]
            if topic.listening:
                topic.listening = False
                try:
                    await self.transport.unlisten(license_id)
                except Exception as exc:
                    log.warning("unlisten %s failed: %s", license_id, exc)

    def _fan_out(self, event: LicenseEvent) -> None:
        topic = self._topics.get(event.license_id)
        if topic is None:
            return
        if event.recorded_at is not None:
            # Wall clocks of two processes: clamp the skew rather than observe a negative lag.
            metrics.DELIVERY_LAG.observe(max(0.0, time.time() - event.recorded_at))
        for sub in tuple(topic.subs):
            sub.push(event)
