"""Settings: read and validated once, at start-up, from the environment."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Literal, cast, get_args
from urllib.parse import unquote, urlsplit

TransportName = Literal["redis", "poll", "memory"]
LogFormat = Literal["text", "json"]
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///./license-broker.db"
DEFAULT_ENTITLED_STATUSES = ("trialing", "active", "past_due")
# REDIS_URL schemes that name a Redis Cluster (sharded pub/sub) rather than one server.
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")

# Only ever used when BROKER_DEV=1 (what `make run` sets) and the real setting is absent.
DEV_WEBHOOK_SECRET = "whsec_development_only_do_not_use_in_production"
DEV_TOKEN_SECRET = "development-only-stream-token-secret-do-not-use"


class SettingsError(Exception):
    """A missing or malformed setting; the message names the variable."""


@dataclass(frozen=True)
class Settings:
    database_url: str = DEFAULT_DATABASE_URL
    redis_url: str | None = None
    transport: TransportName = "memory"
    poll_interval: float = 2.0
    webhook_secrets: tuple[str, ...] = ()
    token_secret: str | None = None
    webhook_tolerance: int = 300
    heartbeat_interval: float = 15.0
    retry_ms: int = 2000
    client_buffer: int = 256
    send_timeout: float = 30.0
    replay_batch: int = 500
    db_pool_size: int = 10
    # psycopg prepares a statement after 5 executions; PgBouncer in transaction mode (before 1.21,
    # or without max_prepared_statements) cannot follow them from one server connection to the next.
    db_prepared_statements: bool = True
    entitled_statuses: frozenset[str] = field(default_factory=lambda: frozenset(DEFAULT_ENTITLED_STATUSES))
    max_connection_lifetime: float | None = None
    # Rows of subscription_event_logs older than this are pruned (each license's latest row is
    # always kept); None keeps everything.
    event_log_retention_days: float | None = None
    dev: bool = False
    # The command's servers: where they listen (PORT unset: each command's own port), how many
    # worker processes, and how they log.
    host: str = "127.0.0.1"
    port: int | None = None
    workers: int = 1
    log_format: LogFormat = "text"
    log_level: str = "INFO"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        dev = _bool(env, "BROKER_DEV", False)
        redis_url = _str(env, "REDIS_URL")
        if redis_url is not None:
            if redis_url.startswith(tuple(f"{scheme}://" for scheme in CLUSTER_SCHEMES)):
                parse_cluster_url(redis_url)
            elif not redis_url.startswith(("redis://", "rediss://", "unix://")):
                raise SettingsError(
                    f"REDIS_URL: expected redis://host:port/db or redis+cluster://host:port,..., got {redis_url!r}"
                )
        transport = _str(env, "BROKER_TRANSPORT") or ("redis" if redis_url else "memory")
        if transport not in get_args(TransportName):
            raise SettingsError(f"BROKER_TRANSPORT: expected one of redis, poll, memory, got {transport!r}")
        if transport == "redis" and redis_url is None:
            raise SettingsError("REDIS_URL: required when BROKER_TRANSPORT=redis")
        secrets = tuple(s.strip() for s in (_str(env, "STRIPE_WEBHOOK_SECRET") or "").split(",") if s.strip())
        for secret in secrets:
            if not secret.startswith("whsec_"):
                raise SettingsError("STRIPE_WEBHOOK_SECRET: each secret must start with whsec_")
        token_secret = _str(env, "STREAM_TOKEN_SECRET")
        if token_secret is not None and len(token_secret) < 32:
            # HS256 wants a key of at least 256 bits (RFC 7518 3.2).
            raise SettingsError("STREAM_TOKEN_SECRET: must be at least 32 characters")
        if dev:
            secrets = secrets or (DEV_WEBHOOK_SECRET,)
            token_secret = token_secret or DEV_TOKEN_SECRET
        statuses = frozenset(
            s.strip() for s in (_str(env, "ENTITLED_STATUSES") or ",".join(DEFAULT_ENTITLED_STATUSES)).split(",")
        ) - {""}
        lifetime = _float(env, "STREAM_MAX_CONNECTION_LIFETIME", 0.0, minimum=0.0)
        log_format = (_str(env, "LOG_FORMAT") or "text").lower()
        if log_format not in get_args(LogFormat):
            raise SettingsError(f"LOG_FORMAT: expected text or json, got {log_format!r}")
        log_level = (_str(env, "LOG_LEVEL") or "INFO").upper()
        if log_level not in LOG_LEVELS:
            raise SettingsError(f"LOG_LEVEL: expected one of {', '.join(LOG_LEVELS)}, got {log_level!r}")
        port = _float(env, "PORT", 0, minimum=1)
        retention = _float(env, "EVENT_LOG_RETENTION_DAYS", 0.0, minimum=0.0)
        return cls(
            database_url=normalize_database_url(_str(env, "DATABASE_URL") or DEFAULT_DATABASE_URL),
            redis_url=redis_url,
            transport=cast(TransportName, transport),
            poll_interval=_float(env, "BROKER_POLL_INTERVAL", 2.0, minimum=0.01),
            webhook_secrets=secrets,
            token_secret=token_secret,
            webhook_tolerance=int(_float(env, "STRIPE_WEBHOOK_TOLERANCE", 300, minimum=1)),
            heartbeat_interval=_float(env, "STREAM_HEARTBEAT_INTERVAL", 15.0, minimum=0.01),
            retry_ms=int(_float(env, "STREAM_RETRY_MS", 2000, minimum=0)),
            client_buffer=int(_float(env, "STREAM_CLIENT_BUFFER", 256, minimum=1)),
            send_timeout=_float(env, "STREAM_SEND_TIMEOUT", 30.0, minimum=0.01),
            replay_batch=int(_float(env, "STREAM_REPLAY_BATCH", 500, minimum=1)),
            db_pool_size=int(_float(env, "DATABASE_POOL_SIZE", 10, minimum=1)),
            db_prepared_statements=_bool(env, "DATABASE_PREPARED_STATEMENTS", True),
            entitled_statuses=statuses,
            max_connection_lifetime=lifetime or None,
            event_log_retention_days=retention or None,
            dev=dev,
            host=_str(env, "HOST") or "127.0.0.1",
            port=int(port) or None,
            workers=int(_float(env, "WEB_CONCURRENCY", 1, minimum=1)),
            log_format=cast(LogFormat, log_format),
            log_level=log_level,
        )

    def with_(self, **changes: object) -> Settings:
        return replace(self, **changes)  # type: ignore[arg-type]

    def require_webhook(self) -> None:
        if not self.webhook_secrets:
            raise SettingsError("STRIPE_WEBHOOK_SECRET: required by the webhook app (whsec_..., comma-separated)")

    def require_stream(self) -> None:
        if not self.token_secret:
            raise SettingsError("STREAM_TOKEN_SECRET: required by the stream app")

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def redis_cluster(self) -> bool:
        return self.redis_url is not None and self.redis_url.partition("://")[0] in CLUSTER_SCHEMES


@dataclass(frozen=True)
class ClusterAddress:
    """What a redis+cluster:// URL names: seed nodes (any reachable one reveals the rest) and auth."""

    nodes: tuple[tuple[str, int], ...]
    username: str | None = None
    password: str | None = None
    ssl: bool = False


def parse_cluster_url(url: str) -> ClusterAddress:
    """`redis+cluster://[user:password@]host:port[,host:port...]`; `rediss+cluster://` for TLS."""
    scheme, _, rest = url.partition("://")
    if scheme not in CLUSTER_SCHEMES:
        raise SettingsError(f"REDIS_URL: expected redis+cluster://host:port,..., got scheme {scheme!r}")
    # urlsplit cannot take several host:port pairs; split the credentials off by hand.
    userinfo, at, hosts = rest.rpartition("@")
    if not at:
        userinfo, hosts = "", rest
    hosts = hosts.split("/", 1)[0].split("?", 1)[0]
    username, password = None, None
    if userinfo:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    nodes: list[tuple[str, int]] = []
    for part in hosts.split(","):
        try:
            split = urlsplit(f"//{part.strip()}")
            host, port = split.hostname, split.port
        except ValueError:
            host, port = None, None
        if not host or port is None:
            raise SettingsError(f"REDIS_URL: expected host:port for each cluster node, got {part!r}")
        nodes.append((host, port))
    return ClusterAddress(tuple(nodes), username, password, ssl=scheme == "rediss+cluster")


def normalize_database_url(url: str) -> str:
    """Accept the URLs users write (postgresql://, sqlite:///) and pick the async drivers."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise SettingsError(f"DATABASE_URL: expected a URL such as postgresql://host/db, got {url!r}")
    if scheme in ("postgres", "postgresql", "postgresql+psycopg", "postgresql+psycopg_async"):
        return f"postgresql+psycopg://{rest}"
    if scheme in ("sqlite", "sqlite+aiosqlite"):
        return f"sqlite+aiosqlite://{rest}"
    raise SettingsError(f"DATABASE_URL: unsupported scheme {scheme!r} (use postgresql:// or sqlite:///)")


def _str(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name, "").strip()
    return value or None


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    value = _str(env, name)
    if value is None:
        return default
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{name}: expected true or false, got {value!r}")


def _float(env: Mapping[str, str], name: str, default: float, *, minimum: float) -> float:
    value = _str(env, name)
    if value is None:
        return default
    try:
        number = float(value)
    except ValueError:
        raise SettingsError(f"{name}: expected a number, got {value!r}") from None
    if not number >= minimum:
        raise SettingsError(f"{name}: must be at least {minimum}, got {value!r}")
    return number
