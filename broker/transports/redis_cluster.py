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
A publish that fails reads the slot map again and, if the channel has a new owner (the failover
is over), sends the message there once: streams resubscribe only after the failover, so without
it an event committed just after would wait for their periodic sweep.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.crc import key_slot
from redis.exceptions import RedisClusterException, RedisError, ResponseError

from broker import background
from broker.settings import parse_cluster_url
from broker.transports.base import channel
from broker.transports.subscriber import RedisSubscriber, check_alive, subscriber_options

log = logging.getLogger("broker.redis_cluster")


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


class RedisClusterTransport(RedisSubscriber):
    name = "redis-cluster"

    def __init__(
        self,
        url: str,
        *,
        subscribe_timeout: float = 2.0,
        max_backoff: float = 5.0,
        refresh_interval: float = 30.0,
    ) -> None:
        super().__init__(subscribe_timeout=subscribe_timeout, max_backoff=max_backoff)
        self.address = parse_cluster_url(url)
        # Failovers and slot moves are noticed at once (a broken connection, a server-side
        # sunsubscribe, a MOVED); the periodic refresh is for what is noticed by nothing.
        self.refresh_interval = refresh_interval
        self._client: RedisCluster | None = None
        self._shards: dict[str, _Shard] = {}
        self._owner: dict[str, str] = {}  # channel -> name of the shard it is subscribed on
        # Serialises changes to _shards/_owner between listen/unlisten and the resync.
        self._lock = asyncio.Lock()
        self._resync = asyncio.Event()
        self._refreshing = asyncio.Lock()  # one slot-map refresh at a time after failed publishes
        self._lost = False  # messages may have been missed since the last successful resync

    def _auth(self) -> dict[str, Any]:
        return {"username": self.address.username, "password": self.address.password, "ssl": self.address.ssl}

    async def connect(self) -> None:
        if self._client is None:
            self._client = RedisCluster(
                startup_nodes=[ClusterNode(host, port) for host, port in self.address.nodes],
                # A publish during a failover fails within about a second and is logged by the
                # webhook; the stream's sweep delivers the event. Longer retries only delay the 200.
                retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), 2),
                socket_connect_timeout=2,
                socket_timeout=2,
                socket_keepalive=True,
                **self._auth(),
            )

    async def publish(self, license_id: str, payload: bytes) -> None:
        await self.connect()
        client = self._client
        assert client is not None
        name = channel(license_id)
        try:
            await client.spublish(name, payload)
        except (RedisError, RedisClusterException):
            # redis-py refreshes its slot map after a connection error at most once a second: for
            # up to that long after a failover it keeps publishing to the dead master, and the
            # streams, already subscribed on the new one, would have these events only from a
            # periodic sweep. So the map is read again now, and if the channel has a new owner
            # the message goes there once. Still the old owner (the failover is not over): the
            # streams resubscribe after it, and the sweep their resubscription wakes finds this
            # committed event.
            if not await self._owner_changed(name):
                raise
            await client.spublish(name, payload)

    async def _owner_changed(self, name: str) -> bool:
        """Whether the slot map, read again unless another publish has just done so, names
        another owner of `name` than the one a publish has just failed on."""
        client = self._client
        assert client is not None
        failed = self._owner_in_map(name)
        async with self._refreshing:
            if self._owner_in_map(name) == failed:
                with contextlib.suppress(RedisError, RedisClusterException):
                    await client.nodes_manager.initialize()
        owner = self._owner_in_map(name)
        return owner is not None and owner != failed

    async def _ping(self) -> object:
        assert self._client is not None
        await self._client.ping(target_nodes=RedisCluster.PRIMARIES)
        return True

    @property
    def _start_timeout(self) -> float:
        return self.subscribe_timeout + 2  # the slot map first, then a connection per master

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
            confirmed = self._expect(name)
            shard.channels.add(name)
            self._owner[name] = shard.name
            try:
                await shard.pubsub.ssubscribe(name)
            except Exception as exc:
                log.warning("ssubscribe %s on %s failed: %s", name, shard.name, exc)
                self._shard_failed(shard)
                return
        # A MOVED answer (the slot moved meanwhile) is retried on the right node by the resync.
        await self._until_confirmed(name, confirmed)

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

    def _owner_in_map(self, name: str) -> str | None:
        """The master the client's slot map names for `name` (None: no client or map yet, or no
        owner)."""
        client = self._client
        if client is None or not client.nodes_manager.slots_cache:
            return None
        try:
            node = client.get_node_from_key(name)
        except Exception:
            return None
        return None if node is None else node.name

    def _shard_for(self, name: str) -> _Shard | None:
        owner = self._owner_in_map(name)
        shard = self._shards.get(owner) if owner is not None else None
        return None if shard is None or shard.failed else shard

    def _shard_failed(self, shard: _Shard) -> None:
        shard.failed = True
        self._lost = True
        self._resync.set()
        # The resync closes its connection: no confirmation will come on it, so nothing waits for one.
        self._fail_pending(ConnectionError(f"shard {shard.name} failed"), shard.channels)

    # --- the resync loop (RedisSubscriber._run) ----------------------------------------------------

    async def _subscribe_all(self, *, first: bool) -> bool:
        try:
            return await self._sync(refresh=not first)
        except Exception:
            self._lost = True  # whatever failed, the next success reports a gap
            raise

    async def _serve(self) -> None:
        # The shards' tasks read; this waits for one of them, a MOVED or a periodic refresh to ask
        # for a resync.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.refresh_interval):
                await self._resync.wait()
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
                        confirmations.append(self._expect(ch))
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
            raise ConnectionError("; ".join(problems[:3]) + (" ..." if len(problems) > 3 else ""))
        return lost

    async def _open(self, node: ClusterNode) -> _Shard:
        shard = _Shard(
            node,
            aioredis.Redis(
                host=node.host,
                port=int(node.port),
                # A broken connection ends the shard and the resync replaces it.
                **subscriber_options(),
                **self._auth(),
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
                    check_alive(shard.pubsub)
                    continue
                if self._handled(message):
                    continue
                if message["type"] == "sunsubscribe":
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
            self._fail_pending(exc, shard.channels)
            self._shard_failed(shard)

    async def _disconnect(self) -> None:
        for shard in list(self._shards.values()):
            await shard.close()
        self._shards.clear()
        self._owner.clear()
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.aclose()
            self._client = None
