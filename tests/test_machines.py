"""Machines: listed and released by any machine of the license (or with the key); a released
machine's token is refused at once and its streams end at once, in every stream process; machine
tokens renew on the stream; LICENSE_MACHINE_TTL releases machines not seen."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import httpx
import jwt
import orjson
import pytest
import redis.asyncio as aioredis

from broker.signing import tokens
from license_broker.embedded import create_app
from tests.support.activations import (
    EventStream,
    activate,
    bearer,
    buy,
    fingerprint,
    key_of,
    keyed_env,
    keyed_settings,
)
from tests.support.licenses import new_license, post_event
from tests.support.processes import Process, process_env, serving
from webhook.samples import SampleEvents


def events_url(base: str, license_id: str) -> str:
    return f"{base}/api/licenses/{license_id}/events"


async def activated(client: httpx.AsyncClient, url: str, key: str, **extra: Any) -> dict[str, Any]:
    response = await activate(client, url, key, **extra)
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def test_a_released_machine_is_refused_at_once_and_its_stream_ends(pg_url: str) -> None:
    license_id = new_license()
    async with serving(create_app(keyed_settings(pg_url))) as url, httpx.AsyncClient(timeout=10) as client:
        key = await key_of(client, url, await buy(client, url, license_id))
        laptop_fp = fingerprint()
        laptop = await activated(client, url, key, fp=laptop_fp, name="old laptop", platform="windows")
        desktop = await activated(client, url, key, name="desktop", platform="linux")
        listed = (await client.get(f"{url}/api/machines", headers=bearer(desktop["token"]))).json()
        assert listed["used"] == 2 and listed["max"] == 3
        assert [(m["name"], m["current"]) for m in listed["machines"]] == [("old laptop", False), ("desktop", True)]
        async with EventStream(client, events_url(url, license_id), bearer(laptop["token"])) as stream:
            state = orjson.loads(await stream.until("message"))
            assert state["entitled"] is True
            lease = orjson.loads(await stream.until("lease"))["lease"]
            claims = jwt.decode(lease, options={"verify_signature": False})
            assert claims["machine"] == laptop["machine"]["id"] and claims["fingerprint"] == laptop_fp
            released_at = time.monotonic()
            gone = laptop["machine"]["id"]
            answer = await client.delete(f"{url}/api/machines/{gone}", headers=bearer(desktop["token"]))
            assert answer.json() == {"id": laptop["machine"]["id"], "released": True}
            await stream.end(within=1.0)
            ended_after = time.monotonic() - released_at
        refused = await client.get(f"{url}/api/machines", headers=bearer(laptop["token"]))
        assert (refused.status_code, refused.json()) == (401, {"error": "machine released"})
        reopened = await client.get(events_url(url, license_id), headers=bearer(laptop["token"]))
        assert (reopened.status_code, reopened.json()) == (401, {"error": "machine released"})
        renewal = await client.post(f"{url}/api/machines/{gone}/token", headers=bearer(laptop["token"]))
        assert renewal.status_code == 401
        again = await client.delete(f"{url}/api/machines/{gone}", headers=bearer(desktop["token"]))
        assert (again.status_code, again.json()) == (404, {"error": "no such machine"})
        assert (await client.get(f"{url}/api/machines", headers=bearer(desktop["token"]))).json()["used"] == 1
    assert ended_after < 1.0


async def test_the_key_lists_and_releases_machines_for_an_app_that_met_the_limit(pg_url: str) -> None:
    license_id = new_license()
    settings = keyed_settings(pg_url, max_machines=1)
    async with serving(create_app(settings)) as url, httpx.AsyncClient(timeout=10) as client:
        key = await key_of(client, url, await buy(client, url, license_id))
        old = await activated(client, url, key)
        full = await activate(client, url, key)
        assert full.status_code == 409
        with_key = {"authorization": f"License {key.lower()}"}
        listed = (await client.get(f"{url}/api/machines", headers=with_key)).json()
        assert [m["id"] for m in listed["machines"]] == [old["machine"]["id"]]
        wrong = {"authorization": "License " + key[:-1] + ("0" if key[-1] != "0" else "1")}
        assert (await client.get(f"{url}/api/machines", headers=wrong)).status_code == 400
        assert (await client.delete(f"{url}/api/machines/{old['machine']['id']}", headers=with_key)).status_code == 200
        assert (await activate(client, url, key)).status_code == 201
        # A machine token of another license neither lists nor releases this one's machines.
        other = await activated(client, url, await key_of(client, url, await buy(client, url, new_license())))
        mine = (await client.get(f"{url}/api/machines", headers=with_key)).json()["machines"][0]["id"]
        denied = await client.delete(f"{url}/api/machines/{mine}", headers=bearer(other["token"]))
        assert denied.status_code == 404
        assert (await client.get(f"{url}/api/machines", headers=with_key)).json()["used"] == 1
        # The seller's own subscriber token (a signed-in owner) lists them too.
        seller = tokens.mint(settings.token_secret or "", license_id, 600)
        assert (await client.get(f"{url}/api/machines", headers=bearer(seller))).json()["used"] == 1


async def test_a_machine_token_is_renewed_on_the_stream_and_on_request(pg_url: str) -> None:
    license_id = new_license()
    settings = keyed_settings(pg_url, machine_token_ttl=60.0)
    async with serving(create_app(settings)) as url, httpx.AsyncClient(timeout=10) as client:
        key = await key_of(client, url, await buy(client, url, license_id))
        fp = fingerprint()
        machine = await activated(client, url, key, fp=fp)
        machine_id = machine["machine"]["id"]
        # A token with less than half of its life left (minted 40 s ago, valid 60 s).
        old, old_exp = tokens.mint_machine(settings, license_id, machine_id, fp, now=time.time() - 40)
        async with EventStream(client, events_url(url, license_id), bearer(old)) as stream:
            renewed = orjson.loads(await stream.until("token"))
        assert renewed["machine_id"] == machine_id and renewed["exp"] >= old_exp + 39
        claims = tokens.verify_for(settings, renewed["token"])
        assert (claims.machine_id, claims.fingerprint, claims.license_id) == (machine_id, fp, license_id)
        assert (await client.get(f"{url}/api/machines", headers=bearer(renewed["token"]))).status_code == 200
        # A fresh token does not renew on the stream: the state and its lease come, then pings.
        async with EventStream(client, events_url(url, license_id), bearer(renewed["token"])) as stream:
            assert (await stream.next())[0] == "message"
            assert (await stream.next())[0] == "lease"
            sample = SampleEvents(license_id)
            event = sample.subscription_event("customer.subscription.updated", "past_due", sample.tick())
            assert (await post_event(client, url, event)).status_code == 200
            assert (await stream.next())[0] == "message"
        # On request: only the machine's own token.
        response = await client.post(f"{url}/api/machines/{machine_id}/token", headers=bearer(renewed["token"]))
        assert response.status_code == 200
        body = response.json()
        assert set(body) == {"machine_id", "token", "exp", "lease"} and body["machine_id"] == machine_id
        assert jwt.decode(body["lease"], options={"verify_signature": False})["machine"] == machine_id
        other = await activated(client, url, key)
        refused = await client.post(f"{url}/api/machines/{machine_id}/token", headers=bearer(other["token"]))
        assert refused.status_code == 403
        seller = tokens.mint(settings.token_secret or "", license_id, 600)
        assert (await client.post(f"{url}/api/machines/{machine_id}/token", headers=bearer(seller))).status_code == 403


async def test_machines_not_seen_for_the_ttl_are_released_but_not_one_holding_a_stream(pg_url: str) -> None:
    license_id = new_license()
    settings = keyed_settings(pg_url, machine_ttl=1.0)
    async with serving(create_app(settings)) as url, httpx.AsyncClient(timeout=10) as client:
        key = await key_of(client, url, await buy(client, url, license_id))
        idle = await activated(client, url, key)
        online = await activated(client, url, key)
        with_key = {"authorization": f"License {key}"}
        async with EventStream(client, events_url(url, license_id), bearer(online["token"])) as stream:
            await stream.until("lease")
            listed: list[str] = []

            async def idle_released() -> bool:
                machines = (await client.get(f"{url}/api/machines", headers=with_key)).json()["machines"]
                listed[:] = [m["id"] for m in machines]
                return idle["machine"]["id"] not in listed

            deadline = time.monotonic() + 10
            while not await idle_released():
                assert time.monotonic() < deadline, "the idle machine was not released"
                await asyncio.sleep(0.1)
            # Well past the TTL since its activation, the machine that holds a stream stays.
            assert listed == [online["machine"]["id"]]
            assert (await client.get(f"{url}/api/machines", headers=bearer(idle["token"]))).status_code == 401


@pytest.mark.parametrize("transport", ["redis", "poll"])
async def test_release_ends_the_machines_streams_in_every_stream_process(
    transport: str, pg_url: str, redis_url: str, spawn: Callable[..., Process]
) -> None:
    """Two stream processes and a webhook process. With Redis the release's notice ends the
    machine's streams in both within a second, though their sweep runs only every 30 s; a forged
    notice ends nothing. With the poll transport (no notices) the sweep ends them."""
    if transport == "redis":
        env = process_env(pg_url, REDIS_URL=redis_url, BROKER_POLL_INTERVAL="30", **keyed_env())
        bound = 1.0
    else:
        env = process_env(pg_url, BROKER_TRANSPORT="poll", BROKER_POLL_INTERVAL="0.5", **keyed_env())
        bound = 3.0
    webhook, first, second = spawn("webhook", env), spawn("stream", env), spawn("stream", env)
    license_id = new_license()
    sample = SampleEvents(license_id)
    async with httpx.AsyncClient(timeout=10) as client:
        key = await key_of(client, first.url, await buy(client, webhook.url, license_id))
        gone = await activated(client, first.url, key, name="old laptop")
        kept = await activated(client, second.url, key, name="desktop")
        streams = [
            EventStream(client, events_url(first.url, license_id), bearer(gone["token"])),
            EventStream(client, events_url(second.url, license_id), bearer(gone["token"])),
            EventStream(client, events_url(second.url, license_id), bearer(kept["token"])),
        ]
        for stream in streams:
            await stream.__aenter__()
        try:
            for stream in streams:
                await stream.until("message")

            async def post(status: str) -> int:
                event = sample.subscription_event("customer.subscription.updated", status, sample.tick())
                response = await post_event(client, webhook.url, event)
                seq: int = response.json()["seq"]
                return seq

            async def received(stream: EventStream, seq: int) -> None:
                while orjson.loads(await stream.until("message"))["seq"] != seq:
                    pass

            if transport == "redis":
                forger = aioredis.Redis.from_url(redis_url)
                notice = b'{"notice":"machines","license_id":%s}' % orjson.dumps(license_id)
                assert await forger.publish(f"license:{license_id}", notice) >= 2  # both processes follow it
                await forger.aclose()
                seq = await post("past_due")  # every stream is still open: each receives it
                for stream in streams:
                    await received(stream, seq)
            released_at = time.monotonic()
            answer = await client.delete(
                f"{second.url}/api/machines/{gone['machine']['id']}", headers=bearer(kept["token"])
            )
            assert answer.status_code == 200
            for stream in streams[:2]:
                await stream.end(within=bound + 1)
            took = time.monotonic() - released_at
            seq = await post("active")
            await received(streams[2], seq)
            assert not streams[2].ended
        finally:
            for stream in streams:
                await stream.__aexit__(None, None, None)
        for process in (first, second):
            refused = await client.get(events_url(process.url, license_id), headers=bearer(gone["token"]))
            assert refused.status_code == 401
    assert took < bound, f"the released machine's streams ended {took:.2f} s after the release"
    print(f"\nrelease -> both streams ended ({transport}): {took * 1000:.0f} ms")


async def test_the_state_route_refuses_a_released_machine_and_binds_its_lease_to_the_machine(pg_url: str) -> None:
    license_id = new_license()
    async with serving(create_app(keyed_settings(pg_url))) as url, httpx.AsyncClient(timeout=10) as client:
        key = await key_of(client, url, await buy(client, url, license_id))
        fp = fingerprint()
        machine = await activated(client, url, key, fp=fp)
        state = await client.get(f"{url}/api/licenses/{license_id}", headers=bearer(machine["token"]))
        claims = jwt.decode(state.json()["lease"], options={"verify_signature": False})
        assert (claims["machine"], claims["fingerprint"], claims["entitled"]) == (machine["machine"]["id"], fp, True)
        path = f"{url}/api/machines/{machine['machine']['id']}"
        assert (await client.delete(path, headers=bearer(machine["token"]))).status_code == 200  # itself
        refused = await client.get(f"{url}/api/licenses/{license_id}", headers=bearer(machine["token"]))
        assert (refused.status_code, refused.json()) == (401, {"error": "machine released"})


async def test_in_one_process_the_release_ends_the_stream_without_waiting_for_the_sweep(pg_url: str) -> None:
    """`serve` with the in-process transport: the notice goes through it as through Redis (the
    sweep runs every 30 s here, so it cannot be what ends the stream)."""
    license_id = new_license()
    settings = keyed_settings(pg_url, poll_interval=30.0)
    async with serving(create_app(settings)) as url, httpx.AsyncClient(timeout=10) as client:
        key = await key_of(client, url, await buy(client, url, license_id))
        gone, kept = await activated(client, url, key), await activated(client, url, key)
        async with EventStream(client, events_url(url, license_id), bearer(gone["token"])) as stream:
            await stream.until("lease")
            started = time.monotonic()
            path = f"{url}/api/machines/{gone['machine']['id']}"
            assert (await client.delete(path, headers=bearer(kept["token"]))).status_code == 200
            await stream.end(within=1.0)
        assert time.monotonic() - started < 1.0
