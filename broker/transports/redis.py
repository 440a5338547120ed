"""Redis pub/sub: the fast path. One subscriber connection per process carries every channel.

Redis pub/sub is at most once: a message published while the subscriber is disconnected is gone.
The database sweep under this transport (SweptTransport) finds it, woken by `on_gap` after every
reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import redis.asyncio as aioredis

from broker import background
from broker.transports.base import channel
from broker.transports.subscriber import RedisSubscriber, check_alive, subscriber_options

log = logging.getLogger("broker.redis")

# Subscribed for the life of the connection, so that the connection exists and can be read
# even while no client follows any license.
CONTROL_CHANNEL = "license-broker:control"
# How long a batch of publishes may take, connecting included, as the socket timeout of the
# subscriber options bounds any other command.
PUBLISH_TIMEOUT = 2.0


class RedisTransport(RedisSubscriber):
    name = "redis"

    def __init__(
        self, url: str, *, subscribe_timeout: float = 2.0, max_backoff: float = 5.0, publish_backoff: float = 1.0
    ) -> None:
        super().__init__(subscribe_timeout=subscribe_timeout, max_backoff=max_backoff)
        self.url = url
        self.publish_backoff = publish_backoff
        self._publish_down_until = 0.0
        self._client: aioredis.Redis | None = None
        self._pubsub: Any = None  # redis.asyncio.client.PubSub while subscribed
        # Publishes waiting for the sender (channel, payload, the future its publisher awaits).
        self._queued: list[tuple[str, bytes, asyncio.Future[None]]] = []
        self._wake: asyncio.Event | None = None  # set when something is queued
        self._sender: asyncio.Task[None] | None = None
        self._publisher: Any = None  # the sender's own redis.asyncio Connection, made on first use

    def _new_client(self) -> aioredis.Redis:
        return aioredis.Redis.from_url(self.url, **subscriber_options())

    async def connect(self) -> None:
        if self._client is None:
            self._client = self._new_client()

    async def publish(self, license_id: str, payload: bytes) -> None:
        # After a failure, fail fast for a moment instead of making every webhook wait for the
        # connect timeout during an outage; the streams' database sweep delivers meanwhile.
        if time.monotonic() < self._publish_down_until:
            raise ConnectionError("redis unavailable (recent publish failed)")
        await self.connect()
        sent = asyncio.get_running_loop().create_future()
        self._queued.append((channel(license_id), payload, sent))
        if self._wake is None or self._sender is None or self._sender.done():
            self._wake = asyncio.Event()
            self._sender = asyncio.create_task(self._send_queued(self._wake), name="redis-publisher")
        self._wake.set()
        await sent

    async def _send_queued(self, wake: asyncio.Event) -> None:
        """The publishes of concurrent webhooks go out together: whatever queued while the last
        batch was on the wire is one pipeline, one write and one read for all of them instead of a
        round trip (two system calls and redis-py's per-command work) each. Each publisher still waits
        for its own publish and gets its failure; the stream needs no order (it orders by seq)."""
        batch: list[tuple[str, bytes, asyncio.Future[None]]] = []
        try:
            while True:
                await wake.wait()
                wake.clear()
                batch, self._queued = self._queued, []
                if batch:
                    await self._send(batch)
        finally:
            # Closed, maybe while a batch was on the wire: no publisher is left waiting.
            closed = ConnectionError("redis transport closed")
            for _, _, sent in [*batch, *self._queued]:
                if not sent.done():
                    sent.set_exception(closed)
            self._queued = []

    async def _send(self, batch: list[tuple[str, bytes, asyncio.Future[None]]]) -> None:
        try:
            if time.monotonic() < self._publish_down_until:  # queued behind a batch that failed
                raise ConnectionError("redis unavailable (recent publish failed)")
            # A connection of its own rather than the pool's: no pool lock, no retry wrapper, no
            # pipeline object per batch (redis-py's own pipeline costs as much as the round trip).
            # One deadline for the batch instead of redis-py's per-call socket timeout (on a send,
            # an asyncio.wait_for: a task per call).
            if self._publisher is None:
                assert self._client is not None
                pool = self._client.connection_pool
                self._publisher = pool.connection_class(**{**pool.connection_kwargs, "socket_timeout": None})
            conn = self._publisher
            commands = [("PUBLISH", name, payload) for name, payload, _ in batch]
            async with asyncio.timeout(PUBLISH_TIMEOUT):
                await conn.send_packed_command(conn.pack_commands(commands))
                for _ in batch:
                    await conn.read_response()
        except Exception as exc:
            if self._publisher is not None:  # replies may be left unread: start afresh
                with contextlib.suppress(Exception):
                    await self._publisher.disconnect()
            self._publish_down_until = time.monotonic() + self.publish_backoff
            for _, _, sent in batch:
                if not sent.done():  # not if its publisher was cancelled meanwhile
                    sent.set_exception(exc)
            return
        for _, _, sent in batch:
            if not sent.done():
                sent.set_result(None)

    async def _ping(self) -> object:
        assert self._client is not None
        return await self._client.ping()

    async def listen(self, license_id: str) -> None:
        name = channel(license_id)
        self._channels.add(name)
        pubsub = self._pubsub
        if pubsub is None:
            return  # disconnected: subscribed on reconnect, the sweep covers the meantime
        confirmed = self._expect(name)
        try:
            await pubsub.subscribe(name)
        except Exception as exc:
            log.warning("subscribe to %s failed: %s", name, exc)
            return
        await self._until_confirmed(name, confirmed)

    async def unlisten(self, license_id: str) -> None:
        name = channel(license_id)
        self._channels.discard(name)
        pubsub = self._pubsub
        if pubsub is not None:
            with contextlib.suppress(Exception):
                await pubsub.unsubscribe(name)

    async def _subscribe_all(self, *, first: bool) -> bool:
        pubsub = self._new_client().pubsub()
        try:
            initial = set(self._channels)
            await pubsub.subscribe(CONTROL_CHANNEL, *initial)
            self._pubsub = pubsub
            self._publish_down_until = 0.0  # Redis answers again
            # Channels that clients added while we were subscribing; later ones subscribe themselves.
            if missing := self._channels - initial:
                await pubsub.subscribe(*missing)
        except BaseException as exc:
            await self._lost(pubsub, exc)
            raise
        return True  # a reconnect: whatever was published meanwhile is gone

    async def _serve(self) -> None:
        pubsub = self._pubsub
        try:
            while True:
                message = await pubsub.get_message(timeout=1.0)
                if message is not None:
                    self._handled(message)
                else:
                    check_alive(pubsub)
        except BaseException as exc:
            await self._lost(pubsub, exc)
            raise

    async def _lost(self, pubsub: Any, exc: BaseException) -> None:
        self._pubsub = None
        self._fail_pending(exc if isinstance(exc, Exception) else ConnectionError("closed"))
        with contextlib.suppress(Exception):
            await pubsub.aclose()

    async def _disconnect(self) -> None:
        await background.stop(self._sender)
        self._sender = self._wake = None
        # A sender cancelled before its first turn ran none of its code, its `finally` included:
        # what it would have sent is failed here, so that no publisher waits for ever.
        queued, self._queued = self._queued, []
        for _, _, sent in queued:
            if not sent.done():
                sent.set_exception(ConnectionError("redis transport closed"))
        if self._publisher is not None:
            with contextlib.suppress(Exception):
                await self._publisher.disconnect()
            self._publisher = None
        self._pubsub = None
        if self._client is not None:
            await self._client.aclose()
            self._client = None
