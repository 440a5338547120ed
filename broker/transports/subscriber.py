"""What the two Redis transports share: the subscriber task, which connects and subscribes every
followed channel, serves, and when anything breaks backs off with full jitter and starts again,
reporting the gap; and the bookkeeping of subscriptions that Redis has yet to confirm.

Redis pub/sub is at most once: a message published while the subscriber is disconnected is gone.
`on_gap` after every reconnect wakes the database sweep under the transport (SweptTransport)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from abc import abstractmethod
from collections.abc import Iterable
from typing import Any

from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from broker import background, metrics
from broker.transports.base import GapHandler, MessageHandler, Transport, ignore_gap
from broker.wire import decode

log = logging.getLogger("broker.redis")

PREFIX = b"license:"
FIRST_BACKOFF = 0.05
# redis-py's health check sends a PING once a connection has read nothing for its interval, but
# never waits for the answer: a connection that died without a word (a host gone, a NAT or
# firewall that forgot the flow) would be read for ever. Whatever is read, the PONG included,
# moves the next check on; still silent this long after the PING was due, the connection is dead.
PING_GRACE = 5.0


def check_alive(pubsub: Any) -> None:
    """Raise ConnectionError if the subscribed connection has not answered its health check."""
    conn = pubsub.connection
    due = conn.next_health_check if conn is not None else -1
    if due > 0 and asyncio.get_running_loop().time() > due + PING_GRACE:
        raise ConnectionError("no answer to the health check's PING: the connection is silently dead")


def subscriber_options() -> dict[str, Any]:
    """Connection options of a subscriber connection. No hidden retries: a failure surfaces at
    once and the subscriber loop backs off and reconnects. The health check (a PING every 10 s
    while reading) finds a connection that died without a word."""
    return {
        "socket_connect_timeout": 2,
        "socket_timeout": 2,
        "socket_keepalive": True,
        "health_check_interval": 10,
        "retry": Retry(NoBackoff(), 0),
    }


class RedisSubscriber(Transport):
    """The subscriber loop of a Redis transport. A subclass says how to subscribe everything
    (`_subscribe_all`), what to do while subscribed (`_serve`) and how to close (`_disconnect`)."""

    def __init__(self, *, subscribe_timeout: float, max_backoff: float) -> None:
        self.subscribe_timeout = subscribe_timeout
        self.max_backoff = max_backoff
        self._channels: set[str] = set()  # wanted: followed by the hub
        self._pending: dict[str, asyncio.Future[None]] = {}  # subscribed, not yet confirmed
        self._task: asyncio.Task[None] | None = None
        self._on_message: MessageHandler | None = None
        self._on_gap: GapHandler = ignore_gap

    @abstractmethod
    async def _subscribe_all(self, *, first: bool) -> bool:
        """Connect and subscribe every wanted channel; raise if some are not served yet. Returns
        whether messages may have been lost since the last success."""

    @abstractmethod
    async def _serve(self) -> None:
        """While subscribed: return to subscribe again (a resync), raise when a connection is lost."""

    @abstractmethod
    async def _disconnect(self) -> None:
        """Close every connection; idempotent."""

    @abstractmethod
    async def _ping(self) -> object: ...

    @property
    def _start_timeout(self) -> float:
        return self.subscribe_timeout

    async def check(self) -> bool:
        await self.connect()
        try:
            async with asyncio.timeout(2):
                return bool(await self._ping())
        except Exception:
            return False

    async def start(self, on_message: MessageHandler, on_gap: GapHandler = ignore_gap) -> None:
        await self.connect()
        self._on_message, self._on_gap = on_message, on_gap
        ready = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._run(ready), name=f"{self.name}-subscriber")
        # Wait for the first connection, but start anyway if Redis is down: the sweep serves.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._start_timeout):
                await asyncio.shield(ready)

    async def close(self) -> None:
        await background.stop(self._task)
        self._task = None
        await self._disconnect()
        metrics.TRANSPORT_UP.labels(self.name).set(0)

    async def _run(self, ready: asyncio.Future[None]) -> None:
        backoff = FIRST_BACKOFF
        up: bool | None = None  # None until the first attempt ends
        while True:
            try:
                lost = await self._subscribe_all(first=up is None)
                metrics.TRANSPORT_UP.labels(self.name).set(1)
                if up is not None and lost:
                    log.info("%s subscriber reconnected (%d channels)", self.name, len(self._channels))
                    self._on_gap()  # whatever was published while we were away is in the database
                up = True
                backoff = FIRST_BACKOFF
                if not ready.done():
                    ready.set_result(None)
                await self._serve()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if up is not False:  # once an outage, not at every retry
                    log.warning("%s subscriber lost: %s", self.name, exc)
                up = False
                metrics.TRANSPORT_UP.labels(self.name).set(0)
                # Exponential backoff with full jitter, so that many processes do not reconnect in step.
                await asyncio.sleep(random.uniform(0, backoff))
                backoff = min(backoff * 2, self.max_backoff)

    def _handled(self, message: dict[str, Any]) -> bool:
        """Deliver a message, or note the confirmation of a subscription, of plain or sharded
        pub/sub; False for any other kind."""
        kind = message["type"]
        if kind in ("message", "smessage"):
            self._deliver(message["channel"], message["data"])
        elif kind in ("subscribe", "ssubscribe"):
            self._confirm(message["channel"])
        else:
            return False
        return True

    def _deliver(self, name: bytes, data: bytes) -> None:
        on_message = self._on_message
        if on_message is None or not name.startswith(PREFIX):
            return
        if (event := decode(name[len(PREFIX) :].decode(), data)) is not None:
            on_message(event)

    def _expect(self, name: str) -> asyncio.Future[None]:
        """The future that Redis's confirmation of the subscription to `name` resolves."""
        confirmed = self._pending.get(name)
        if confirmed is None:
            confirmed = self._pending[name] = asyncio.get_running_loop().create_future()
        return confirmed

    async def _until_confirmed(self, name: str, confirmed: asyncio.Future[None]) -> None:
        """Wait for Redis to confirm the subscription to `name`, so that the caller's replay
        from the database starts only once nothing published from now on can be missed. A
        failure or a timeout is logged, not raised: the sweep covers the channel meanwhile."""
        try:
            async with asyncio.timeout(self.subscribe_timeout):
                await asyncio.shield(confirmed)
        except Exception as exc:
            log.warning("subscription to %s not confirmed: %s", name, exc)

    def _confirm(self, name: bytes) -> None:
        confirmed = self._pending.pop(name.decode(), None)
        if confirmed is not None and not confirmed.done():
            confirmed.set_result(None)

    def _fail_pending(self, exc: Exception, names: Iterable[str] | None = None) -> None:
        """Fail the unconfirmed subscriptions to `names` (every one by default): their listen()
        returns now rather than at its timeout, and the sweep covers them."""
        for name in list(self._pending) if names is None else names:
            future = self._pending.pop(name, None)
            if future is not None and not future.done():
                future.set_exception(exc)
                future.exception()  # retrieved here so an unawaited one logs nothing
