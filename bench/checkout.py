"""Click-to-entitled: an app asks the broker for a checkout (POST /api/checkout), follows its
license's stream with the machine token it got, and the buyer pays; the time from the checkout's
payment webhook (`checkout.session.completed`, posted the moment before) to the app's stream
holding the state it unlocks on (`entitled: true`, the seq the webhook answered). Stripe's API is a
local stand-in that makes Checkout Sessions and tells the price's type, nothing more."""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from bench.clients import SseClient, WebhookConnection
from bench.measure import HOST, Endpoint, LatencyResult, _port
from localcluster import free_port
from webhook.samples import SampleEvents
from webhook.signature import sign

PRICE = "price_bench_monthly"
API_KEY = "sk_test_bench"


def _stripe_app() -> Starlette:
    async def price(request: Request) -> JSONResponse:
        found = {"id": request.path_params["price"], "object": "price", "type": "recurring"}
        return JSONResponse(found | {"recurring": {"interval": "month", "interval_count": 1}})

    async def session(request: Request) -> JSONResponse:
        session_id = "cs_test_bench_" + secrets.token_hex(12)
        expires_at = int(time.time()) + 86400
        made = {"id": session_id, "object": "checkout.session", "status": "open", "expires_at": expires_at}
        return JSONResponse(made | {"url": f"https://checkout.invalid/{session_id}"})

    return Starlette(
        routes=[
            Route("/v1/prices/{price}", price, methods=["GET"]),
            Route("/v1/checkout/sessions", session, methods=["POST"]),
        ]
    )


@asynccontextmanager
async def fake_stripe() -> AsyncIterator[str]:
    """The stand-in, served in this process; its base URL (STRIPE_API_BASE)."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(_stripe_app(), host=HOST, port=port, log_level="warning"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    try:
        yield f"http://{HOST}:{port}"
    finally:
        server.should_exit = True
        await task


def stream_env(stripe_base: str, stream_port: int) -> dict[str, str]:
    """What a stream process needs to make checkouts."""
    return {
        "LICENSE_KEY_SECRET": "bench-license-key-secret-" + secrets.token_hex(16),
        "STRIPE_API_KEY": API_KEY,
        "STRIPE_API_BASE": stripe_base,
        "STRIPE_PRICES": PRICE,
        "PUBLIC_URL": f"http://{HOST}:{stream_port}",
    }


def _paid(license_id: str, session_id: str) -> bytes:
    """Stripe's checkout.session.completed for the session, paid (a subscription's Checkout)."""
    event = SampleEvents(license_id).checkout_completed(int(time.time()))
    event["data"]["object"]["id"] = session_id
    return orjson.dumps(event)


def _follower(started: dict[str, Any], stream: Endpoint) -> Callable[[], SseClient]:
    """The app's stream, opened with the machine token the checkout gave it."""
    return lambda: SseClient(started["license_id"], started["token"], HOST, _port(stream.url), None)


async def click_to_entitled(
    *, webhook: Endpoint, stream: Endpoint, webhook_secret: str, purchases: int, label: str
) -> tuple[LatencyResult, dict[str, Any]]:
    """`purchases` buys one after another, each from an address of its own (X-Forwarded-For, which
    uvicorn takes from 127.0.0.1), as buyers are."""
    latencies: list[float] = []
    checkout_ms: list[float] = []
    lost = rejected = 0
    load = os.getloadavg()
    began = time.monotonic()
    loop = asyncio.get_running_loop()
    poster = await WebhookConnection(HOST, _port(webhook.url)).open()
    async with httpx.AsyncClient(base_url=stream.url, timeout=30) as client:
        for i in range(purchases):
            started = time.monotonic()
            answer = await client.post(
                "/api/checkout",
                json={"fingerprint": secrets.token_hex(32), "name": f"bench {i}"},
                headers={"x-forwarded-for": f"10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}"},
            )
            checkout_ms.append((time.monotonic() - started) * 1000)
            if answer.status_code != 201:
                rejected += 1
                continue
            body = answer.json()
            license_id, session_id = body["license_id"], body["checkout_url"].rsplit("/", 1)[1]
            _, app = await loop.create_connection(_follower(body, stream), HOST, _port(stream.url))
            try:
                await asyncio.wait_for(app.first_event, 30)  # the pending license's state: not entitled
                payload = _paid(license_id, session_id)
                posted = await poster.post(license_id, payload, sign(payload, webhook_secret))
                if posted.status != 200 or posted.seq is None:
                    rejected += 1
                    continue
                deadline = time.monotonic() + 10
                while not (arrived := [t for seq, t in app.received if seq == posted.seq]):
                    if time.monotonic() > deadline:
                        break
                    await asyncio.sleep(0.001)
                if arrived:
                    latencies.append((arrived[0] - posted.sent_ns) / 1e6)
                else:
                    lost += 1
            finally:
                app.close()
    await poster.close()
    result = LatencyResult(
        transport=label,
        clients=1,
        events=purchases - rejected,
        latencies_ms=latencies,
        lost=lost,
        duplicates=0,
        out_of_order=0,
        rejected=rejected,
        not_applied=0,
        stream_pids=[stream.pid],
        posting="one purchase at a time",
        events_per_s=round(purchases / (time.monotonic() - began), 1),
        load_average=(load[0], load[1], load[2]),
    )
    checkout_ms.sort()
    detail = {
        "purchases": purchases,
        "rejected": rejected,
        "checkout_response_p50_ms": round(checkout_ms[len(checkout_ms) // 2], 2) if checkout_ms else None,
        "checkout_response_p99_ms": round(checkout_ms[int(len(checkout_ms) * 0.99)], 2) if checkout_ms else None,
    }
    return result, detail
