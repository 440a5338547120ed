"""What one client, or a crowd of them, can take from a stream process: streams per process and
per license, how much history a resume replays, what a resume point may be."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from license_broker_client import LicenseClient

from broker.settings import Settings
from broker.storage.db import create_engine
from license_broker.embedded import create_app
from tests.support.licenses import append, make_settings, new_license, post_event, token_for
from tests.support.processes import serving
from webhook.samples import SampleEvents


def events_url(base: str, license_id: str) -> str:
    return f"{base}/api/licenses/{license_id}/events"


def auth(license_id: str, **extra: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token_for(license_id)}", **extra}


async def update(base: str, license_id: str, status: str = "active") -> int:
    """One signed subscription update through the webhook: one change, one seq (returned)."""
    sample = SampleEvents(license_id)
    kind = "customer.subscription.deleted" if status == "canceled" else "customer.subscription.updated"
    async with httpx.AsyncClient() as http:
        response = await post_event(http, base, sample.subscription_event(kind, status, sample.tick()))
    assert response.json()["outcome"] == "applied", response.text
    seq: int = response.json()["seq"]
    return seq


async def seed(url: str, license_id: str, count: int) -> None:
    engine = create_engine(Settings(database_url=url))
    try:
        for i in range(count):
            await append(engine, license_id, "active" if i % 2 == 0 else "past_due")
    finally:
        await engine.dispose()


@contextlib.asynccontextmanager
async def open_stream(http: httpx.AsyncClient, url: str, headers: dict[str, str]) -> AsyncIterator[Any]:
    """A stream whose status is known (200: its first event has arrived, so it holds its slot)."""
    async with http.stream("GET", url, headers=headers) as response:
        lines = response.aiter_lines()
        if response.status_code == 200:
            while not (await anext(lines)).startswith("id: "):
                pass
        yield response, lines


async def ids(lines: AsyncIterator[str], n: int, within: float = 10) -> list[int]:
    found: list[int] = []

    async def read() -> None:
        async for line in lines:
            if line.startswith("id: "):
                found.append(int(line[4:]))
                if len(found) == n:
                    return

    await asyncio.wait_for(read(), within)
    return found


@pytest.fixture
async def limited(pg_url: str) -> AsyncIterator[str]:
    settings = make_settings(pg_url, max_streams=3, max_streams_per_license=2, replay_limit=5)
    async with serving(create_app(settings)) as url:
        yield url


async def test_a_full_process_answers_503_with_a_jittered_retry_after_until_a_stream_ends(limited: str) -> None:
    licenses = [new_license() for _ in range(3)]
    async with httpx.AsyncClient(timeout=10) as http, contextlib.AsyncExitStack() as streams:
        for license_id in licenses:
            response, _ = await streams.enter_async_context(
                open_stream(http, events_url(limited, license_id), auth(license_id))
            )
            assert response.status_code == 200
        late = new_license()
        refusals = [await http.get(events_url(limited, late), headers=auth(late)) for _ in range(12)]
        assert {r.status_code for r in refusals} == {503}
        waits = [int(r.headers["retry-after"]) for r in refusals]
        assert all(5 <= wait <= 30 for wait in waits)
        assert len(set(waits)) > 1, "the same Retry-After for every refused client"
        await streams.aclose()  # three clients leave ...
        async with open_stream(http, events_url(limited, late), auth(late)) as (response, _):
            assert response.status_code == 200  # ... and their slots are free again


async def test_the_reference_client_waits_at_least_the_retry_after_of_a_refusal(limited: str) -> None:
    licenses = [new_license() for _ in range(3)]
    async with httpx.AsyncClient(timeout=10) as http, contextlib.AsyncExitStack() as streams:
        for license_id in licenses:
            await streams.enter_async_context(open_stream(http, events_url(limited, license_id), auth(license_id)))
        late = new_license()
        client = LicenseClient(limited, late, token_for(late), min_backoff=0.01)
        with pytest.raises(httpx.HTTPStatusError):
            await anext(client.connect_once())
        assert client.reconnect_delay(1) >= 5


async def test_a_license_over_its_stream_limit_answers_429_while_other_licenses_connect(limited: str) -> None:
    busy, other = new_license(), new_license()
    async with httpx.AsyncClient(timeout=10) as http:
        async with (
            open_stream(http, events_url(limited, busy), auth(busy)) as (first, _),
            open_stream(http, events_url(limited, busy), auth(busy)) as (second, _),
        ):
            assert (first.status_code, second.status_code) == (200, 200)
            third = await http.get(events_url(limited, busy), headers=auth(busy))
            assert third.status_code == 429
            assert 5 <= int(third.headers["retry-after"]) <= 30
            async with open_stream(http, events_url(limited, other), auth(other)) as (elsewhere, _):
                assert elsewhere.status_code == 200
        async with open_stream(http, events_url(limited, busy), auth(busy)) as (again, _):
            assert again.status_code == 200


async def test_a_client_further_behind_than_the_replay_limit_gets_the_current_state_then_live_events(
    limited: str, pg_url: str
) -> None:
    license_id = new_license()
    await seed(pg_url, license_id, 12)
    async with httpx.AsyncClient(timeout=10) as http:
        # 7 behind with a limit of 5: the state of seq 12, not seqs 6 to 12.
        url = events_url(limited, license_id)
        async with http.stream("GET", url, headers=auth(license_id, **{"last-event-id": "5"})) as response:
            lines = response.aiter_lines()
            assert await ids(lines, 1) == [12]
            assert await update(limited, license_id, "canceled") == 13
            assert await ids(lines, 1) == [13]
        # 5 behind: within the limit, replayed one by one.
        async with http.stream("GET", url, headers=auth(license_id, **{"last-event-id": "8"})) as response:
            assert await ids(response.aiter_lines(), 5) == [9, 10, 11, 12, 13]


async def test_a_client_ahead_of_the_license_gets_the_current_state_then_every_live_event(limited: str) -> None:
    """A Last-Event-ID beyond the license's seq (a restored database, a forged header) used to
    hide every live event up to that number from the client."""
    license_id = new_license()
    assert await update(limited, license_id) == 1
    async with httpx.AsyncClient(timeout=10) as http:
        headers = auth(license_id, **{"last-event-id": "9999"})
        async with http.stream("GET", events_url(limited, license_id), headers=headers) as response:
            lines = response.aiter_lines()
            assert await ids(lines, 1) == [1]
            assert await update(limited, license_id, "past_due") == 2
            assert await ids(lines, 1) == [2]


NOT_A_SEQ = ["9223372036854775808", "18446744073709551616", "9" * 400, "-1", "+5", "1_000", "٣", "0x10", "1e3", "seven"]


async def test_a_last_event_id_that_is_not_a_seq_is_400_never_500(db_url: str) -> None:
    license_id = new_license()
    async with serving(create_app(make_settings(db_url))) as url, httpx.AsyncClient(timeout=10) as http:
        for value in NOT_A_SEQ:
            headers = [*auth(license_id).items(), ("last-event-id", value.encode())]
            header = await http.get(events_url(url, license_id), headers=headers)
            params = {"lastEventId": value}
            query = await http.get(events_url(url, license_id), headers=auth(license_id), params=params)
            assert (header.status_code, query.status_code) == (400, 400), value


async def test_the_largest_seq_as_resume_point_is_ahead_of_every_license_on_both_databases(db_url: str) -> None:
    license_id = new_license()
    async with serving(create_app(make_settings(db_url))) as url, httpx.AsyncClient(timeout=10) as http:
        headers = auth(license_id, **{"last-event-id": str(2**63 - 1)})
        async with http.stream("GET", events_url(url, license_id), headers=headers) as response:
            assert response.status_code == 200
            assert await ids(response.aiter_lines(), 1) == [0]


async def test_a_license_id_no_license_can_have_is_400_not_a_database_error(pg_url: str) -> None:
    async with serving(create_app(make_settings(pg_url))) as url, httpx.AsyncClient(timeout=10) as http:
        for license_id in ("lic_\x00", "l" * 201):
            for path in (f"/api/licenses/{quote(license_id)}/events", f"/api/licenses/{quote(license_id)}"):
                response = await http.get(url + path, headers=auth(license_id))
                assert response.status_code == 400, response.text
        longest = "l" * 200
        assert (await http.get(f"{url}/api/licenses/{longest}", headers=auth(longest))).status_code == 200
