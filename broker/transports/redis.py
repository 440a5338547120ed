"""Redis pub/sub: the fast path. One subscriber connection per process carries every channel.

Redis pub/sub is at most once: a message published while the subscriber is disconnected is gone.
The stream covers that with gap fetches and the database sweep, woken by `on_gap` after every
reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from typing import Any

import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.retry import Retry

from broker import background, metrics
from broker.transports.base import GapHandler, MessageHandler, Transport, channel

log = logging.getLogger("broker.redis")

# Subscribed for the life of the connection, so that the connection exists and can be read
# even while no client follows any license.
CONTROL_CHANNEL = "license-broker:control"
PREFIX = b"license:"


class RedisTransport(Transport):
    name = "redis"

    def __init__(
        self, url: str, *, subscribe_timeout: float = 2.0, max_backoff: float = 5.0, publish_backoff: float = 1.0
    ) -> None:
        self.url = url
        self.publish_backoff = publish_backoff
        self._publish_down_until = 0.0
        self.subscribe_timeout = subscribe_timeout
        self.max_backoff = max_backoff
        self._client: aioredis.Redis | None = None
        self._pubsub: Any = None  # redis.asyncio.client.PubSub while connected
        self._channels: set[str] = set()
        self._pending: dict[str, asyncio.Future[None]] = {}
        self._task: asyncio.Task[None] | None = None
        self._on_message: MessageHandler | None = None
        self._on_gap: GapHandler | None = None

    def _new_client(self) -> aioredis.Redis:
        # No hidden retries: a failure surfaces at once and our own loop backs off and reconnects.
        return aioredis.Redis.from_url(
            self.url,
            socket_connect_timeout=2,
            socket_timeout=2,
            socket_keepalive=True,
            health_check_interval=10,
            retry=Retry(NoBackoff(), 0),
        )

    async def connect(self) -> None:
        if self._client is None:
            self._client = self._new_client()

    async def publish(self, license_id: str, payload: bytes) -> None:
        # After a failure, fail fast for a moment instead of making every webhook wait for the
        # connect timeout during an outage; the streams' database sweep delivers meanwhile.
        if time.monotonic() < self._publish_down_until:
            raise ConnectionError("redis unavailable (recent publish failed)")
        await self.connect()
        assert self._client is not None
        try:
            await self._client.publish(channel(license_id), payload)
        except Exception:
            self._publish_down_until = time.monotonic() + self.publish_backoff
            raise

    async def check(self) -> bool:
        await self.connect()
        assert self._client is not None
        try:
            return bool(await asyncio.wait_for(self._client.ping(), 2))
        except Exception:
            return False

    async def start(self, on_message: MessageHandler, on_gap: GapHandler) -> None:
        await self.connect()
        self._on_message, self._on_gap = on_message, on_gap
        ready = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._run(ready), name="redis-subscriber")
        # Wait for the first connection, but start anyway if Redis is down: the sweep serves.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(ready), self.subscribe_timeout)

    async def listen(self, license_id: str) -> None:
        name = channel(license_id)
        self._channels.add(name)
        pubsub = self._pubsub
        if pubsub is None:
            return  # disconnected: subscribed on reconnect, the sweep covers the meantime
        confirmed = self._pending.get(name)
        if confirmed is None:
            confirmed = self._pending[name] = asyncio.get_running_loop().create_future()
        try:
            await pubsub.subscribe(name)
            # Wait for Redis to confirm, so that the caller's replay from the database starts
            # only once nothing published from now on can be missed.
            await asyncio.wait_for(asyncio.shield(confirmed), self.subscribe_timeout)
        except Exception as exc:
            log.warning("subscribe to %s not confirmed: %s", name, exc)

    async def unlisten(self, license_id: str) -> None:
        name = channel(license_id)
        self._channels.discard(name)
        pubsub = self._pubsub
        if pubsub is not None:
            with contextlib.suppress(Exception):
                await pubsub.unsubscribe(name)

    async def _run(self, ready: asyncio.Future[None]) -> None:
        backoff = 0.05
        first = True
        while True:
            pubsub = self._new_client().pubsub()
            try:
                initial = set(self._channels)
                await pubsub.subscribe(CONTROL_CHANNEL, *initial)
                self._pubsub = pubsub
                self._publish_down_until = 0.0  # Redis answers again
                # Channels that clients added while we were subscribing; later ones subscribe themselves.
                if missing := self._channels - initial:
                    await pubsub.subscribe(*missing)
                metrics.TRANSPORT_UP.labels("redis").set(1)
                if not first:
                    log.info("redis subscriber reconnected (%d channels)", len(self._channels))
                    assert self._on_gap is not None
                    self._on_gap()  # whatever was published while we were away is in the database
                first = False
                if not ready.done():
                    ready.set_result(None)
                backoff = 0.05
                await self._read(pubsub)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._pubsub is not None or first:
                    log.warning("redis subscriber lost: %s", exc)
                first = False
                self._pubsub = None
                metrics.TRANSPORT_UP.labels("redis").set(0)
                self._fail_pending(exc)
                # Exponential backoff with full jitter, so that many processes do not reconnect in step.
                await asyncio.sleep(random.uniform(0, backoff))
                backoff = min(backoff * 2, self.max_backoff)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def _read(self, pubsub: Any) -> None:
        on_message = self._on_message
        assert on_message is not None
        while True:
            message = await pubsub.get_message(timeout=1.0)
            if message is None:
                continue
            kind = message["type"]
            name: bytes = message["channel"]
            if kind == "message":
                if name.startswith(PREFIX):
                    on_message(name[len(PREFIX) :].decode(), message["data"])
            elif kind == "subscribe":
                confirmed = self._pending.pop(name.decode(), None)
                if confirmed is not None and not confirmed.done():
                    confirmed.set_result(None)

    def _fail_pending(self, exc: Exception) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(exc)
                future.exception()  # retrieved here so an unawaited one logs nothing
        self._pending.clear()

    async def close(self) -> None:
        await background.stop(self._task)
        self._task = None
        self._pubsub = None
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        metrics.TRANSPORT_UP.labels("redis").set(0)
