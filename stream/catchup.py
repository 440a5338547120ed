"""One client's stream: subscribe, replay from the database, then forward live events, each
exactly once and in seq order; with leases on, each state the client ends up holding is followed
by its signed lease, renewed while the connection stays open."""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import AsyncGenerator, Iterator

from sqlalchemy.exc import SQLAlchemyError

from broker import metrics
from broker.settings import Settings
from broker.signing.leases import LeaseSigner, lease_claims
from broker.storage.eventlog import EventLog
from broker.wire import PING, LicenseEvent, event_frame, retry_frame
from stream.hub import HubClosed, SubscriptionHub
from stream.machine import StreamMachine

log = logging.getLogger("stream")


class _Sender:
    """Tracks the last seq sent; everything below it is skipped, so nothing is sent twice.
    `last` is the newest event sent whose lease is still due (see `license_stream`)."""

    __slots__ = ("last", "sent")

    def __init__(self, sent: int) -> None:
        self.sent = sent
        self.last: LicenseEvent | None = None

    def take(self, event: LicenseEvent) -> bytes | None:
        if event.seq <= self.sent:
            return None
        self.sent = event.seq
        self.last = event
        return event_frame(event)

    def take_each(self, events: list[LicenseEvent]) -> Iterator[bytes]:
        for event in events:
            if (chunk := self.take(event)) is not None:
                yield chunk


def _lease(leases: LeaseSigner, claims: dict[str, object]) -> bytes:
    return leases.sign(claims).frame()


async def license_stream(
    events: EventLog,
    hub: SubscriptionHub,
    settings: Settings,
    license_id: str,
    last_seq: int | None,
    leases: LeaseSigner | None = None,
    *,
    expires_at: float | None = None,
    machine: StreamMachine | None = None,
) -> AsyncGenerator[bytes, None]:
    """One client's stream. It ends by itself at `expires_at` (epoch seconds, the token's `exp`):
    a stream must not outlive the token that opened it; the client reconnects with a fresh one.
    Opened with a machine token (`machine`), its leases name the machine, its token is renewed on
    the stream (`event: token`) and the stream lasts as long as the renewed token; it ends when
    the machine is released (SubscriptionHub.end_machines).

    One generator, which holds no event and no chunk while it waits: thousands of idle streams
    are most of what a stream process holds (docs/bench.md)."""
    yield retry_frame(settings.retry_ms)
    lifetime = _deadline(settings, None)
    deadline = _deadline(settings, expires_at)
    claims: dict[str, object] | None = None  # what the last lease said, signed again to renew it
    renew_at = math.inf
    chunk: bytes | None = None
    live: LicenseEvent | None = None
    try:
        async with hub.subscribe(license_id, machine.id if machine is not None else None) as sub:
            # Subscribed first, read second: an event committed during the catch-up is either read
            # from the database or waiting in the subscription, and `_Sender` drops the second copy.
            sender = _Sender(-1)
            async with contextlib.aclosing(_catch_up(events, settings, license_id, last_seq, sender)) as catch_up:
                # anext with a default rather than `async for`, whose ending StopAsyncIteration is
                # raised in this frame: the frame would then keep an object of its own (~0.4 KB)
                # for the rest of the stream. Likewise no exception below while all is well.
                while (chunk := await anext(catch_up, None)) is not None:
                    yield chunk
            del catch_up
            while True:
                if sender.last is not None:
                    # Before waiting again, the lease of the newest state sent: right after each
                    # live event and the initial state, and once after a replay (the replayed
                    # states before the last are superseded at once; signing each would triple a
                    # replay's cost). A separate id-less event, so the state events' bytes stay
                    # as they are. What it signs is what the database holds: `sender.last` was
                    # read from it (catch-up, gap fill, the sweep), or is a live message whose bytes
                    # were checked against it (broker.transports.livecheck), or, in-process, the
                    # bytes this process's own webhook has just stored. Never Redis's word alone.
                    if leases is not None:
                        # Decoded once per event, not per client: the hub hands every stream the same event.
                        claims = lease_claims(sender.last)
                        if machine is not None:
                            claims |= machine.lease_claims()
                        yield _lease(leases, claims)
                        renew_at = time.monotonic() + leases.renew_after()
                    sender.last = None
                # An idle stream holds nothing it has sent: ~0.5 KB a stream otherwise.
                chunk = live = None
                # The heartbeat's timer also renews the lease: no task or timer of its own per stream.
                timeout = min(settings.heartbeat_interval, renew_at - time.monotonic())
                if machine is not None:
                    timeout = min(timeout, machine.renew_in())
                if deadline is not None:
                    if deadline <= time.monotonic():
                        return
                    timeout = min(timeout, deadline - time.monotonic())
                live = await sub.get(timeout)
                if live is None:
                    if sub.ended:
                        return  # overflowed or shutting down: the client reconnects and catches up
                    now = time.monotonic()
                    if deadline is not None and now >= deadline:
                        return
                    if leases is not None and claims is not None and now >= renew_at:
                        yield _lease(leases, claims)
                        renew_at = now + leases.renew_after()
                        continue
                    if machine is not None and machine.renew_in() <= 0:
                        yield machine.renew()
                        deadline = min(lifetime or math.inf, now + machine.expires_at - time.time())
                        continue
                    yield PING
                    continue
                if live.seq <= sender.sent:
                    continue
                if live.seq > sender.sent + 1:
                    # A gap: Redis lost or reordered a message. Every seq below this one committed
                    # before it (per-license row lock), so the database has them.
                    for chunk in sender.take_each(await events.read(license_id, sender.sent, before=live.seq)):
                        metrics.REPLAYED.inc()
                        yield chunk
                    if sender.sent != live.seq - 1:
                        return  # cannot happen with a healthy database; reconnecting is always safe
                chunk = sender.take(live)
                assert chunk is not None
                metrics.DELIVERED.inc()
                yield chunk
    except HubClosed:
        pass  # shutting down: the client reconnects to another process
    except SQLAlchemyError as exc:
        # The database is unavailable: end the stream; the client retries after `retry:` and
        # resumes from its Last-Event-ID, so nothing is lost.
        log.warning("stream for %s ended, database unavailable: %s", license_id, exc)


async def _catch_up(
    events: EventLog, settings: Settings, license_id: str, last_seq: int | None, sender: _Sender
) -> AsyncGenerator[bytes, None]:
    """Everything the client lacks, up to the license's current state (read first, one query).

    Without a resume point, the current state. With one, the events after it, in order, unless the
    client is further behind than STREAM_REPLAY_LIMIT or claims a seq the license has not reached
    (a database restored from a backup, a forged header): then the current state too, with its
    own seq as id. A state event is complete (status, entitlement, features), so a client that
    skips the events in between lacks nothing it needs to lock or unlock, and the replay a client
    can ask for stays bounded. A client ahead of the license would otherwise skip every live event
    up to its own number."""
    current = await events.current(license_id)
    behind = None if last_seq is None else current.seq - last_seq
    replaying = behind is not None and 0 <= behind <= settings.replay_limit
    if not replaying:
        if behind is not None:
            metrics.RESYNCED.inc()
        sender.sent = current.seq - 1
    else:
        assert last_seq is not None
        sender.sent = last_seq
        # The events before the current one, in batches: a large backlog holds no connection long.
        while sender.sent < current.seq - 1:
            batch = await events.read(license_id, sender.sent, before=current.seq, limit=settings.replay_batch)
            for event in batch:
                if (chunk := sender.take(event)) is not None:
                    metrics.REPLAYED.inc()
                    yield chunk
            if len(batch) < settings.replay_batch:
                break  # rows pruned by EVENT_LOG_RETENTION_DAYS: the current state follows
    if (chunk := sender.take(current)) is not None:
        if replaying:
            metrics.REPLAYED.inc()
        yield chunk
    elif current.seq == last_seq:
        # Nothing missed: not sent again, but its lease is renewed (see `license_stream`).
        sender.last = current


def _deadline(settings: Settings, expires_at: float | None) -> float | None:
    """When the stream ends, on the monotonic clock: its token's expiry or its maximum lifetime."""
    ends: list[float] = []
    if expires_at is not None:
        ends.append(time.monotonic() + (expires_at - time.time()))
    if settings.max_connection_lifetime:
        # Jittered, so that clients of a restarted fleet do not all come back in the same second.
        ends.append(time.monotonic() + settings.max_connection_lifetime * random.uniform(0.85, 1.0))
    return min(ends, default=None)
