"""The per-process subscription hub: one transport subscription per followed license, fanned
out to a bounded buffer per connected client."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable

from broker import metrics
from broker.transports import Transport
from broker.wire import NOTICE_SEQ, LicenseEvent

log = logging.getLogger("stream.hub")


class HubClosed(Exception):
    """The process is shutting down; the client should reconnect elsewhere."""


class Subscription:
    """One client's view of one license: the events not yet taken, at most `size` of them.

    An idle stream is most of what a stream process holds, so this holds nothing while idle:
    the buffer exists only while events wait in it, and the future only while its client
    waits (asyncio.Queue kept three deques and an Event for the life of each stream, ~3 KB)."""

    __slots__ = ("_ended", "_hub", "_pending", "_size", "_waiter", "license_id", "machine_id", "overflowed")

    def __init__(self, hub: SubscriptionHub, license_id: str, size: int, machine_id: str | None = None) -> None:
        self._hub = hub
        self.license_id = license_id
        self.machine_id = machine_id  # the machine whose token opened the stream, if any
        self.overflowed = False
        self._size = size
        self._pending: deque[LicenseEvent] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._ended = False

    # A class of its own rather than an @asynccontextmanager: no generator per stream.
    async def __aenter__(self) -> Subscription:
        await self._hub._join(self)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._hub._leave(self)

    def push(self, event: LicenseEvent) -> None:
        if self._ended:
            return
        if self._pending is None:
            self._pending = deque()
        elif len(self._pending) >= self._size:
            # The client is not reading fast enough. Dropping it keeps memory bounded; it
            # reconnects with Last-Event-ID and catches up from the database.
            self.overflowed = True
            metrics.SLOW_CLIENTS.inc()
            self.end()
            return
        self._pending.append(event)
        self._wake()

    def end(self) -> None:
        """What is pending is dropped; `get` answers None from now on. Idempotent."""
        self._ended = True
        self._pending = None
        self._wake()

    @property
    def pending(self) -> int:
        return 0 if self._pending is None else len(self._pending)

    @property
    def waiting(self) -> bool:
        """Whether a `get` is waiting for the next event."""
        return self._waiter is not None

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    @property
    def ended(self) -> bool:
        return self._ended

    async def get(self, timeout: float) -> LicenseEvent | None:  # noqa: ASYNC109 (see the timer below)
        """The next event, in the order pushed; None if none comes within `timeout` seconds, or
        once ended (overflowed, or shutting down: `ended`).

        None rather than TimeoutError: an exception raised through the caller's frame gives that
        frame an object of its own (~0.4 KB) that it keeps for as long as the stream lives."""
        if not self._pending:
            if self._ended:
                return None
            # A timer that wakes the waiter, rather than asyncio.timeout's cancellation: no
            # Timeout object per wait, and no exception thrown through the frames (a heartbeat
            # is most of what an idle stream does).
            loop = asyncio.get_running_loop()
            self._waiter = waiter = loop.create_future()
            timer = loop.call_later(timeout, self._wake)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None
            if not self._pending:
                return None
        assert self._pending is not None
        event = self._pending.popleft()
        if not self._pending:
            self._pending = None
        return event


class _Topic:
    __slots__ = ("listening", "lock", "subs")

    def __init__(self) -> None:
        # A list: most licenses have one client at a time (and STREAM_MAX_PER_LICENSE a few), and
        # a set of one is ~0.2 KB more per followed license.
        self.subs: list[Subscription] = []
        self.lock = asyncio.Lock()
        self.listening = False


class SubscriptionHub:
    """Takes a reliable transport (create_transport's): every committed event of a followed
    license reaches `_fan_out`, perhaps twice or out of order, which the stream sorts out, and
    nothing else: a lossy transport's messages are checked against the database first, once per
    process (SweptTransport), so no client's stream, nor its lease, carries what Redis alone said."""

    def __init__(self, transport: Transport, *, buffer: int) -> None:
        assert transport.reliable, "a lossy transport needs the database sweep (create_transport)"
        self.transport = transport
        self.buffer = buffer
        self._topics: dict[str, _Topic] = {}
        self._closing = False
        # Called with the license id of each notice (broker.wire.notice): its machines
        # are to be looked at (broker.licensing.watch). Must not block.
        self.on_notice: Callable[[str], None] = lambda license_id: None

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

    def machines_of(self, license_id: str) -> set[str]:
        """The machines that hold a stream of the license in this process."""
        topic = self._topics.get(license_id)
        return {s.machine_id for s in topic.subs if s.machine_id is not None} if topic else set()

    def held_machines(self) -> dict[str, str]:
        """Every machine that holds a stream in this process, with its license."""
        return {s.machine_id: lid for lid, t in self._topics.items() for s in t.subs if s.machine_id is not None}

    def end_machines(self, license_id: str, machine_ids: Iterable[str]) -> int:
        """End the streams these machines hold (released); how many."""
        ids, ended = set(machine_ids), 0
        topic = self._topics.get(license_id)
        for sub in tuple(topic.subs) if topic else ():
            if sub.machine_id in ids and not sub.ended:
                sub.end()
                ended += 1
        return ended

    def subscribe(self, license_id: str, machine_id: str | None = None) -> Subscription:
        """A client's subscription, registered by `async with`: once entered, every message for
        the license that the transport delivers is queued for it; the caller replays from the
        database afterwards and skips what it already sent (seq), so nothing published during
        the replay is missed. Leaving it releases the channel when no one else follows it."""
        return Subscription(self, license_id, self.buffer, machine_id)

    async def _join(self, sub: Subscription) -> None:
        if self._closing:
            raise HubClosed
        license_id = sub.license_id
        topic = self._topics.get(license_id)
        if topic is None:
            topic = self._topics[license_id] = _Topic()
        # Joined before taking the lock: a concurrent release then sees a non-empty topic.
        topic.subs.append(sub)
        try:
            async with topic.lock:
                if not topic.listening:
                    await self.transport.listen(license_id)
                    topic.listening = True
        except BaseException:
            await self._leave(sub)
            raise

    async def _leave(self, sub: Subscription) -> None:
        topic = self._topics.get(sub.license_id)
        if topic is None or sub not in topic.subs:
            return
        topic.subs.remove(sub)
        if not topic.subs:
            # Shielded: a cancelled client must still release the channel.
            await asyncio.shield(self._release(sub.license_id, topic))

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
        if event.seq == NOTICE_SEQ:  # not an event: a prompt to look at the license's machines
            self.on_notice(event.license_id)
            return
        if event.recorded_at is not None:
            # Wall clocks of two processes: clamp the skew rather than observe a negative lag.
            metrics.DELIVERY_LAG.observe(max(0.0, time.time() - event.recorded_at))
        for sub in tuple(topic.subs):
            sub.push(event)
