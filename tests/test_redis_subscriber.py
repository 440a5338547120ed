"""The Redis subscriber loop against fakeredis, with the connection cut at exact points: reconnect,
backoff and resubscribe, deterministic and in milliseconds. The same paths against a real
redis-server that is stopped and started are in test_transports.py and test_faults.py."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Iterable
from types import SimpleNamespace
from typing import Any

import fakeredis
import orjson
import pytest
import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from broker import metrics
from broker.transports import subscriber
from broker.transports.base import channel
from broker.transports.redis import CONTROL_CHANNEL, RedisTransport
from broker.wire import notice
from tests.support.transports import Received
from tests.support.waiting import async_wait_until


class Line:
    """The network between the transport and a fakeredis server. The test cuts and restores it,
    pauses the replies on their way back, and holds SUBSCRIBEs on their way out."""

    def __init__(self) -> None:
        self.server = fakeredis.FakeServer()
        self.down = asyncio.Event()  # set while cut: every read in progress fails at once
        self.replies = asyncio.Event()  # cleared to pause the replies
        self.replies.set()
        self.hold: asyncio.Event | None = None  # a SUBSCRIBE waits for it to be set
        self.held = asyncio.Event()  # a SUBSCRIBE is waiting for `hold`
        self.subscribes_sent = 0
        # Set: closing an open connection times out, as redis-py's does when the peer stopped
        # reading (its `wait_closed` overruns socket_connect_timeout). The connection is closed
        # all the same, as redis-py's is: only its first close raises.
        self.stalled_closes = False
        self.closes_stalled = 0

    def cut(self) -> None:
        self.server.connected = False
        self.down.set()

    def restore(self) -> None:
        self.server.connected = True
        self.down = asyncio.Event()
        self.replies.set()

    def connection_class(self) -> type[fakeredis.FakeAsyncRedisConnection]:
        line = self

        class Connection(fakeredis.FakeAsyncRedisConnection):  # type: ignore[misc]
            async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
                parts = command if isinstance(command, list) else [command]
                subscribe = any(b"SUBSCRIBE" in bytes(part) for part in parts)
                if subscribe and line.hold is not None:
                    line.held.set()
                    await line.hold.wait()
                if line.down.is_set():
                    raise RedisConnectionError("connection cut")
                await super().send_packed_command(command, check_health)
                line.subscribes_sent += subscribe

            async def disconnect(self, nowait: bool = False, **kwargs: Any) -> None:
                was_open = self.is_connected
                await super().disconnect(nowait, **kwargs)
                if was_open and line.stalled_closes:
                    line.closes_stalled += 1
                    raise RedisTimeoutError("Timed out closing connection after 2")

            async def read_response(self, **kwargs: Any) -> Any:
                down = line.down
                if down.is_set():
                    raise RedisConnectionError("connection cut")

                async def read() -> Any:
                    reply = await super(Connection, self).read_response(**kwargs)
                    await line.replies.wait()  # held while paused, lost if cut meanwhile
                    return reply

                reading, cut = asyncio.ensure_future(read()), asyncio.ensure_future(down.wait())
                await asyncio.wait({reading, cut}, return_when=asyncio.FIRST_COMPLETED)
                cut.cancel()
                if reading.done():
                    return reading.result()
                reading.cancel()
                await asyncio.gather(reading, return_exceptions=True)
                raise RedisConnectionError("connection cut")

        return Connection


class FakeRedisTransport(RedisTransport):
    """RedisTransport, its connections over `line` to a fakeredis server."""

    def __init__(self, line: Line, **options: Any) -> None:
        super().__init__("redis://fake", **options)
        self.line = line

    def _new_client(self) -> aioredis.Redis:
        # Without the health check's PING, whose reply fakeredis does not shape as Redis does.
        options = {**subscriber.subscriber_options(), "health_check_interval": 0}
        # A new fakeredis client sets its server's `connected`: to the line's state, not to True.
        options["connected"] = not self.line.down.is_set()
        options["connection_class"] = self.line.connection_class()
        return fakeredis.FakeAsyncRedis(server=self.line.server, **options)


class Backoffs(list[float]):
    """The upper bound of each backoff drawn; `floors`, their lower bounds."""

    def __init__(self) -> None:
        super().__init__()
        self.floors: list[float] = []


@pytest.fixture
def backoffs(monkeypatch: pytest.MonkeyPatch) -> Backoffs:
    """The upper bound of each backoff the loop draws; it then waits no time at all."""
    drawn = Backoffs()

    def uniform(low: float, high: float) -> float:
        drawn.append(high)
        drawn.floors.append(low)
        return 0.0

    monkeypatch.setattr(subscriber.random, "uniform", uniform)
    return drawn


@pytest.fixture
async def line() -> AsyncIterator[Line]:
    yield Line()


@pytest.fixture
async def started(line: Line, backoffs: Backoffs) -> AsyncIterator[tuple[FakeRedisTransport, Received]]:
    # A subscribe_timeout longer than any test: a listen() that returns did not time out.
    transport = FakeRedisTransport(line, subscribe_timeout=60, max_backoff=0.4)
    received = Received()
    await transport.start(received.on_message, received.on_gap)
    try:
        yield transport, received
    finally:
        await transport.close()


async def publish(line: Line, license_id: str, seq: int) -> None:
    client = fakeredis.FakeAsyncRedis(server=line.server)
    await client.publish(channel(license_id), orjson.dumps({"license_id": license_id, "seq": seq}))
    await client.aclose()


async def publish_and_receive(line: Line, received: Received, license_id: str, seq: int) -> None:
    """Publish one event of the license and see it delivered (subscribed, by whoever did)."""
    await publish(line, license_id, seq)
    event = await received.next()
    assert (event.license_id, event.seq) == (license_id, seq)


def subscribed(line: Line) -> set[str]:
    names: Iterable[bytes] = fakeredis.FakeRedis(server=line.server).pubsub_channels()
    return {name.decode() for name in names}


def up() -> float:
    return float(metrics.TRANSPORT_UP.labels("redis")._value.get())


async def test_a_cut_while_reading_reconnects_resubscribes_every_channel_and_reports_one_gap(
    line: Line, started: tuple[FakeRedisTransport, Received]
) -> None:
    transport, received = started
    licenses = ["lic_a", "lic_b"]
    for license_id in licenses:
        await transport.listen(license_id)
    await publish_and_receive(line, received, "lic_a", 1)
    line.cut()
    await async_wait_until(lambda: up() == 0, 5, "the subscriber to notice the cut")
    line.restore()
    await async_wait_until(lambda: received.gaps == 1, 5, "the reconnect")
    assert subscribed(line) == {CONTROL_CHANNEL, *(channel(i) for i in licenses)}
    for n, license_id in enumerate(licenses, start=2):
        await publish(line, license_id, n)  # no new listen(): resubscribed by the reconnect
        event = await received.next()
        assert (event.license_id, event.seq) == (license_id, n)
    assert received.gaps == 1 and up() == 1


async def test_the_backoff_doubles_up_to_its_cap_while_the_server_is_away_and_starts_over_after(
    line: Line, started: tuple[FakeRedisTransport, Received], backoffs: Backoffs, caplog: pytest.LogCaptureFixture
) -> None:
    _, received = started
    caplog.set_level(logging.INFO, logger="broker.redis")
    line.cut()
    await async_wait_until(lambda: len(backoffs) >= 6, 5, "six failed reconnects")
    line.restore()
    await async_wait_until(lambda: received.gaps == 1, 5, "the reconnect")
    assert backoffs[:6] == [0.05, 0.1, 0.2, 0.4, 0.4, 0.4]
    assert set(backoffs.floors) == {0}  # full jitter: anywhere from no wait at all to the bound
    drawn = len(backoffs)
    line.cut()
    await async_wait_until(lambda: len(backoffs) > drawn, 5, "a failed reconnect")
    assert backoffs[drawn] == 0.05  # a success resets the backoff
    line.restore()
    await async_wait_until(lambda: received.gaps == 2, 5, "the second reconnect")
    # Each outage logged once, when it starts (not at each of its retries), with its error; each reconnect too.
    logged = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "broker.redis"]
    assert [level for level, _ in logged] == ["WARNING", "INFO", "WARNING", "INFO"]
    assert all(re.fullmatch(r"redis subscriber lost: (?!None$).+", message) for _, message in logged[::2])
    assert [message for _, message in logged[1::2]] == ["redis subscriber reconnected (0 channels)"] * 2


async def test_a_cut_between_subscribe_and_its_confirmation_fails_the_waiting_listen_at_once(
    line: Line, started: tuple[FakeRedisTransport, Received], caplog: pytest.LogCaptureFixture
) -> None:
    transport, received = started
    caplog.set_level(logging.WARNING, logger="broker.redis")
    sent = line.subscribes_sent
    line.replies.clear()
    listening = asyncio.create_task(transport.listen("lic_a"))
    await async_wait_until(lambda: line.subscribes_sent > sent, 5, "the SUBSCRIBE to be sent")
    line.cut()  # its confirmation never comes back
    # Returned on the cut, not after its 60 s subscribe_timeout: the caller replays, the sweep covers.
    await asyncio.wait_for(listening, 5)
    logged = [r.getMessage() for r in caplog.records if r.name == "broker.redis"]
    unconfirmed = [m for m in logged if m.startswith("subscription to")]
    assert len(unconfirmed) == 1
    # The cut's own error, not "closed" (what a close says).
    assert re.fullmatch(rf"subscription to {channel('lic_a')} not confirmed: (?!None$|closed$).+", unconfirmed[0])
    line.restore()
    await async_wait_until(lambda: received.gaps == 1, 5, "the reconnect")
    await publish_and_receive(line, received, "lic_a", 1)  # subscribed by the reconnect


async def test_a_listen_during_the_reconnect_subscribe_is_subscribed_by_the_reconnect(
    line: Line, started: tuple[FakeRedisTransport, Received]
) -> None:
    transport, received = started
    await transport.listen("lic_a")
    line.cut()
    await async_wait_until(lambda: up() == 0, 5, "the subscriber to notice the cut")
    gate = line.hold = asyncio.Event()
    line.restore()
    await asyncio.wait_for(line.held.wait(), 5)  # the reconnect's SUBSCRIBE, of lic_a only
    await transport.listen("lic_b")  # not subscribed yet: only noted
    line.hold = None
    gate.set()
    await async_wait_until(lambda: received.gaps == 1, 5, "the reconnect")
    for license_id in ("lic_a", "lic_b"):
        await publish_and_receive(line, received, license_id, 1)


async def test_a_malformed_or_misdirected_message_is_dropped_and_the_next_one_delivered(
    line: Line, started: tuple[FakeRedisTransport, Received]
) -> None:
    transport, received = started
    await transport.listen("lic_a")
    client = fakeredis.FakeAsyncRedis(server=line.server)
    await client.publish(channel("lic_a"), b"not json")
    await client.publish(channel("lic_a"), orjson.dumps({"license_id": "lic_b", "seq": 1}))
    # Nothing on a channel that is no license's is delivered, even shaped as the channel's own
    # "license" (the control channel's name past `license-` is `broker:control`).
    await client.publish(CONTROL_CHANNEL, notice("broker:control"))
    await client.publish(CONTROL_CHANNEL, orjson.dumps({"license_id": "broker:control", "seq": 1}))
    await client.aclose()
    await publish(line, "lic_a", 7)
    event = await received.next()
    assert (event.license_id, event.seq) == ("lic_a", 7)


async def test_the_transports_connections_fail_fast_keep_alive_and_check_their_health_every_10_s() -> None:
    """`subscriber_options`, as the transport's client gets them: a connect or a command that
    hangs fails after 2 s, TCP keepalive on, the health check's PING every 10 s while reading, and
    no hidden retry (the subscriber loop backs off and reconnects itself)."""
    client = RedisTransport("redis://127.0.0.1:6379/0")._new_client()
    try:
        options = client.connection_pool.connection_kwargs
        wanted = ("socket_connect_timeout", "socket_timeout", "socket_keepalive", "health_check_interval")
        assert {name: options[name] for name in wanted} == dict(zip(wanted, (2, 2, True, 10), strict=True))
        assert isinstance(options["retry"]._backoff, NoBackoff) and options["retry"]._retries == 0
    finally:
        await client.aclose()


async def test_a_connection_is_dead_once_its_health_check_has_gone_unanswered_for_the_grace() -> None:
    """`check_alive`, called whenever a read of the subscribed connection returns nothing: the
    health check's PING was due at `next_health_check` (loop time); whatever is read moves it on.
    Dead once it is more than PING_GRACE overdue; alive before that, with no check scheduled (0),
    or with no connection yet."""
    now = asyncio.get_running_loop().time()

    def pubsub(due: float | None) -> Any:
        return SimpleNamespace(connection=None if due is None else SimpleNamespace(next_health_check=due))

    for alive in (None, 0, now + 10, now - subscriber.PING_GRACE + 1):
        subscriber.check_alive(pubsub(alive))
    for dead in (now - subscriber.PING_GRACE - 1, 1):
        with pytest.raises(ConnectionError) as raised:
            subscriber.check_alive(pubsub(dead))
        assert str(raised.value) == "no answer to the health check's PING: the connection is silently dead"


async def test_two_listens_of_one_license_waiting_for_its_confirmation_both_return_with_it(
    line: Line, started: tuple[FakeRedisTransport, Received]
) -> None:
    """A license listened to twice before Redis confirms the first SUBSCRIBE (a client leaves and
    another comes): both listens wait for the same confirmation and return with it, not after
    their subscribe_timeout (60 s here)."""
    transport, received = started
    sent = line.subscribes_sent
    line.replies.clear()
    listens = [asyncio.create_task(transport.listen("lic_a")) for _ in range(2)]
    await async_wait_until(lambda: line.subscribes_sent >= sent + 2, 5, "both SUBSCRIBEs to be sent")
    line.replies.set()
    await asyncio.wait_for(asyncio.gather(*listens), 5)
    await publish_and_receive(line, received, "lic_a", 1)


async def test_a_listen_whose_confirmation_never_comes_returns_at_its_subscribe_timeout(
    line: Line, backoffs: Backoffs, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis takes the SUBSCRIBE but its confirmation does not come back (a stalled server): the
    listen returns after subscribe_timeout, logged, rather than holding its client's catch-up for
    ever (the sweep covers the license meanwhile); once the replies flow, messages arrive."""
    transport = FakeRedisTransport(line, subscribe_timeout=0.2, max_backoff=0.4)
    received = Received()
    await transport.start(received.on_message, received.on_gap)
    caplog.set_level(logging.WARNING, logger="broker.redis")
    try:
        line.replies.clear()
        await asyncio.wait_for(transport.listen("lic_a"), 5)
        logged = [r.getMessage() for r in caplog.records if r.name == "broker.redis"]
        assert logged == [f"subscription to {channel('lic_a')} not confirmed: "]  # TimeoutError says nothing
        line.replies.set()
        await publish_and_receive(line, received, "lic_a", 1)
    finally:
        await transport.close()


async def test_a_transport_started_while_redis_is_away_starts_at_its_timeout_and_connects_later(
    line: Line, backoffs: Backoffs
) -> None:
    """Redis down at start-up: `start` returns after subscribe_timeout (the sweep serves
    meanwhile) rather than raising or waiting for Redis; the subscriber connects once it is back."""
    line.cut()
    transport = FakeRedisTransport(line, subscribe_timeout=0.2, max_backoff=0.4)
    received = Received()
    try:
        await asyncio.wait_for(transport.start(received.on_message, received.on_gap), 5)
        assert up() == 0
        await transport.listen("lic_a")  # only noted while away
        line.restore()
        await async_wait_until(lambda: up() == 1, 5, "the first connection")
        await publish_and_receive(line, received, "lic_a", 1)
    finally:
        await transport.close()


async def test_failing_the_subscriptions_of_some_channels_leaves_the_others_waiting() -> None:
    """`_fail_pending(exc, names)`: the cluster transport's shard that breaks fails the listens
    waiting on its own channels (confirmed ones included: no longer pending, nothing to fail),
    not those waiting on the healthy shards; without names, every waiting listen fails."""
    transport = RedisTransport("redis://127.0.0.1:6379/0")
    waiting = {name: transport._expect(name) for name in ("license:a", "license:b", "license:c")}
    lost = ConnectionError("shard lost")
    transport._fail_pending(lost, ["license:a", "license:confirmed"])
    assert waiting["license:a"].exception() is lost
    assert not waiting["license:b"].done() and not waiting["license:c"].done()
    assert set(transport._pending) == {"license:b", "license:c"}
    transport._fail_pending(lost)
    assert all(future.exception() is lost for future in waiting.values())
    assert transport._pending == {}


async def test_start_returns_once_subscribed_not_at_its_subscribe_timeout(line: Line, backoffs: Backoffs) -> None:
    """With Redis there, `start` returns as soon as the first connection is subscribed; its
    subscribe_timeout (60 s here) bounds only a start while Redis is away."""
    transport = FakeRedisTransport(line, subscribe_timeout=60, max_backoff=0.4)
    received = Received()
    try:
        await asyncio.wait_for(transport.start(received.on_message, received.on_gap), 5)
        assert up() == 1 and CONTROL_CHANNEL in subscribed(line)
    finally:
        await transport.close()


async def test_an_unlistened_license_is_not_subscribed_again_and_an_unsubscribe_on_a_cut_line_raises_nothing(
    line: Line, started: tuple[FakeRedisTransport, Received]
) -> None:
    """`unlisten` forgets the channel, so the reconnect does not subscribe it again; and it raises
    nothing when the connection breaks under its UNSUBSCRIBE (the hub is letting the license go:
    the reconnect will not take it back)."""
    transport, received = started
    for license_id in ("lic_a", "lic_b", "lic_c"):
        await transport.listen(license_id)
    await transport.unlisten("lic_a")
    line.cut()
    await transport.unlisten("lic_b")  # the subscriber has yet to notice the cut: its UNSUBSCRIBE fails
    await async_wait_until(lambda: up() == 0, 5, "the subscriber to notice the cut")
    line.restore()
    await async_wait_until(lambda: received.gaps == 1, 5, "the reconnect")
    for n, license_id in enumerate(("lic_a", "lic_b", "lic_c"), start=1):
        await publish(line, license_id, n)
    # lic_c's was published last: once it is here, the others would have been too.
    assert (await received.next()).license_id == "lic_c"
    assert received.received.empty()


async def test_a_subscribe_that_fails_is_logged_and_the_listen_returns(
    line: Line, started: tuple[FakeRedisTransport, Received], caplog: pytest.LogCaptureFixture
) -> None:
    """The connection breaks under a listen's SUBSCRIBE: the listen returns (the sweep covers the
    license; the reconnect subscribes it), saying which channel failed and why."""
    transport, received = started
    caplog.set_level(logging.WARNING, logger="broker.redis")
    line.cut()
    await asyncio.wait_for(transport.listen("lic_a"), 5)  # before the subscriber notices the cut
    logged = [r.getMessage() for r in caplog.records if r.name == "broker.redis"]
    failed = [m for m in logged if m.startswith("subscribe to")]
    assert len(failed) == 1 and re.fullmatch(rf"subscribe to {channel('lic_a')} failed: (?!None$).+", failed[0])
    await async_wait_until(lambda: up() == 0, 5, "the subscriber to notice the cut")
    await transport.listen("lic_b")  # during the outage: only noted, nothing tried, nothing logged
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("subscribe")] == failed
    line.restore()
    await async_wait_until(lambda: received.gaps == 1, 5, "the reconnect")
    for license_id in ("lic_a", "lic_b"):
        await publish_and_receive(line, received, license_id, 1)


async def test_closing_the_transport_under_a_waiting_listen_lets_it_return(
    line: Line, backoffs: Backoffs, caplog: pytest.LogCaptureFixture
) -> None:
    """The transport closes while a listen waits for its confirmation: the listen returns (it is
    told, not cancelled), logging that the subscription was closed."""
    caplog.set_level(logging.WARNING, logger="broker.redis")
    transport = FakeRedisTransport(line, subscribe_timeout=60, max_backoff=0.4)
    received = Received()
    await transport.start(received.on_message, received.on_gap)
    try:
        sent = line.subscribes_sent
        line.replies.clear()
        listening = asyncio.create_task(transport.listen("lic_a"))
        await async_wait_until(lambda: line.subscribes_sent > sent, 5, "the SUBSCRIBE to be sent")
    finally:
        await transport.close()
    await asyncio.wait_for(listening, 5)
    logged = [r.getMessage() for r in caplog.records if r.name == "broker.redis"]
    assert logged == [f"subscription to {channel('lic_a')} not confirmed: closed"]


async def test_a_failed_publish_whose_connection_will_not_close_still_fails_with_its_own_error(
    line: Line, started: tuple[FakeRedisTransport, Received]
) -> None:
    """A batch fails and closing its connection times out too (the peer stopped reading): the
    publisher is told the batch's error, not the close's, the publishes of the next moment fail
    fast, and once Redis answers again a publish goes out on a new connection."""
    transport, received = started
    await transport.listen("lic_a")
    await transport.publish("lic_a", orjson.dumps({"license_id": "lic_a", "seq": 1}))
    assert (await received.next()).seq == 1
    line.stalled_closes = True
    line.cut()
    with pytest.raises(RedisConnectionError, match="connection cut"):
        await asyncio.wait_for(transport.publish("lic_a", b"{}"), 5)
    assert line.closes_stalled == 1  # the publisher's own connection, closed by the transport
    with pytest.raises(ConnectionError, match=r"recent publish failed"):
        await transport.publish("lic_a", b"{}")
    line.stalled_closes = False
    line.restore()
    await async_wait_until(lambda: received.gaps == 1, 5, "the subscriber to reconnect")
    transport._publish_down_until = 0.0  # the backoff's second, not waited out
    await asyncio.wait_for(transport.publish("lic_a", orjson.dumps({"license_id": "lic_a", "seq": 2})), 5)
    assert (await received.next()).seq == 2


async def test_closing_a_transport_whose_connections_will_not_close_returns_and_leaves_nothing_running(
    line: Line, backoffs: Backoffs
) -> None:
    """Shutdown while Redis has stopped reading: closing the subscribed connection and the
    publisher's each time out, and the transport's close still returns at once, with no task of
    its left running (the subscriber loop is not brought back by the close's error)."""
    transport = FakeRedisTransport(line, subscribe_timeout=60, max_backoff=0.4)
    received = Received()
    await transport.start(received.on_message, received.on_gap)
    await transport.listen("lic_a")
    await transport.publish("lic_a", orjson.dumps({"license_id": "lic_a", "seq": 1}))
    assert (await received.next()).seq == 1
    running = [task for task in asyncio.all_tasks() if task.get_name().startswith("redis")]
    assert sorted(task.get_name() for task in running) == ["redis-publisher", "redis-subscriber"]
    line.stalled_closes = True
    closing = asyncio.create_task(transport.close())
    closed, _ = await asyncio.wait({closing}, timeout=5)
    line.stalled_closes = False
    if not closed:  # so that the test ends: what the close left running, cancelled while closes succeed
        for task in running:
            task.cancel()
        await asyncio.wait({closing}, timeout=5)
    assert closed, "the close never returned"
    assert line.closes_stalled == 2  # the subscribed connection and the publisher's
    assert [task.get_name() for task in running if not task.done()] == [] and up() == 0


async def test_a_listen_before_start_is_only_noted_and_start_subscribes_it(
    line: Line, backoffs: Backoffs, caplog: pytest.LogCaptureFixture
) -> None:
    """A listen before the transport has started tries nothing and logs nothing (there is no
    subscribed connection yet); `start` subscribes the license with the rest."""
    caplog.set_level(logging.WARNING, logger="broker.redis")
    transport = FakeRedisTransport(line, subscribe_timeout=60, max_backoff=0.4)
    received = Received()
    try:
        await asyncio.wait_for(transport.listen("lic_a"), 5)
        assert line.subscribes_sent == 0
        await transport.start(received.on_message, received.on_gap)
        assert channel("lic_a") in subscribed(line)
        await publish_and_receive(line, received, "lic_a", 1)
    finally:
        await transport.close()
    assert [r.getMessage() for r in caplog.records if r.name == "broker.redis"] == []


class FailingSecondSubscribe:
    """A subscribed connection whose first SUBSCRIBE goes through, while a listen notes one more
    license, and whose second fails."""

    def __init__(self, transport: RedisTransport, error: Exception) -> None:
        self.transport, self.error = transport, error
        self.subscribes: list[tuple[str, ...]] = []
        self.closed = False

    async def subscribe(self, *names: str) -> None:
        self.subscribes.append(names)
        if len(self.subscribes) == 2:
            raise self.error
        self.transport._channels.add(channel("lic_late"))

    async def aclose(self) -> None:
        self.closed = True


async def test_a_subscribe_failing_within_the_reconnect_closes_its_connection_and_fails_the_waiting_listens() -> None:
    """The reconnect's second SUBSCRIBE (for a license listened to while the first was on the
    wire) fails: the reconnect raises that error (the loop logs it and backs off), the new
    connection is closed, and a listen waiting for a confirmation is told that error."""
    transport = RedisTransport("redis://never-connected")
    error = RedisConnectionError("Connection reset by peer")
    pubsub = FailingSecondSubscribe(transport, error)
    transport._new_client = lambda: SimpleNamespace(pubsub=lambda: pubsub)  # type: ignore[method-assign]
    transport._channels.add(channel("lic_a"))
    waiting = transport._expect(channel("lic_waiting"))
    with pytest.raises(RedisConnectionError) as raised:
        await transport._subscribe_all(first=False)
    assert raised.value is error
    assert pubsub.subscribes == [(CONTROL_CHANNEL, channel("lic_a")), (channel("lic_late"),)]
    assert pubsub.closed and transport._pubsub is None
    assert waiting.exception() is error
