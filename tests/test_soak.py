"""A randomized soak, bounded in time: clients hopping between two stream processes at random,
webhooks for several licenses, Redis flapping. Afterwards every client holds 1..N of its license,
in order, once."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import Counter
from collections.abc import Callable

import httpx
from license_broker_client import LicenseClient

from tests.support.faults import RedisServer
from tests.support.licenses import new_license, post_event, token_for
from tests.support.processes import Process, process_env
from webhook.samples import SampleEvents

LICENSES = 6
CLIENTS_PER_LICENSE = 2
EVENTS = 150


async def test_randomized_soak_every_client_ends_with_the_complete_sequence(
    pg_url: str, redis_server: RedisServer, spawn: Callable[..., Process]
) -> None:
    rng = random.Random(20261127)
    env = process_env(pg_url, REDIS_URL=redis_server.url, BROKER_POLL_INTERVAL="0.25")
    webhook = spawn("webhook", env)
    streams = [spawn("stream", env), spawn("stream", env)]
    licenses = [new_license() for _ in range(LICENSES)]
    final: Counter[str] = Counter()
    received: dict[tuple[str, int], list[int]] = {(lid, n): [] for lid in licenses for n in range(CLIENTS_PER_LICENSE)}
    posting_done = asyncio.Event()
    # A client that has never held a state gets the license's current state first, not its
    # history: the posting waits until every client holds one (seq 0, "none"), however slowly a
    # loaded machine lets it connect.
    holding = {key: asyncio.Event() for key in received}
    reconnects = 0

    def caught_up() -> bool:
        return all(seqs[-1:] == [final[lid]] for (lid, _), seqs in received.items())

    async def client(license_id: str, n: int) -> None:
        nonlocal reconnects
        seqs = received[(license_id, n)]
        last: int | None = None
        while not (posting_done.is_set() and seqs[-1:] == [final[license_id]]):
            server = rng.choice(streams)
            session = LicenseClient(server.url, license_id, token_for(license_id), last_event_id=last)
            with contextlib.suppress(TimeoutError, httpx.HTTPError):
                async with asyncio.timeout(rng.uniform(0.1, 1.5)):
                    async for event in session.connect_once():
                        if int(event["seq"]) > 0:
                            seqs.append(int(event["seq"]))
            last = session.last_event_id
            if last is not None:
                holding[(license_id, n)].set()
            reconnects += 1

    async def post() -> None:
        await asyncio.gather(*(held.wait() for held in holding.values()))
        async with httpx.AsyncClient(timeout=10) as http:
            for i in range(EVENTS):
                license_id = rng.choice(licenses)
                status = ["active", "past_due"][final[license_id] % 2]  # each event changes the state
                event = SampleEvents(license_id).subscription_event(
                    "customer.subscription.updated", status, SampleEvents(license_id).tick()
                )
                response = await post_event(http, webhook.url, event)
                assert response.status_code == 200, response.text
                if response.json()["outcome"] == "applied":
                    final[license_id] = response.json()["seq"]
                if i % 10 == 0:
                    await asyncio.sleep(rng.uniform(0, 0.1))
        posting_done.set()

    async def flap() -> None:
        while not posting_done.is_set():
            await asyncio.sleep(rng.uniform(0.5, 1.5))
            await asyncio.to_thread(redis_server.stop)
            await asyncio.sleep(rng.uniform(0.2, 1.0))
            await asyncio.to_thread(redis_server.start)

    tasks = [asyncio.create_task(client(lid, n)) for lid, n in received]
    flapper = asyncio.create_task(flap())
    async with asyncio.timeout(90):
        await post()
        await flapper
        await asyncio.gather(*tasks)
    assert caught_up()
    for (license_id, _), seqs in received.items():
        assert seqs == list(range(1, final[license_id] + 1)), (license_id, seqs)
    assert sum(final.values()) == EVENTS
    print(f"\nsoak: {EVENTS} webhooks, {len(received)} clients, {reconnects} reconnects, Redis flapping: all complete")
