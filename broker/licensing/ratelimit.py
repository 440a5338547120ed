"""Failed attempts, counted per bucket (a client address, a key) in fixed windows: what keeps a
key or a Checkout Session id from being guessed by trying. Only failures count, so a buyer who
types the right key is never locked out by having succeeded before; a bucket that has failed
`attempts` times in its window is refused (429, Retry-After: the rest of the window).

One small interface, two implementations: this process's own counts (bounded: at most
`max_buckets`, the oldest dropped first, windows expire), and Redis's when REDIS_URL is set, so
that every stream process behind a load balancer shares them. While Redis does not answer, the
process counts on its own rather than refusing or admitting everyone."""

from __future__ import annotations

import ipaddress
import logging
import math
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from broker.settings import DEFAULT_REDIS_KEY_PREFIX, Settings, parse_cluster_url

log = logging.getLogger("broker.ratelimit")


@dataclass(frozen=True, slots=True)
class Limit:
    name: str  # the scope, part of every bucket's name
    attempts: int  # failures allowed per window
    window: float  # seconds


# Typing a key wrong ten times in a minute is already a lot for a person; a script gets 10 guesses
# a minute per address against 2^105 keys. Checkout Session ids are looked up once per purchase.
ACTIVATIONS = Limit("activation", 10, 60.0)
SESSIONS = Limit("session", 20, 60.0)
# Buying and trying from the app create rows, so there every attempt counts, not only failures: per
# address, 20 checkouts in 10 minutes (besides at most CHECKOUT_MAX_PENDING unpaid at once, counted
# in the database) and 10 trials an hour (a trial is one per machine, ever: more is a script).
CHECKOUTS = Limit("checkout", 20, 600.0)
TRIALS = Limit("trial", 10, 3600.0)
# A portal session is a request to Stripe's API: 20 in 10 minutes per license is plenty for a person.
PORTALS = Limit("portal", 20, 600.0)


def address_bucket(host: str | None) -> str:
    """A client address as a bucket: IPv6 by its /64 (what one subscriber is usually given)."""
    if not host:
        return "addr:unknown"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return f"addr:{host[:64]}"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return f"addr:{ip.ipv4_mapped}"
        return f"addr:{ipaddress.ip_network(f'{ip}/64', strict=False)}"
    return f"addr:{ip}"


class RateLimiter(ABC):
    @abstractmethod
    async def retry_after(self, limit: Limit, buckets: Sequence[str]) -> int | None:
        """Seconds until every bucket may try again, or None when none is over its limit."""

    @abstractmethod
    async def failed(self, limit: Limit, buckets: Sequence[str]) -> None:
        """Count one failed attempt in each bucket."""

    async def close(self) -> None:
        """Release connections; idempotent."""


class MemoryRateLimiter(RateLimiter):
    def __init__(self, *, max_buckets: int = 50_000, clock: Callable[[], float] = time.time) -> None:
        self.max_buckets = max_buckets
        self._clock = clock
        # bucket -> [window start, failures], least recently failed first.
        self._counts: OrderedDict[str, list[float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._counts)

    async def retry_after(self, limit: Limit, buckets: Sequence[str]) -> int | None:
        now = self._clock()
        waits = []
        for bucket in buckets:
            entry = self._counts.get(f"{limit.name}:{bucket}")
            if entry is not None and now < entry[0] + limit.window and entry[1] >= limit.attempts:
                waits.append(entry[0] + limit.window - now)
        return max(1, math.ceil(max(waits))) if waits else None

    async def failed(self, limit: Limit, buckets: Sequence[str]) -> None:
        now = self._clock()
        for bucket in buckets:
            name = f"{limit.name}:{bucket}"
            entry = self._counts.get(name)
            if entry is None or now >= entry[0] + limit.window:
                entry = [now, 0.0]
            entry[1] += 1
            self._counts[name] = entry
            self._counts.move_to_end(name)
        # Bounded: under a flood of addresses the oldest buckets go first (an attacker who can
        # spend that many addresses gains a fresh window on the first ones, not memory).
        while len(self._counts) > self.max_buckets:
            self._counts.popitem(last=False)


class RedisRateLimiter(RateLimiter):
    """Counts in Redis: `INCR` of `<REDIS_KEY_PREFIX>rate:<scope>:<bucket>:<window number>`, which
    expires with its window. Redis errors fall back to `local` for a few seconds."""

    def __init__(
        self,
        client: Any,
        *,
        prefix: str = DEFAULT_REDIS_KEY_PREFIX,
        local: MemoryRateLimiter | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._client = client
        self._prefix = f"{prefix}rate:"
        self._local = local or MemoryRateLimiter(clock=clock)
        self._clock = clock
        self._down_until = 0.0

    def _key(self, limit: Limit, bucket: str, now: float) -> tuple[str, float]:
        number = int(now // limit.window)
        return f"{self._prefix}{limit.name}:{bucket}:{number}", (number + 1) * limit.window

    def _unavailable(self, exc: Exception) -> None:
        if time.monotonic() >= self._down_until:
            log.warning("rate limits counted in this process only for now: Redis: %s", exc)
        self._down_until = time.monotonic() + 5.0

    async def retry_after(self, limit: Limit, buckets: Sequence[str]) -> int | None:
        if time.monotonic() < self._down_until:
            return await self._local.retry_after(limit, buckets)
        now = self._clock()
        keys = [self._key(limit, bucket, now) for bucket in buckets]
        try:
            pipe = self._client.pipeline(transaction=False)
            for key, _ in keys:
                pipe.get(key)
            counts = await pipe.execute()
            waits = [ends - now for (_, ends), n in zip(keys, counts, strict=True) if n and int(n) >= limit.attempts]
        except Exception as exc:
            self._unavailable(exc)
            return await self._local.retry_after(limit, buckets)
        return max(1, math.ceil(max(waits))) if waits else None

    async def failed(self, limit: Limit, buckets: Sequence[str]) -> None:
        if time.monotonic() < self._down_until:
            await self._local.failed(limit, buckets)
            return
        now = self._clock()
        try:
            # One round trip; the count lives as long as its window.
            pipe = self._client.pipeline(transaction=False)
            for bucket in buckets:
                key, ends = self._key(limit, bucket, now)
                pipe.incr(key)
                pipe.expireat(key, math.ceil(ends) + 1)
            await pipe.execute()
        except Exception as exc:
            self._unavailable(exc)
            await self._local.failed(limit, buckets)

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()


def create_rate_limiter(settings: Settings) -> RateLimiter:
    """Redis's counts with REDIS_URL (no I/O until first used), else this process's."""
    if settings.redis_url is None:
        return MemoryRateLimiter()
    options: dict[str, Any] = {"socket_connect_timeout": 1, "socket_timeout": 1}
    if settings.redis_cluster:
        from redis.asyncio.cluster import ClusterNode, RedisCluster

        address = parse_cluster_url(settings.redis_url)
        cluster = RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in address.nodes],
            username=address.username,
            password=address.password,
            ssl=address.ssl,
            **options,
        )
        return RedisRateLimiter(cluster, prefix=settings.redis_key_prefix)
    import redis.asyncio as aioredis

    return RedisRateLimiter(aioredis.Redis.from_url(settings.redis_url, **options), prefix=settings.redis_key_prefix)
