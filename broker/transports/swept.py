"""A lossy transport with the database sweep underneath. Redis is the fast path, the database
the sure one: what the inner transport loses (published during an outage, or never published by
a webhook that died between commit and publish) the sweep finds within its interval, and at once
after the inner transport reports a gap (a reconnect).

The database is also the only truth: each live message is checked against the stored event of
its seq (broker.transports.livecheck) before it is handed on or noted, so a forged message
neither reaches a client nor moves the sweep past events it has yet to find."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncEngine

from broker.transports.base import GapHandler, MessageHandler, Transport, ignore_gap
from broker.transports.livecheck import LiveCheck
from broker.transports.sweep import DatabaseSweep
from broker.wire import NOTICE_SEQ, LicenseEvent


class SweptTransport(Transport):
    # Every committed event reaches the handler: live through `inner` (once checked), or from the
    # database. The same event may come both ways; the stream sends each seq once.
    reliable = True

    def __init__(self, inner: Transport, sweep: DatabaseSweep, check_engine: AsyncEngine | None = None) -> None:
        """`check_engine`: the live check's own (one connection, owned and disposed here; the
        sweep's engine when None)."""
        self.inner = inner
        self.sweep = sweep
        self.name = inner.name
        self.live_check: LiveCheck | None = None
        self._check_engine = check_engine

    async def connect(self) -> None:
        await self.inner.connect()

    async def start(self, on_message: MessageHandler, on_gap: GapHandler = ignore_gap) -> None:
        def checked(event: LicenseEvent) -> None:
            self.sweep.note(event.license_id, event.seq)  # delivered: the sweep need not fetch it
            on_message(event)

        live_check = LiveCheck(self._check_engine or self.sweep.events.engine, checked, self.sweep.wake)
        self.live_check = live_check

        def received(event: LicenseEvent) -> None:
            # A notice is no event and is never stored: nothing to compare it with. It only prompts
            # the process to read the license's machines from the database (broker.licensing.watch),
            # so a forged one ends nothing; it goes straight on, unnoted by the sweep.
            if event.seq == NOTICE_SEQ:
                on_message(event)
            else:
                live_check.submit(event)

        live_check.start()
        await self.inner.start(received, self.sweep.wake)
        self.sweep.start(on_message)

    async def publish(self, license_id: str, payload: bytes) -> None:
        await self.inner.publish(license_id, payload)

    async def listen(self, license_id: str) -> None:
        await self.inner.listen(license_id)
        # The sweep's baseline is read once the inner transport listens: anything committed later
        # arrives live or is found by the sweep; anything before is in the client's replay. Never
        # taken from a client's Last-Event-ID, which may lie.
        await self.sweep.follow(license_id)

    async def unlisten(self, license_id: str) -> None:
        self.sweep.unfollow(license_id)
        await self.inner.unlisten(license_id)

    async def check(self) -> bool:
        return await self.inner.check()

    async def close(self) -> None:
        await self.sweep.stop()
        await self.inner.close()
        if self.live_check is not None:
            await self.live_check.stop()
        if self._check_engine is not None:
            await self._check_engine.dispose()
