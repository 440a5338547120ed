"""A Redis Cluster in memory, for RedisClusterTransport's own bookkeeping (test_transports.py):
which connections it opens and with what options, what it subscribes where, and what it does
when a master breaks, a slot moves or a command fails. The test changes the cluster's truth
(`owner`, `masters`, `unreachable`) and the transport sees it as it would see Redis: through a
slot map read at its refresh, MOVED answers, server-side unsubscribes and broken connections.

`install` puts the fakes in place of RedisCluster and redis.asyncio.Redis in the transport's
module, so the transport's own code runs whole, `_open` included."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError, ResponseError, SlotNotCoveredError

from broker.transports import redis_cluster


class FakeNode:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.name = f"{host}:{port}"


class FakePubSub:
    """A subscriber connection to one master: what was sent on it, and what it reads."""

    def __init__(self, cluster: FakeCluster, name: str) -> None:
        self.cluster, self.name = cluster, name
        self.inbox: asyncio.Queue[Any] = asyncio.Queue()
        self.commands: list[tuple[str, tuple[Any, ...]]] = []
        self.subscribed: set[str] = set()
        self.read_timeouts: list[float | None] = []
        self.held: list[str] = []  # confirmations held back while the cluster holds them
        self.fail_ssubscribe: Exception | None = None
        self.fail_sunsubscribe: Exception | None = None
        self.fail_close: Exception | None = None
        self.closed = False
        self.connection = None  # no health check (subscriber.check_alive reads it)

    async def connect(self) -> None:
        if self.name in self.cluster.unreachable:
            raise RedisConnectionError(f"Error connecting to {self.name}")

    async def ping(self) -> None:
        if self.name not in self.cluster.silent:
            self.inbox.put_nowait({"type": "pong", "pattern": None, "channel": b"", "data": b"PONG"})

    async def get_message(self, timeout: float | None = None) -> dict[str, Any] | None:  # noqa: ASYNC109 (redis-py's)
        self.read_timeouts.append(timeout)
        if not self.inbox.empty():
            item = self.inbox.get_nowait()
            if isinstance(item, Exception):
                raise item
            return item  # type: ignore[no-any-return]
        try:
            # An idle read returns at once rather than after `timeout`: the reader's idle path runs often.
            async with asyncio.timeout(None if timeout is None else min(timeout, 0.01)):
                item = await self.inbox.get()
        except TimeoutError:
            return None
        if isinstance(item, Exception):
            raise item
        return item  # type: ignore[no-any-return]

    async def ssubscribe(self, *names: str) -> None:
        self.commands.append(("ssubscribe", names))
        if self.fail_ssubscribe is not None:
            raise self.fail_ssubscribe
        for name in names:
            owner = self.cluster.owner_of(name)
            if owner != self.name:
                self.inbox.put_nowait(ResponseError(f"MOVED {key_slot(name.encode())} {owner}"))
                continue
            self.subscribed.add(name)
            if self.cluster.hold_confirmations:
                self.held.append(name)
            else:
                self.confirm(name)

    def confirm(self, name: str) -> None:
        self.inbox.put_nowait({"type": "ssubscribe", "pattern": None, "channel": name.encode(), "data": 1})

    def release(self) -> None:
        """Send the confirmations held back."""
        for name in self.held:
            self.confirm(name)
        self.held.clear()

    async def sunsubscribe(self, *names: str) -> None:
        self.commands.append(("sunsubscribe", names))
        if self.fail_sunsubscribe is not None:
            raise self.fail_sunsubscribe
        for name in names:
            self.server_sunsubscribe(name)

    def server_sunsubscribe(self, name: str) -> None:
        """The node ends the subscription (sent by Redis when the slot leaves the node)."""
        self.subscribed.discard(name)
        self.inbox.put_nowait({"type": "sunsubscribe", "pattern": None, "channel": name.encode(), "data": 0})

    def break_(self, error: Exception) -> None:
        """The connection breaks: the next read raises `error`."""
        self.inbox.put_nowait(error)

    def ssubscribed(self) -> list[str]:
        return [name for command, names in self.commands if command == "ssubscribe" for name in names]

    def sunsubscribed(self) -> list[str]:
        return [name for command, names in self.commands if command == "sunsubscribe" for name in names]

    async def aclose(self) -> None:
        self.closed = True
        if self.fail_close is not None:
            raise self.fail_close


class FakeConnection:
    """redis.asyncio.Redis to one master, as `_open` makes it."""

    def __init__(self, cluster: FakeCluster, **kwargs: Any) -> None:
        self.kwargs = kwargs
        self.name = f"{kwargs.get('host')}:{kwargs.get('port')}"
        self._pubsub = FakePubSub(cluster, self.name)
        self.closed = False
        self.fail_close: Exception | None = cluster.fail_connection_close

    def pubsub(self) -> FakePubSub:
        return self._pubsub

    async def aclose(self) -> None:
        self.closed = True
        if self.fail_close is not None:
            raise self.fail_close


class FakeClusterClient:
    """RedisCluster: a slot map read at `initialize` (the first time) and at the nodes manager's
    `initialize` (a refresh), SPUBLISH delivered to the subscribers of the channel's owner."""

    PRIMARIES = "primaries"

    def __init__(self, cluster: FakeCluster, **kwargs: Any) -> None:
        self.cluster, self.kwargs = cluster, kwargs
        self.nodes_manager = SimpleNamespace(slots_cache={}, initialize=self._refresh)
        self.masters: list[FakeNode] = []
        self.map: dict[str, str] = {}
        self.home = ""
        self.initialized = False
        self.closed = False

    def _load(self) -> None:
        self.masters = list(self.cluster.masters)
        self.map, self.home = dict(self.cluster.owner), self.cluster.home
        self.nodes_manager.slots_cache = {0: [self.masters[0]]}

    async def initialize(self) -> None:
        self.cluster.syncs += 1
        self._load_once()

    def _load_once(self) -> None:
        if not self.initialized:
            self._load()
            self.initialized = True

    async def _refresh(self) -> None:
        if self.cluster.refresh_gate is not None:
            await self.cluster.refresh_gate.wait()
        if self.cluster.fail_refresh is not None:
            raise self.cluster.fail_refresh
        self.cluster.refreshes += 1
        self._load()

    def get_primaries(self) -> list[FakeNode]:
        return list(self.masters)

    def get_node_from_key(self, key: str) -> FakeNode:
        if not isinstance(key, str):
            raise DataError(f"Invalid input of type: {type(key).__name__!r}")
        if not self.nodes_manager.slots_cache or key in self.cluster.uncovered:
            raise SlotNotCoveredError(f'Slot "{key_slot(key.encode())}" is not covered by the cluster.')
        name = self.map.get(key, self.home)
        return next(node for node in self.masters if node.name == name)

    async def spublish(self, name: str, payload: bytes) -> int:
        """Sent to the owner in this client's slot map, which may be out of date: redis-py reads
        it again after a connection error at most once a second."""
        self._load_once()
        target = self.map.get(name, self.home)
        self.cluster.attempts.append(target)
        if target in self.cluster.unreachable:
            raise RedisConnectionError(f"Error 111 connecting to {target}. Connection refused.")
        self.cluster.published.append((name, payload))
        return self.cluster.deliver(name, payload)

    async def ping(self, target_nodes: Any = None) -> bool:
        self.cluster.pings.append(target_nodes)
        if self.cluster.silent & {master.name for master in self.cluster.masters}:
            await asyncio.Event().wait()  # a master that takes the PING and never answers
        return True

    async def aclose(self) -> None:
        self.closed = True
        if self.cluster.fail_client_close is not None:
            raise self.cluster.fail_client_close


class FakeCluster:
    """The truth: the masters (10.0.0.1:7001, 10.0.0.2:7002, ...), which master owns each
    channel (`home`, the first, unless `owner` names another), which cannot be reached."""

    def __init__(self, masters: int = 2) -> None:
        self.masters = [self.node(n) for n in range(1, masters + 1)]
        self.home = self.masters[0].name
        self.owner: dict[str, str] = {}
        self.unreachable: set[str] = set()
        self.silent: set[str] = set()  # connect, but never answer PING
        self.uncovered: set[str] = set()  # channels whose slot no master serves
        self.hold_confirmations = False
        self.refresh_gate: asyncio.Event | None = None  # a refresh of the slot map waits for it
        self.fail_refresh: Exception | None = None  # a refresh of the slot map raises it
        self.fail_connection_close: Exception | None = None
        self.fail_client_close: Exception | None = None
        self.clients: list[FakeClusterClient] = []
        self.connections: list[FakeConnection] = []
        self.published: list[tuple[str, bytes]] = []
        self.attempts: list[str] = []  # the master each SPUBLISH was sent to, delivered or not
        self.pings: list[Any] = []
        self.syncs = 0  # RedisCluster.initialize: once at every resync
        self.refreshes = 0  # the slot map read again

    @staticmethod
    def node(n: int) -> FakeNode:
        return FakeNode(f"10.0.0.{n}", 7000 + n)

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"{node.host}:{node.port}" for node in self.masters)

    def name(self, n: int) -> str:
        return self.node(n).name

    def owner_of(self, channel: str) -> str:
        return self.owner.get(channel, self.home)

    def pubsubs(self, name: str) -> list[FakePubSub]:
        """Every subscriber connection made to the master `name`, oldest first."""
        return [c.pubsub() for c in self.connections if c.name == name]

    def pubsub(self, name: str) -> FakePubSub:
        """The newest subscriber connection to the master `name`."""
        return self.pubsubs(name)[-1]

    def deliver(self, name: str, payload: bytes) -> int:
        message = {"type": "smessage", "pattern": None, "channel": name.encode(), "data": payload}
        receivers = [p for p in self.pubsubs(self.owner_of(name)) if not p.closed and name in p.subscribed]
        for pubsub in receivers:
            pubsub.inbox.put_nowait(message)
        return len(receivers)

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        cluster = self

        def client(**kwargs: Any) -> FakeClusterClient:
            made = FakeClusterClient(cluster, **kwargs)
            cluster.clients.append(made)
            return made

        def connection(**kwargs: Any) -> FakeConnection:
            made = FakeConnection(cluster, **kwargs)
            cluster.connections.append(made)
            return made

        client.PRIMARIES = FakeClusterClient.PRIMARIES  # type: ignore[attr-defined]
        monkeypatch.setattr(redis_cluster, "RedisCluster", client)
        monkeypatch.setattr(redis_cluster, "aioredis", SimpleNamespace(Redis=connection))
