"""Redis Cluster with sharded pub/sub (Redis 7): SPUBLISH and SSUBSCRIBE.

A channel belongs to the hash slot of its name, like a key, and SPUBLISH travels only within the
shard (master and replicas) that owns the slot; plain PUBLISH in a cluster is broadcast over the
cluster bus to every node, so its cost grows with the cluster instead of shrinking.

Connections: one RedisCluster client (slot map, SPUBLISH) and one subscriber connection per master
node, however many clients and licenses a process follows, each read by its own task.

Why not redis-py's asyncio ClusterPubSub: its get_sharded_message() reads its per-node connections
in turn, waiting up to the timeout on each, so an idle node delays the messages of the others; and
it learns of a failover only when another command of the same client meets a MOVED.

Delivery is at most once, as with RedisTransport: a message published while the owning master is
down, or while a slot moves, is lost. After every such event this transport refreshes the slot
map, resubscribes each channel on its current owner, waits for the confirmations, and only then
calls `on_gap`, so the database sweep that follows finds everything committed in the meantime.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import defaultdict
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.crc import key_slot
from redis.exceptions import ResponseError

from broker import background, metrics
from broker.settings import parse_cluster_url
from broker.transports.base import GapHandler, MessageHandler, Transport, channel

log = logging.getLogger("broker.redis_cluster")

PREFIX = b"license:"
METRIC = "redis-cluster"


class _Shard:
    """The subscriber connection to one master and the channels subscribed on it."""

    def __init__(self, node: ClusterNode, client: aioredis.Redis) -> None:
        self.name: str = node.name
        self.client = client
        self.pubsub: Any = client.pubsub()  # redis.asyncio.client.PubSub
        self.channels: set[str] = set()
        self.task: asyncio.Task[None] | None = None
        self.failed = False

    async def close(self) -> None:
        await background.stop(self.task)
        self.task = None
        with contextlib.suppress(Exception):
            await self.pubsub.aclose()
        with contextlib.suppress(Exception):
            await self.client.aclose()


class RedisClusterTransport(Transport):
    name = "redis-cluster"

    def __init__(
        self,
        url: str,
        *,
        subscribe_timeout: float = 2.0,
        max_backoff: float = 5.0,
        refresh_interval: float = 30.0,
    ) -> None:
        self.address = parse_cluster_url(url)
        self.subscribe_timeout = subscribe_timeout
        self.max_backoff = max_backoff
        # Failovers and slot moves are noticed at once (a broken connection, a server-side
        # sunsubscribe, a MOVED); the periodic refresh is for what is noticed by nothing.
        self.refresh_interval = refresh_interval
        self._client: RedisCluster | None = None
        self._shards: dict[str, _Shard] = {}
        self._channels: set[str] = set()  # wanted: followed by the hub
        self._owner: dict[str, str] = {}  # channel -> name of the shard it is subscribed on
        self._pending: dict[str, asyncio.Future[None]] = {}
        # Serialises changes to _shards/_owner between listen/unlisten and the resync.
        self._lock = asyncio.Lock()
        self._resync = asyncio.Event()
        self._lost = False  # messages may have been missed since the last successful resync
        self._task: asyncio.Task[None] | None = None
        self._on_message: MessageHandler | None = None
        self._on_gap: GapHandler | None = None

    def _connection_kwargs(self) -> dict[str, Any]:
        return {
            "username": self.address.username,
            "password": self.address.password,
            "ssl": self.address.ssl,
            "socket_connect_timeout": 2,
            "socket_timeout": 2,
            "socket_keepalive": True,
        }

    async def connect(self) -> None:
        if self._client is None:
            self._client = RedisCluster(
                startup_nodes=[ClusterNode(host, port) for host, port in self.address.nodes],
                # A publish during a failover fails within about a second and is logged by the
                # webhook; the stream's sweep delivers the event. Longer retries only delay the 200.
                retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), 2),
                **self._connection_kwargs(),
            )

    async def publish(self, license_id: str, payload: bytes) -> None:
        await self.connect()
        assert self._client is not None
        await self._client.spublish(channel(license_id), payload)

    async def check(self) -> bool:
        await self.connect()
        assert self._client is not None
        try:
            await asyncio.wait_for(self._client.ping(target_nodes=RedisCluster.PRIMARIES), 2)
            return True
        except Exception:
            return False

    async def start(self, on_message: MessageHandler, on_gap: GapHandler) -> None:
        await self.connect()
        self._on_message, self._on_gap = on_message, on_gap
        ready = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._run(ready), name="redis-cluster-subscriber")
        # Wait for the first connections, but start anyway if the cluster is down: the sweep serves.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(ready), self.subscribe_timeout + 2)

    async def listen(self, license_id: str) -> None:
        name = channel(license_id)
        self._channels.add(name)
        async with self._lock:
            shard = self._shard_for(name)
            if shard is None:
                # No healthy connection to the owner yet: the resync subscribes it, the sweep
                # covers the meantime.
                self._resync.set()
                return
            confirmed = self._pending.get(name)
            if confirmed is None:
                confirmed = self._pending[name] = asyncio.get_running_loop().create_future()
            shard.channels.add(name)
            self._owner[name] = shard.name
            try:
                await shard.pubsub.ssubscribe(name)
            except Exception as exc:
                log.warning("ssubscribe %s on %s failed: %s", name, shard.name, exc)
                self._shard_failed(shard)
                return
        try:
            # Confirmed before the caller replays from the database, so that nothing published
            # from now on can be missed (a MOVED answer is retried on the right node by the resync).
            await asyncio.wait_for(asyncio.shield(confirmed), self.subscribe_timeout)
        except Exception as exc:
            log.warning("ssubscribe to %s not confirmed: %s", name, exc)

    async def unlisten(self, license_id: str) -> None:
        name = channel(license_id)
        self._channels.discard(name)
        # The hub never calls listen and unlisten of one license at once: nobody awaits this.
        if (confirmed := self._pending.pop(name, None)) is not None:
            confirmed.cancel()
        async with self._lock:
            shard = self._shards.get(self._owner.pop(name, ""))
            if shard is not None:
                shard.channels.discard(name)
                with contextlib.suppress(Exception):
                    await shard.pubsub.sunsubscribe(name)

    def _shard_for(self, name: str) -> _Shard | None:
        if self._client is None or not self._client.nodes_manager.slots_cache:
            return None
        try:
            node = self._client.get_node_from_key(name)
        except Exception:
            return None
        shard = self._shards.get(node.name) if node is not None else None
        return None if shard is None or shard.failed else shard

    def _shard_failed(self, shard: _Shard) -> None:
        shard.failed = True
        self._lost = True
        self._resync.set()

    # --- the resync loop -------------------------------------------------------------------------

    async def _run(self, ready: asyncio.Future[None]) -> None:
        backoff = 0.05
        first = True
        while True:
            try:
                lost = await self._sync(refresh=not first)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if first or not self._lost:
                    log.warning("redis cluster subscriber: %s", exc)
                first = False
                self._lost = True
                metrics.TRANSPORT_UP.labels(METRIC).set(0)
                # Exponential backoff with full jitter, so that many processes do not retry in step.
                await asyncio.sleep(random.uniform(0, backoff))
                backoff = min(backoff * 2, self.max_backoff)
                continue
            metrics.TRANSPORT_UP.labels(METRIC).set(1)
            if lost and not first:
                log.info("redis cluster subscriber resynced (%d channels)", len(self._channels))
                assert self._on_gap is not None
                self._on_gap()  # whatever was published while we were away is in the database
            first = False
            backoff = 0.05
            if not ready.done():
                ready.set_result(None)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._resync.wait(), self.refresh_interval)
            self._resync.clear()

    async def _sync(self, *, refresh: bool) -> bool:
        """Align the shard connections with the masters and every wanted channel with its
        owner. Returns whether messages may have been lost since the last successful sync;
        raises (after doing what it could) if some master or channel is not served yet."""
        client = self._client
        assert client is not None
        await client.initialize()  # the first time only: slot map and command table
        if refresh:
            await client.nodes_manager.initialize()
        masters = {node.name: node for node in client.get_primaries()}
        problems: list[str] = []
        confirmations: list[asyncio.Future[None]] = []
        async with self._lock:
            lost, self._lost = self._lost, False
            dropped = [shard for name, shard in self._shards.items() if shard.failed or name not in masters]
            for shard in dropped:
                del self._shards[shard.name]
                lost = lost or bool(shard.channels)
                for ch in shard.channels:
                    if self._owner.get(ch) == shard.name:
                        del self._owner[ch]
        for shard in dropped:
            await shard.close()
        # Opened outside the lock (only this task adds shards): an unreachable master must not
        # hold up listen() on the healthy ones for its connect timeout.
        missing = [node for name, node in masters.items() if name not in self._shards]
        opened = await asyncio.gather(*(self._open(node) for node in missing), return_exceptions=True)
        async with self._lock:
            for node, result in zip(missing, opened, strict=True):
                if isinstance(result, _Shard):
                    self._shards[node.name] = result
                else:
                    problems.append(f"{node.name}: {result}")
            moves: dict[_Shard, dict[int, list[str]]] = defaultdict(lambda: defaultdict(list))
            # A copy: listen() adds to the set before it waits for the lock.
            for ch in list(self._channels):
                try:
                    owner = client.get_node_from_key(ch)
                except Exception as exc:
                    problems.append(f"{ch}: {exc}")
                    continue
                assert owner is not None
                current = self._owner.get(ch)
                if current == owner.name:
                    continue
                target = self._shards.get(owner.name)
                if target is None:
                    continue  # its master is unreachable: already in problems
                if current is not None and (old := self._shards.get(current)) is not None:
                    old.channels.discard(ch)
                    with contextlib.suppress(Exception):
                        await old.pubsub.sunsubscribe(ch)
                lost = True
                moves[target][key_slot(ch.encode())].append(ch)
            for shard, by_slot in moves.items():
                # SSUBSCRIBE takes several channels only when they share a slot (else CROSSSLOT).
                for names in by_slot.values():
                    for ch in names:
                        future = self._pending.get(ch)
                        if future is None:
                            future = self._pending[ch] = asyncio.get_running_loop().create_future()
                        confirmations.append(future)
                        shard.channels.add(ch)
                        self._owner[ch] = shard.name
                    try:
                        await shard.pubsub.ssubscribe(*names)
                    except Exception as exc:
                        problems.append(f"{shard.name}: {exc}")
                        self._shard_failed(shard)
                        break
        if confirmations:
            # Subscribed on the server before on_gap wakes the sweep, so that the sweep and the
            # live messages overlap rather than leave a window between them.
            await asyncio.wait(confirmations, timeout=self.subscribe_timeout)
        if problems:
            self._lost = True
            raise ConnectionError("; ".join(problems[:3]) + (" ..." if len(problems) > 3 else ""))
        return lost

    async def _open(self, node: ClusterNode) -> _Shard:
        shard = _Shard(
            node,
            aioredis.Redis(
                host=node.host,
                port=int(node.port),
                health_check_interval=10,
                # No hidden retries: a broken connection ends the shard and the resync replaces it.
                retry=Retry(NoBackoff(), 0),
                **self._connection_kwargs(),
            ),
        )
        try:
            await shard.pubsub.connect()
            await shard.pubsub.ping()
            reply = await shard.pubsub.get_message(timeout=self.subscribe_timeout)
            if reply is None:
                raise ConnectionError("no answer to PING")
        except BaseException:
            await shard.close()
            raise
        shard.task = asyncio.create_task(self._read(shard), name=f"redis-cluster-shard-{shard.name}")
        return shard

    async def _read(self, shard: _Shard) -> None:
        on_message = self._on_message
        assert on_message is not None
        try:
            while True:
                try:
                    message = await shard.pubsub.get_message(timeout=1.0)
                except ResponseError as exc:
                    # MOVED: an SSUBSCRIBE reached a node that no longer owns the slot. The
                    # connection is fine; the resync subscribes the channel on the owner.
                    log.info("shard %s: %s", shard.name, exc)
                    self._lost = True
                    self._resync.set()
                    continue
                if message is None:
                    continue
                kind = message["type"]
                if kind == "smessage":
                    name: bytes = message["channel"]
                    if name.startswith(PREFIX):
                        on_message(name[len(PREFIX) :].decode(), message["data"])
                elif kind == "ssubscribe":
                    confirmed = self._pending.pop(message["channel"].decode(), None)
                    if confirmed is not None and not confirmed.done():
                        confirmed.set_result(None)
                elif kind == "sunsubscribe":
                    ch = message["channel"].decode()
                    if ch in self._channels and self._owner.get(ch) == shard.name:
                        # Sent by the server when this node stops serving the slot (a failover
                        # made it a replica, or the slot migrated): subscribe again elsewhere.
                        del self._owner[ch]
                        shard.channels.discard(ch)
                        self._lost = True
                        self._resync.set()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("redis cluster shard %s lost: %s", shard.name, exc)
            self._fail_pending(shard, exc)
            self._shard_failed(shard)

    def _fail_pending(self, shard: _Shard, exc: Exception) -> None:
        for ch in shard.channels:
            future = self._pending.pop(ch, None)
            if future is not None and not future.done():
                future.set_exception(exc)
                future.exception()  # retrieved here so an unawaited one logs nothing

    async def close(self) -> None:
        await background.stop(self._task)
        self._task = None
        for shard in list(self._shards.values()):
            await shard.close()
        self._shards.clear()
        self._owner.clear()
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.aclose()
            self._client = None
        metrics.TRANSPORT_UP.labels(METRIC).set(0)
