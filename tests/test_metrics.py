"""/metrics after real events: what an operator scrapes (see docs/operations.md)."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
from license_broker_client import LicenseClient

from license_broker.embedded import create_app
from tests.support.licenses import make_settings, new_license, post_event, token_for
from tests.support.metrics import scrape, value
from tests.support.processes import serving
from tests.support.waiting import async_wait_until
from webhook.samples import SampleEvents


async def test_metrics_count_webhooks_streams_deliveries_replays_and_the_delivery_lag(
    pg_url: str, redis_url: str
) -> None:
    license_id = new_license()
    # The sweep far slower than the test: every live event is delivered through Redis.
    settings = make_settings(pg_url, transport="redis", redis_url=redis_url, poll_interval=600)
    async with serving(create_app(settings)) as url, httpx.AsyncClient() as http:
        before = await scrape(http, url)
        received: list[dict[str, Any]] = []
        client = LicenseClient(url, license_id, token_for(license_id))
        task = asyncio.create_task(client.run(received.append))
        try:
            await async_wait_until(lambda: len(received) == 1, 10, "the first state")
            during = await scrape(http, url)
            events = SampleEvents(license_id).for_action("pay")
            outcomes: list[str] = []
            paid = 0
            for event in events:
                response = await post_event(http, url, event)
                assert response.status_code == 200
                outcomes.append(response.json()["outcome"])
                paid = max(paid, response.json().get("seq", 0))
            assert (await post_event(http, url, events[-1])).status_code == 200  # a duplicate delivery
            bad = await http.post(f"{url}/api/stripe/webhooks", content=b"{}", headers={"stripe-signature": "t=1,v1=0"})
            assert bad.status_code == 400
            await async_wait_until(lambda: received[-1]["seq"] == paid, 10, "every live event")
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        # A client resuming from 0 is sent every event again, from the database.
        resumed = LicenseClient(url, license_id, token_for(license_id), last_event_id=0)
        async for event in resumed.connect_once():
            if event["seq"] == paid:
                break
        after = await scrape(http, url)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert value(during, "license_broker_open_streams") - value(before, "license_broker_open_streams") == 1
    for outcome in set(outcomes):
        assert delta("license_broker_webhooks_total", outcome=outcome) == outcomes.count(outcome)
    assert delta("license_broker_webhooks_total", outcome="duplicate") == 1
    assert delta("license_broker_webhooks_total", outcome="rejected") == 1
    # Every outcome is exported, at 0 until it happens, so that alerts can refer to it.
    for outcome in ("stale", "ignored", "unmatched", "pending", "error"):
        assert ("license_broker_webhooks_total", (("outcome", outcome),)) in after
    assert paid >= 1 and received[-1]["entitled"] is True
    assert delta("license_broker_events_delivered_total") == paid
    assert delta("license_broker_events_replayed_total") == paid
    assert ("license_broker_publish_failures_total", ()) in after
    assert value(during, "license_broker_transport_up", transport="redis") == 1
    # One observation per message the transport delivered (one per event). How long they took is
    # the benchmark's to measure, not this test's.
    assert delta("license_broker_delivery_lag_seconds_count") == paid
    assert delta("license_broker_delivery_lag_seconds_bucket", le="+Inf") == paid
    assert delta("license_broker_delivery_lag_seconds_sum") >= 0
