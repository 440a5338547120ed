"""/metrics off the public port (METRICS_PORT), behind METRICS_TOKEN, or else for this machine only;
/readyz from a result at most a second old."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from starlette.requests import Request

import broker.web.readiness
from broker.transports.memory import MemoryTransport
from broker.web.ops import local_peer
from broker.web.readiness import ReadinessProbe
from license_broker.embedded import create_app
from tests.support.licenses import make_settings
from tests.support.processes import run_module, serving
from tests.support.waiting import free_port
from webhook.app import create_app as create_webhook_app

METRICS_TOKEN = "metrics-token-0123456789"


async def test_with_a_metrics_port_metrics_leave_the_public_port_and_the_port_closes_with_the_app(
    pg_url: str,
) -> None:
    port = free_port()
    settings = make_settings(pg_url, metrics_port=port)
    for app in (create_app(settings), create_webhook_app(settings)):
        async with serving(app) as url, httpx.AsyncClient() as http:
            assert (await http.get(f"{url}/metrics")).status_code == 404
            private = await http.get(f"http://127.0.0.1:{port}/metrics")
            assert private.status_code == 200
            assert "license_broker_webhooks_total" in private.text
        async with httpx.AsyncClient() as http:
            with pytest.raises(httpx.ConnectError):  # released: the next app (or a restart) can take it
                await http.get(f"http://127.0.0.1:{port}/metrics", timeout=2)


async def test_with_a_metrics_token_metrics_answer_only_its_bearer(pg_url: str) -> None:
    app = create_app(make_settings(pg_url, metrics_token=METRICS_TOKEN))
    async with serving(app) as url, httpx.AsyncClient() as http:
        assert (await http.get(f"{url}/metrics")).status_code == 401
        wrong = await http.get(f"{url}/metrics", headers={"authorization": "Bearer metrics-token-0123456788"})
        assert (wrong.status_code, wrong.json()) == (401, {"error": "invalid token"})
        right = await http.get(f"{url}/metrics", headers={"authorization": f"Bearer {METRICS_TOKEN}"})
        assert right.status_code == 200 and "license_broker_open_streams" in right.text


# What a proxy on this machine adds when it forwards a request from elsewhere.
PROXIED = [
    {"x-forwarded-for": "203.0.113.9"},
    {"x-forwarded-for": "127.0.0.1"},  # claims loopback: still proxied
    {"forwarded": "for=203.0.113.9;proto=https"},
    {"x-forwarded-host": "127.0.0.1"},
    {"x-forwarded-proto": "https"},
    {"via": "1.1 proxy"},
    {"x-real-ip": "203.0.113.9"},
]


async def test_without_a_token_or_port_metrics_answer_only_this_machine(pg_url: str) -> None:
    for app in (create_app(make_settings(pg_url)), create_webhook_app(make_settings(pg_url))):
        async with serving(app) as url, httpx.AsyncClient() as http:
            local = await http.get(f"{url}/metrics")
            assert local.status_code == 200 and "license_broker_open_streams" in local.text
            for headers in PROXIED:
                refused = await http.get(f"{url}/metrics", headers=headers)
                assert refused.status_code == 403, headers
                assert "METRICS_TOKEN" in refused.json()["error"]


@pytest.mark.parametrize(
    ("client", "headers", "local"),
    [
        (("127.0.0.1", 5000), [], True),
        (("127.9.9.9", 5000), [], True),
        (("::1", 5000), [], True),
        (("192.0.2.7", 5000), [], False),  # another host (or a container's neighbour)
        (("172.17.0.1", 5000), [], False),  # docker's gateway: a published port
        (("::ffff:203.0.113.9", 5000), [], False),
        (None, [], False),
        (("127.0.0.1", 5000), [(b"forwarded", b"for=203.0.113.9")], False),
        (("127.0.0.1", 5000), [(b"x-forwarded-for", b"10.0.0.1")], False),
        (("127.0.0.1", 5000), [(b"via", b"1.1 cdn")], False),
    ],
)
def test_a_local_peer_is_a_loopback_address_that_no_proxy_forwarded(
    client: tuple[str, int] | None, headers: list[tuple[bytes, bytes]], local: bool
) -> None:
    scope = {"type": "http", "method": "GET", "path": "/metrics", "headers": headers, "client": client}
    assert local_peer(Request(scope)) is local


def test_a_metrics_port_with_several_workers_is_refused_with_one_line() -> None:
    env = {"PATH": "/usr/bin:/bin", "STREAM_TOKEN_SECRET": "x" * 32, "METRICS_PORT": "9100"}
    result = run_module("license_broker", "stream", "--workers", "2", env=env)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("license-broker: METRICS_PORT: ")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_readiness_is_checked_at_most_once_per_second_however_many_ask(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pings = 0
    release = asyncio.Event()

    async def slow_ping(engine: object) -> None:
        nonlocal pings
        pings += 1
        await release.wait()

    monkeypatch.setattr(broker.web.readiness, "ping", slow_ping)
    clock = Clock()
    probe = ReadinessProbe(None, MemoryTransport(), clock=clock)  # type: ignore[arg-type]
    waiting = [asyncio.create_task(probe.check()) for _ in range(50)]  # all during one slow check
    await asyncio.sleep(0)
    release.set()
    assert {(r.status, r.database) for r in await asyncio.gather(*waiting)} == {("ok", True)}
    assert pings == 1
    clock.now += 1.0
    await probe.check()
    assert pings == 1  # a second old: still served
    clock.now += 0.01
    await probe.check()
    assert pings == 2


async def test_a_flood_of_readyz_calls_costs_one_database_check(pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    pings = 0
    real_ping = broker.web.readiness.ping

    async def counting_ping(engine: object) -> None:
        nonlocal pings
        pings += 1
        await real_ping(engine)  # type: ignore[arg-type]

    monkeypatch.setattr(broker.web.readiness, "ping", counting_ping)
    async with serving(create_app(make_settings(pg_url))) as url, httpx.AsyncClient() as http:
        answers = await asyncio.gather(*(http.get(f"{url}/readyz") for _ in range(40)))
    assert {(a.status_code, a.json()["status"]) for a in answers} == {(200, "ok")}
    assert pings <= 2  # the calls may straddle a one-second boundary, never more
