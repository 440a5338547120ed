"""Failed-attempt limits: in one process (bounded memory, windows that expire) and shared through
Redis by every stream process (and what happens while Redis is away)."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable

import httpx
import pytest
import redis.asyncio as aioredis

from broker.licensing import keys
from broker.licensing.ratelimit import Limit, MemoryRateLimiter, RedisRateLimiter, address_bucket
from tests.support.activations import fingerprint, keyed_env
from tests.support.licenses import REDIS_KEY_PREFIX
from tests.support.processes import Process, process_env
from tests.support.waiting import free_port


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def scope(attempts: int = 3, window: float = 60.0) -> Limit:
    return Limit(f"test-{uuid.uuid4().hex[:8]}", attempts, window)


async def test_failures_block_a_bucket_until_its_window_ends() -> None:
    clock = Clock()
    limiter = MemoryRateLimiter(clock=clock)
    limit = scope(attempts=3, window=60)
    for _ in range(2):
        await limiter.failed(limit, ["addr:a", "key:k"])
    assert await limiter.retry_after(limit, ["addr:a"]) is None
    clock.now += 15
    await limiter.failed(limit, ["addr:a"])
    assert await limiter.retry_after(limit, ["addr:a"]) == 45
    assert await limiter.retry_after(limit, ["addr:b", "key:k"]) is None  # others are free
    assert await limiter.retry_after(limit, ["addr:b", "addr:a"]) == 45  # any blocked bucket blocks
    clock.now += 45
    assert await limiter.retry_after(limit, ["addr:a"]) is None
    await limiter.failed(limit, ["addr:a"])  # a new window, counting from one
    assert await limiter.retry_after(limit, ["addr:a"]) is None


async def test_the_memory_limiter_holds_a_bounded_number_of_buckets() -> None:
    limiter = MemoryRateLimiter(max_buckets=100)
    limit = scope(attempts=1)
    for i in range(10_000):
        await limiter.failed(limit, [f"addr:{i}"])
    assert len(limiter) == 100
    assert await limiter.retry_after(limit, ["addr:9999"]) is not None  # the newest are kept
    assert await limiter.retry_after(limit, ["addr:0"]) is None  # the oldest went first


def test_an_ipv6_subscriber_is_one_address_per_64() -> None:
    assert address_bucket("2001:db8:1:2::1") == address_bucket("2001:db8:1:2:ffff::9") == "addr:2001:db8:1:2::/64"
    assert address_bucket("2001:db8:1:3::1") != address_bucket("2001:db8:1:2::1")
    assert address_bucket("::ffff:192.0.2.1") == address_bucket("192.0.2.1") == "addr:192.0.2.1"
    assert address_bucket(None) == "addr:unknown"


async def test_redis_counts_are_shared_by_every_process(redis_url: str) -> None:
    limit = scope(attempts=4)
    first = RedisRateLimiter(aioredis.Redis.from_url(redis_url), prefix=REDIS_KEY_PREFIX)
    second = RedisRateLimiter(aioredis.Redis.from_url(redis_url), prefix=REDIS_KEY_PREFIX)
    try:
        for limiter in (first, second, first):
            await limiter.failed(limit, ["addr:shared"])
        assert await second.retry_after(limit, ["addr:shared"]) is None
        await second.failed(limit, ["addr:shared"])
        for limiter in (first, second):
            wait = await limiter.retry_after(limit, ["addr:shared"])
            assert wait is not None and 1 <= wait <= 60
        client = aioredis.Redis.from_url(redis_url)
        names = [name async for name in client.scan_iter(match=f"{REDIS_KEY_PREFIX}rate:{limit.name}:*")]
        assert len(names) == 1 and 0 < await client.ttl(names[0]) <= 61  # it expires with its window
        await client.aclose()
    finally:
        await first.close()
        await second.close()


async def test_limiters_with_other_key_prefixes_keep_their_own_counts(redis_url: str) -> None:
    """REDIS_KEY_PREFIX: a second deployment (or test run) on the same Redis counts apart."""
    limit = scope(attempts=1)
    ours = RedisRateLimiter(aioredis.Redis.from_url(redis_url), prefix=REDIS_KEY_PREFIX)
    theirs = RedisRateLimiter(aioredis.Redis.from_url(redis_url), prefix=f"other-{REDIS_KEY_PREFIX}")
    try:
        await ours.failed(limit, ["addr:shared"])
        assert await ours.retry_after(limit, ["addr:shared"]) is not None
        assert await theirs.retry_after(limit, ["addr:shared"]) is None
    finally:
        await ours.close()
        await theirs.close()


async def test_while_redis_is_away_the_process_counts_on_its_own(caplog: pytest.LogCaptureFixture) -> None:
    limit = scope(attempts=2)
    dead = RedisRateLimiter(aioredis.Redis(port=free_port(), socket_connect_timeout=0.5))
    try:
        with caplog.at_level(logging.WARNING, "broker.ratelimit"):
            assert await dead.retry_after(limit, ["addr:x"]) is None
            await dead.failed(limit, ["addr:x"])
            await dead.failed(limit, ["addr:x"])
            assert await dead.retry_after(limit, ["addr:x"]) is not None
        assert sum("counted in this process only" in r.message for r in caplog.records) == 1
    finally:
        await dead.close()


async def test_guesses_spread_over_two_stream_processes_share_one_limit(
    pg_url: str, redis_url: str, spawn: Callable[..., Process]
) -> None:
    env = process_env(pg_url, REDIS_URL=redis_url, **keyed_env())
    first, second = spawn("stream", env), spawn("stream", env)
    # uvicorn trusts X-Forwarded-For from 127.0.0.1 (FORWARDED_ALLOW_IPS' default): an address of
    # this test's own.
    address = {"x-forwarded-for": f"198.18.{uuid.uuid4().int % 250}.{uuid.uuid4().int % 250}"}
    codes = []
    async with httpx.AsyncClient(timeout=10) as client:
        for i in range(12):
            url = (first if i % 2 else second).url
            body = {"key": keys.display(keys.generate()), "fingerprint": fingerprint()}
            codes.append((await client.post(f"{url}/api/activations", json=body, headers=address)).status_code)
    assert codes == [403] * 10 + [429] * 2
