"""GET /api/licenses/{id}/events and /api/licenses/{id}: auth, first state, catch-up, heartbeats."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import jwt
import orjson
import pytest
from license_broker_client import LicenseClient, Unauthorized
from sqlalchemy.exc import OperationalError

from broker import metrics
from broker.settings import Settings
from broker.signing import tokens
from broker.signing.leases import LeaseKeys, LeaseSigner
from broker.storage.db import create_engine
from broker.storage.eventlog import EventLog, LicenseEvent, encode_event
from broker.storage.licenses import initial_state
from broker.wire import PING, notice
from license_broker.embedded import create_app
from stream.catchup import _deadline, license_stream
from stream.hub import HubClosed, SubscriptionHub
from stream.machine import StreamMachine
from tests.support.eventlogs import ReadCountingEventLog
from tests.support.licenses import TOKEN_SECRET, append, make_settings, new_license, post_event, token_for
from tests.support.processes import serving
from tests.support.transports import RecordingTransport
from webhook.samples import SampleEvents


@pytest.fixture(params=["memory", "redis"])
async def server(request: pytest.FixtureRequest, pg_url: str) -> AsyncIterator[str]:
    changes: dict[str, Any] = {"heartbeat_interval": 0.2}
    if request.param == "redis":
        # The sweep far slower than any wait here: live events come through Redis.
        changes |= {"transport": "redis", "redis_url": request.getfixturevalue("redis_url"), "poll_interval": 600}
    async with serving(create_app(make_settings(pg_url, **changes))) as url:
        yield url


STATUS_OF = {"pay": "active", "fail": "past_due", "recover": "active", "cancel": "canceled"}


async def pay(url: str, license_id: str, action: str = "pay") -> None:
    """One Stripe event, one change, one seq."""
    sample = SampleEvents(license_id)
    kind = "customer.subscription.deleted" if action == "cancel" else "customer.subscription.updated"
    async with httpx.AsyncClient() as client:
        event = sample.subscription_event(kind, STATUS_OF[action], sample.tick())
        assert (await post_event(client, url, event)).json()["outcome"] == "applied"


async def take(client: LicenseClient, n: int, within: float = 10) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []

    async def run() -> None:
        async for event in client.connect_once():
            events.append(event)
            if len(events) == n:
                return

    await asyncio.wait_for(run(), within)
    return events


async def test_without_a_token_401_with_a_bad_one_401_with_another_licenses_403(server: str) -> None:
    license_id = new_license()
    expired = tokens.mint(TOKEN_SECRET, license_id, ttl=-10)
    forged = tokens.mint("another-secret-0123456789-abcdefghijkl", license_id)
    async with httpx.AsyncClient() as client:
        for path in (f"/api/licenses/{license_id}/events", f"/api/licenses/{license_id}"):
            assert (await client.get(server + path)).status_code == 401
            assert (await client.get(server + path, params={"token": "garbage"})).status_code == 401
            assert (await client.get(server + path, params={"token": expired})).status_code == 401
            assert (await client.get(server + path, params={"token": forged})).status_code == 401
            other = {"authorization": f"Bearer {token_for(new_license())}"}
            assert (await client.get(server + path, headers=other)).status_code == 403


async def test_the_first_event_is_the_current_state_none_before_any_payment(server: str) -> None:
    license_id = new_license()
    [first] = await take(LicenseClient(server, license_id, token_for(license_id)), 1)
    assert (first["seq"], first["status"], first["entitled"], first["license_id"]) == (0, "none", False, license_id)


async def test_a_token_in_the_query_string_is_accepted(server: str) -> None:
    license_id = new_license()
    await pay(server, license_id)
    async with httpx.AsyncClient() as client:
        state = await client.get(f"{server}/api/licenses/{license_id}", params={"token": token_for(license_id)})
    assert state.status_code == 200
    assert (state.json()["seq"], state.json()["status"], state.json()["entitled"]) == (1, "active", True)


async def test_a_live_event_reaches_a_connected_client(server: str) -> None:
    license_id = new_license()
    stream = LicenseClient(server, license_id, token_for(license_id)).connect_once()
    try:
        first = await asyncio.wait_for(anext(stream), 10)  # subscribed once the first state is here
        await pay(server, license_id)
        await pay(server, license_id, "fail")
        events = [first, await asyncio.wait_for(anext(stream), 10), await asyncio.wait_for(anext(stream), 10)]
    finally:
        await stream.aclose()  # type: ignore[attr-defined]
    assert [(e["seq"], e["status"]) for e in events] == [(0, "none"), (1, "active"), (2, "past_due")]


async def test_reconnecting_with_last_event_id_replays_exactly_the_missed_events_in_order(server: str) -> None:
    license_id = new_license()
    for action in ("pay", "fail", "recover", "cancel", "pay"):
        await pay(server, license_id, action)
    client = LicenseClient(server, license_id, token_for(license_id), last_event_id=2)
    events = await take(client, 3)
    assert [(e["seq"], e["status"]) for e in events] == [(3, "active"), (4, "canceled"), (5, "active")]
    assert client.last_event_id == 5


async def test_the_resume_point_can_be_given_in_the_query_string(server: str) -> None:
    license_id = new_license()
    await pay(server, license_id)
    await pay(server, license_id, "cancel")
    url = f"{server}/api/licenses/{license_id}/events"
    params = {"token": token_for(license_id), "lastEventId": "1"}
    async with httpx.AsyncClient() as client, client.stream("GET", url, params=params) as response:
        lines = response.aiter_lines()
        while await anext(lines) != "id: 2":
            pass
        assert '"status":"canceled"' in await anext(lines)


async def test_a_malformed_last_event_id_is_400(server: str) -> None:
    license_id = new_license()
    headers = {"authorization": f"Bearer {token_for(license_id)}", "last-event-id": "seven"}
    async with httpx.AsyncClient() as client:
        response = await client.get(f"{server}/api/licenses/{license_id}/events", headers=headers)
    assert response.status_code == 400


async def test_the_stream_carries_its_request_id_and_other_methods_are_405(server: str) -> None:
    # Streams skip starlette's middleware stack (broker.web.asgi.StreamRoute), but not the request id.
    license_id = new_license()
    headers = {"authorization": f"Bearer {token_for(license_id)}", "x-request-id": "req-s1"}
    url = f"{server}/api/licenses/{license_id}/events"
    async with httpx.AsyncClient() as client:
        async with client.stream("GET", url, headers=headers) as response:
            assert response.status_code == 200
            assert response.headers["x-request-id"] == "req-s1"
            assert response.headers["content-type"].startswith("text/event-stream")
        refused = await client.post(url, headers=headers)
        assert refused.status_code == 405
        assert refused.headers["x-request-id"] == "req-s1"


async def test_the_stream_sends_a_retry_hint_and_ping_heartbeats(server: str) -> None:
    license_id = new_license()
    headers = {"authorization": f"Bearer {token_for(license_id)}"}
    seen: list[str] = []
    url = f"{server}/api/licenses/{license_id}/events"
    async with httpx.AsyncClient() as client, client.stream("GET", url, headers=headers) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"].startswith("no-cache")
        async for line in response.aiter_lines():
            seen.append(line)
            if seen.count(": ping") == 2:
                break
    assert seen[0] == "retry: 2000"
    assert "id: 0" in seen


async def test_a_disconnected_client_releases_its_stream(server: str) -> None:
    license_id = new_license()
    baseline = metrics.OPEN_STREAMS._value.get()
    url = f"{server}/api/licenses/{license_id}/events"
    headers = {"authorization": f"Bearer {token_for(license_id)}"}
    async with httpx.AsyncClient() as client, client.stream("GET", url, headers=headers) as response:
        lines = response.aiter_lines()
        while await asyncio.wait_for(anext(lines), 10) != "id: 0":
            pass
        assert metrics.OPEN_STREAMS._value.get() == baseline + 1  # counted while it is open
    deadline = time.monotonic() + 5
    while metrics.OPEN_STREAMS._value.get() != baseline:
        assert time.monotonic() < deadline, "stream still open after the client left"
        await asyncio.sleep(0.01)


async def test_an_unauthorized_client_raises_instead_of_retrying_for_ever(server: str) -> None:
    client = LicenseClient(server, new_license(), "not-a-token")
    with pytest.raises(Unauthorized):
        await take(client, 1)


@pytest.mark.parametrize("batch", [1, 500])
async def test_an_event_committed_during_the_replay_is_sent_once(pg_url: str, batch: int) -> None:
    """Subscribe, replay, then live: an event that commits while the replay runs is both read
    from the database and queued live, and must reach the client exactly once."""
    engine = create_engine(Settings(database_url=pg_url))
    transport = RecordingTransport()
    events = EventLog(engine)
    hub = SubscriptionHub(transport, buffer=64)
    await hub.start()
    license_id = new_license()
    for status in ("active", "past_due", "active"):
        await append(engine, license_id, status)
    settings = make_settings(pg_url, replay_batch=batch, heartbeat_interval=30)
    stream = license_stream(events, hub, settings, license_id, 0)
    try:
        assert (await anext(stream)).startswith(b"retry:")
        chunks = [await anext(stream)]  # seq 1, from the replay
        during = await append(engine, license_id, "canceled")  # commits mid-replay ...
        await transport.publish(license_id, during.data)  # ... and is published live
        while len(chunks) < 4:
            chunks.append(await asyncio.wait_for(anext(stream), 5))
        after = await append(engine, license_id, "active")
        await transport.publish(license_id, after.data)
        chunks.append(await asyncio.wait_for(anext(stream), 5))
        await stream.aclose()
        assert transport.listened == set()  # the last client gone, the hub let go of the license
    finally:
        await stream.aclose()
        await hub.close()
        await engine.dispose()
    ids = [int(chunk.split(b"\n", 1)[0].removeprefix(b"id: ")) for chunk in chunks]
    assert ids == [1, 2, 3, 4, 5]


async def test_a_notice_prompts_the_hub_with_its_license_and_reaches_no_stream() -> None:
    """A notice (a license's machines changed) is no event: the hub hands its license id to
    `on_notice` (broker.licensing.watch) and queues nothing for the license's streams."""
    transport = RecordingTransport()
    hub = SubscriptionHub(transport, buffer=4)
    await hub.start()
    license_id = new_license()
    try:
        async with hub.subscribe(license_id) as sub:
            await transport.publish(license_id, notice(license_id))  # nothing watches: ignored
            noticed: list[str] = []
            hub.on_notice = noticed.append
            await transport.publish(license_id, notice(license_id))
            assert noticed == [license_id]
            assert sub.pending == 0
    finally:
        await hub.close()


async def test_the_delivery_lag_is_the_time_since_the_event_was_recorded_and_never_negative() -> None:
    """The hub observes, per event, how long ago the webhook recorded it; an event recorded by a
    process whose clock runs ahead is observed as 0, not as a negative lag."""
    transport = RecordingTransport()
    hub = SubscriptionHub(transport, buffer=4)
    await hub.start()
    license_id = new_license()

    def event(seq: int, recorded_at: datetime) -> bytes:
        return encode_event(license_id, seq, initial_state(), stripe_event_id=None, stripe_event_type=None,
                            occurred_at=None, recorded_at=recorded_at)  # fmt: skip

    def observed() -> float:
        return float(metrics.DELIVERY_LAG._sum.get())

    try:
        async with hub.subscribe(license_id) as sub:
            before, start = observed(), time.time()
            await transport.publish(license_id, event(1, datetime.fromtimestamp(start, UTC)))
            lag = observed() - before
            assert 0 <= lag <= time.time() - start + 1e-6  # recorded_at is kept to the microsecond
            before = observed()
            await transport.publish(license_id, event(2, datetime.now(UTC) + timedelta(seconds=5)))
            assert observed() - before == 0
            assert sub.pending == 2
    finally:
        await hub.close()


class FailingUnlistenTransport(RecordingTransport):
    async def unlisten(self, license_id: str) -> None:
        raise ConnectionError("redis gone")


async def test_a_failing_unlisten_is_logged_and_the_hub_still_lets_the_license_go(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The last client of a license leaves while the transport cannot unlisten (Redis down): its
    leave completes, the hub forgets the license, and the failure is logged."""
    hub = SubscriptionHub(FailingUnlistenTransport(), buffer=4)
    await hub.start()
    caplog.set_level(logging.WARNING, logger="stream.hub")
    license_id = new_license()
    try:
        async with hub.subscribe(license_id):
            pass
        assert license_id not in hub._topics
        messages = [r.getMessage() for r in caplog.records if r.name == "stream.hub"]
        assert messages == [f"unlisten {license_id} failed: redis gone"]
    finally:
        await hub.close()


async def test_the_hub_knows_which_machines_hold_streams_and_ends_the_streams_of_those_released() -> None:
    """Streams opened with a machine token are the machine's: the hub lists them per license and
    in all, and ends those of released machines (broker.licensing.watch), each once."""
    hub = SubscriptionHub(RecordingTransport(), buffer=4)
    await hub.start()
    license_id, other, unknown = new_license(), new_license(), new_license()
    try:
        async with (
            hub.subscribe(license_id, "m1") as m1,
            hub.subscribe(license_id, "m2") as m2,
            hub.subscribe(license_id, "m4") as m4,
            hub.subscribe(license_id) as anonymous,
            hub.subscribe(other, "m3") as m3,
        ):
            assert hub.machines_of(license_id) == {"m1", "m2", "m4"}
            assert hub.machines_of(unknown) == set()
            assert hub.held_machines() == {"m1": license_id, "m2": license_id, "m4": license_id, "m3": other}
            assert hub.end_machines(license_id, ["m1", "m3"]) == 1  # m3 holds another license's
            assert [s.ended for s in (m1, m2, m4, anonymous, m3)] == [True, False, False, False, False]
            assert hub.end_machines(license_id, ["m1"]) == 0  # ended already
            assert hub.end_machines(unknown, ["m2"]) == 0
            assert not m2.ended
            assert hub.end_machines(license_id, ["m1", "m2", "m4"]) == 2
            assert [s.ended for s in (m2, m4, anonymous, m3)] == [True, True, False, False]
    finally:
        await hub.close()


async def test_a_hub_going_away_ends_its_streams_and_refuses_new_ones() -> None:
    """SIGTERM: every stream ends at once (its client reconnects to another process) and a
    subscription that comes after is refused rather than left waiting on a closing process."""
    hub = SubscriptionHub(RecordingTransport(), buffer=4)
    await hub.start()
    license_id = new_license()
    try:
        async with hub.subscribe(license_id) as sub:
            assert not hub.closing
            hub.end_streams()
            assert hub.closing and sub.ended
            assert await sub.get(30) is None  # at once, not after 30 s
            with pytest.raises(HubClosed):
                async with hub.subscribe(license_id):
                    pass
    finally:
        await hub.close()


async def test_a_client_resuming_at_the_current_seq_is_sent_nothing_again(pg_url: str) -> None:
    """Its Last-Event-ID is the license's current seq: the stream sends no event, only its
    heartbeat, until something changes. A late live copy of the state it holds is skipped; the
    next event, in order, is sent without a read of the log (no gap to fill)."""
    engine = create_engine(Settings(database_url=pg_url))
    transport = RecordingTransport()
    hub = SubscriptionHub(transport, buffer=4)
    await hub.start()
    license_id = new_license()
    await append(engine, license_id)
    second = await append(engine, license_id, "past_due")
    events = ReadCountingEventLog(engine)
    stream = license_stream(events, hub, make_settings(pg_url, heartbeat_interval=0.05), license_id, 2)
    try:
        assert (await anext(stream)).startswith(b"retry:")
        assert await asyncio.wait_for(anext(stream), 5) == PING
        await transport.publish(license_id, second.data)
        third = await append(engine, license_id, "canceled")
        await transport.publish(license_id, third.data)
        chunk = await asyncio.wait_for(anext(stream), 5)
        while chunk == PING:
            chunk = await asyncio.wait_for(anext(stream), 5)
        assert chunk.startswith(b"id: 3\n")
        assert events.reads == []
    finally:
        await stream.aclose()
        await hub.close()
        await engine.dispose()


async def test_a_replay_reads_its_backlog_in_batches_and_only_a_resync_counts_as_one(pg_url: str) -> None:
    """20 events before the current one, STREAM_REPLAY_BATCH 10: two reads of 10, none more (a
    large backlog holds no connection long). A client with no resume point is no resync; one
    ahead of the license is."""
    engine = create_engine(Settings(database_url=pg_url))
    hub = SubscriptionHub(RecordingTransport(), buffer=4)
    await hub.start()
    events = ReadCountingEventLog(engine)
    settings = make_settings(pg_url, replay_batch=10, heartbeat_interval=30)
    license_id = new_license()
    for _ in range(21):
        await append(engine, license_id)

    async def chunks(last_seq: int | None, n: int) -> list[bytes]:
        stream = license_stream(events, hub, settings, license_id, last_seq)
        try:
            return [await anext(stream) for _ in range(n)]
        finally:
            await stream.aclose()

    def resynced() -> float:
        return float(metrics.RESYNCED._value.get())

    try:
        replay = await chunks(0, 1 + 21)
        assert [int(c.split(b"\n", 1)[0].removeprefix(b"id: ")) for c in replay[1:]] == list(range(1, 22))
        assert events.reads == [10, 10]
        before = resynced()
        assert (await chunks(None, 2))[1].startswith(b"id: 21\n")
        assert resynced() == before
        assert (await chunks(99, 2))[1].startswith(b"id: 21\n")
        assert resynced() == before + 1
    finally:
        await hub.close()
        await engine.dispose()


async def test_a_stream_ends_when_the_token_that_opened_it_expires(pg_url: str) -> None:
    """`expires_at` (the token's exp) half a second away, heartbeats every 30 s: the stream ends
    at the expiry, not at a heartbeat; the client reconnects with a fresh token."""
    engine = create_engine(Settings(database_url=pg_url))
    hub = SubscriptionHub(RecordingTransport(), buffer=4)
    await hub.start()
    settings = make_settings(pg_url, heartbeat_interval=30, max_connection_lifetime=0)
    stream = license_stream(EventLog(engine), hub, settings, new_license(), None, expires_at=time.time() + 0.5)
    try:
        assert (await anext(stream)).startswith(b"retry:")
        assert (await anext(stream)).startswith(b"id: 0\n")
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(anext(stream), 10)
    finally:
        await stream.aclose()
        await hub.close()
        await engine.dispose()


def sse(chunk: bytes) -> tuple[str, dict[str, Any]]:
    """A chunk of the stream as (its kind, its data): "state" (an event with an id), "lease",
    "token", or "ping"."""
    if chunk == PING:
        return "ping", {}
    lines = chunk.split(b"\n")
    data: dict[str, Any] = orjson.loads(next(line for line in lines if line.startswith(b"data: "))[6:])
    if lines[0].startswith(b"id: "):
        return "state", data
    return lines[0].removeprefix(b"event: ").decode(), data


async def next_not_ping(stream: AsyncIterator[bytes], within: float = 5) -> tuple[str, dict[str, Any]]:
    while (chunk := sse(await asyncio.wait_for(anext(stream), within)))[0] == "ping":
        pass
    return chunk


def signed_claims(signer: LeaseSigner, lease: dict[str, Any]) -> dict[str, Any]:
    claims: dict[str, Any] = jwt.decode(lease["lease"], signer.keys.signing.public_key(), algorithms=["EdDSA"])
    assert (claims["seq"], claims["exp"]) == (lease["seq"], lease["exp"])
    return claims


async def test_a_client_resuming_at_the_current_seq_gets_its_lease_renewed_on_its_own_timer_then_each_new_state_its_own(
    pg_url: str,
) -> None:
    """Leases on, 4 s each (renewed 1.5 s after signing), heartbeats every 30 s. A client that
    resumes at the license's current seq is sent that state's lease and no state; the lease is
    renewed each time it is due, not before and not at a heartbeat; a live state is followed by
    its own lease, and nothing else comes in between."""
    engine = create_engine(Settings(database_url=pg_url))
    transport = RecordingTransport()
    hub = SubscriptionHub(transport, buffer=4)
    await hub.start()
    license_id = new_license()
    await append(engine, license_id)
    await append(engine, license_id, "past_due")
    signer = LeaseSigner(LeaseKeys.generate(), ttl=4)
    settings = make_settings(pg_url, heartbeat_interval=30)
    stream = license_stream(EventLog(engine), hub, settings, license_id, 2, signer)
    try:
        assert (await anext(stream)).startswith(b"retry:")
        kind, lease = sse(await asyncio.wait_for(anext(stream), 5))
        held_at = time.monotonic()
        assert kind == "lease"
        held = signed_claims(signer, lease)
        assert (held["sub"], held["seq"], held["status"], held["entitled"]) == (license_id, 2, "past_due", False)
        kind, lease = await next_not_ping(stream)
        assert kind == "lease"
        assert time.monotonic() - held_at >= signer.renew_after()  # not before it is due
        renewed_at = time.monotonic()
        renewed = signed_claims(signer, lease)
        assert (renewed["seq"], renewed["status"]) == (2, "past_due")
        assert renewed["exp"] > held["exp"]
        kind, lease = await next_not_ping(stream)  # and again, as long as nothing changes
        assert kind == "lease"
        assert time.monotonic() - renewed_at >= signer.renew_after()
        assert signed_claims(signer, lease)["exp"] > renewed["exp"]
        third = await append(engine, license_id, "canceled")
        await transport.publish(license_id, third.data)
        assert await next_not_ping(stream) == ("state", orjson.loads(third.data))
        kind, lease = await next_not_ping(stream)
        assert kind == "lease"
        claims = signed_claims(signer, lease)
        assert (claims["seq"], claims["status"], claims["entitled"]) == (3, "canceled", False)
        assert "machine" not in claims
    finally:
        await stream.aclose()
        await hub.close()
        await engine.dispose()


async def test_a_machine_stream_is_held_by_its_machine_renews_its_token_and_lasts_its_lifetime_not_its_first_token(
    pg_url: str,
) -> None:
    """Opened with a machine token that has 2.5 s left of 4 s (MACHINE_TOKEN_TTL): the hub knows
    the machine holds the stream, its lease names the machine, its token is renewed on the stream
    each time less than half of it is left (never before), and the renewals carry the stream past
    the first token's expiry to STREAM_MAX_CONNECTION_LIFETIME (4 s, jittered down to 3.4 s at
    the least), where it ends although its token is still valid. Heartbeats every 30 s: every
    wake-up here is the stream's own timer."""
    engine = create_engine(Settings(database_url=pg_url))
    hub = SubscriptionHub(RecordingTransport(), buffer=4)
    await hub.start()
    license_id = new_license()
    signer = LeaseSigner(LeaseKeys.generate())
    settings = make_settings(pg_url, heartbeat_interval=30, machine_token_ttl=4, max_connection_lifetime=4)
    opened = time.monotonic()
    expires_at = time.time() + 2.5
    grant = tokens.Grant(license_id, expires_at, machine_id="machine-1", fingerprint="fingerprint-1")
    machine = StreamMachine(settings, license_id, grant)
    stream = license_stream(
        EventLog(engine), hub, settings, license_id, None, signer, expires_at=expires_at, machine=machine
    )
    try:
        assert (await anext(stream)).startswith(b"retry:")
        assert sse(await asyncio.wait_for(anext(stream), 5))[0] == "state"
        kind, lease = sse(await asyncio.wait_for(anext(stream), 5))
        assert kind == "lease"
        claims = signed_claims(signer, lease)
        assert (claims["sub"], claims["seq"], claims["machine"], claims["fingerprint"]) == (
            license_id, 0, "machine-1", "fingerprint-1",
        )  # fmt: skip
        assert hub.machines_of(license_id) == {"machine-1"}
        exp = expires_at
        renewals = 0
        while True:
            try:
                kind, token = sse(await asyncio.wait_for(anext(stream), 10))
            except StopAsyncIteration:
                break
            assert time.monotonic() - opened < 10, "the stream outlived STREAM_MAX_CONNECTION_LIFETIME"
            assert kind == "token"
            assert time.time() >= exp - settings.machine_token_ttl / 2  # not before half of it is left
            grant = tokens.verify_for(settings, token["token"])
            assert (grant.license_id, grant.machine_id, grant.fingerprint) == (license_id, "machine-1", "fingerprint-1")
            assert (token["machine_id"], token["exp"]) == ("machine-1", grant.expires_at)
            exp = token["exp"]
            renewals += 1
        ended = time.time()
        assert renewals >= 2
        assert ended > expires_at  # the first token's expiry did not end it
        assert ended < exp  # the lifetime did, the last token still valid
    finally:
        await stream.aclose()
        await hub.close()
        await engine.dispose()


async def test_a_machine_token_is_not_renewed_at_a_heartbeat_before_less_than_half_of_it_is_left(pg_url: str) -> None:
    """Heartbeats every 0.2 s, a machine token with 3.5 s left of 4 s: pings until 2 s are left,
    then the renewal, not at an earlier heartbeat."""
    engine = create_engine(Settings(database_url=pg_url))
    hub = SubscriptionHub(RecordingTransport(), buffer=4)
    await hub.start()
    license_id = new_license()
    settings = make_settings(pg_url, heartbeat_interval=0.2, machine_token_ttl=4)
    expires_at = time.time() + 3.5
    machine = StreamMachine(settings, license_id, tokens.Grant(license_id, expires_at, "machine-1", "fingerprint-1"))
    stream = license_stream(EventLog(engine), hub, settings, license_id, None, expires_at=expires_at, machine=machine)
    try:
        assert (await anext(stream)).startswith(b"retry:")
        assert sse(await asyncio.wait_for(anext(stream), 5))[0] == "state"
        assert await asyncio.wait_for(anext(stream), 5) == PING
        kind, token = await next_not_ping(stream)
        assert kind == "token"
        assert time.time() >= expires_at - settings.machine_token_ttl / 2
        assert tokens.verify_for(settings, token["token"]).machine_id == "machine-1"
    finally:
        await stream.aclose()
        await hub.close()
        await engine.dispose()


def test_a_stream_ends_at_its_tokens_expiry_or_at_its_jittered_maximum_lifetime_whichever_comes_first() -> None:
    """`_deadline`, on the monotonic clock: the token's expiry as it is; the maximum lifetime
    jittered between 85 % and 100 % (never longer), so that the clients of a restarted fleet
    spread out; the earlier of the two when both apply."""
    lifetime = make_settings("postgresql://unused", max_connection_lifetime=100.0)
    without = make_settings("postgresql://unused", max_connection_lifetime=None)
    assert _deadline(without, None) is None
    before, expires = time.monotonic(), _deadline(without, time.time() + 50)
    assert expires is not None and before + 49.9 <= expires <= time.monotonic() + 50.1
    ends = []
    for _ in range(200):
        before, end = time.monotonic(), _deadline(lifetime, None)
        assert end is not None and before + 85 <= end <= time.monotonic() + 100
        ends.append(end - before)
    assert max(ends) - min(ends) > 5  # jittered, not one fixed lifetime
    before, end = time.monotonic(), _deadline(lifetime, time.time() + 50)
    assert end is not None and before + 49.9 <= end <= time.monotonic() + 50.1
    before, end = time.monotonic(), _deadline(lifetime, time.time() + 500)
    assert end is not None and before + 85 <= end <= time.monotonic() + 100


class UnavailableEventLog(EventLog):
    """The event log of a database that refuses every connection."""

    error = OperationalError("SELECT", {}, ConnectionRefusedError("connection refused"))

    async def current(self, license_id: str) -> LicenseEvent:
        raise self.error


async def test_a_stream_whose_database_is_unavailable_ends_and_says_so(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The catch-up cannot read the database: the stream ends after its retry hint (the client
    comes back after `retry:` and resumes from its Last-Event-ID, nothing lost), the hub lets the
    license go, and one warning names the license and the error."""
    engine = create_engine(Settings(database_url=pg_url))
    transport = RecordingTransport()
    hub = SubscriptionHub(transport, buffer=4)
    await hub.start()
    caplog.set_level(logging.WARNING, logger="stream")
    license_id = new_license()
    try:
        stream = license_stream(UnavailableEventLog(engine), hub, make_settings(pg_url), license_id, None)
        chunks = [chunk async for chunk in stream]
        assert len(chunks) == 1 and chunks[0].startswith(b"retry:")
        assert transport.listened == set()
        messages = [r.getMessage() for r in caplog.records if r.name == "stream"]
        assert messages == [f"stream for {license_id} ended, database unavailable: {UnavailableEventLog.error}"]
    finally:
        await hub.close()
        await engine.dispose()
