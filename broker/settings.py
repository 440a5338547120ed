"""Settings: read and validated once, at start-up, from the environment."""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, cast, get_args
from urllib.parse import unquote, urlsplit

from broker.licensing.keys import KeyVault
from broker.signing.leases import DEFAULT_TTL, InvalidKey, LeaseKeys

TransportName = Literal["redis", "poll", "memory"]
DisputeScope = Literal["period", "license"]
LogFormat = Literal["text", "json"]
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///./license-broker.db"
DEFAULT_REDIS_KEY_PREFIX = "license-broker:"
DEFAULT_ENTITLED_STATUSES = ("trialing", "active", "past_due")
# REDIS_URL schemes that name a Redis Cluster (sharded pub/sub) rather than one server.
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")

# Subscriber tokens must carry this `aud` unless STREAM_TOKEN_AUDIENCE names another (broker.signing.tokens).
DEFAULT_TOKEN_AUDIENCE = "license-broker"
# Development mode (BROKER_DEV=1, what `make run` sets) generates its secrets at each start and
# prints them; each carries this mark, and so did the constants earlier versions used (they are
# public: they were in this repository). Outside development mode the apps refuse any secret that
# carries it (Settings.require_webhook / require_stream).
DEV_MARK = "development-only"
_DEV_SECRET = re.compile(r"development[-_]only", re.IGNORECASE)
DEFAULT_MAX_MACHINES = 3
# Machines a license can hold whatever its limit says (0, "no limit", included): the rows a key
# holder can create stay bounded.
MACHINES_CEILING = 1000
DEFAULT_MACHINE_TOKEN_TTL = 30 * 86400.0
# Buying from the app (broker.licensing.checkout): an unpaid checkout's license is removed after a day.
DEFAULT_CHECKOUT_PENDING_TTL = 86400.0
# Stripe's longest trial (subscription trial_end: at most two years out).
MAX_TRIAL_DAYS = 730.0
DEV_TRIAL_DAYS = 14.0
# The prices development mode offers on its own checkout page (license_broker.dev): no Stripe account.
DEV_PRICES = ("price_dev_monthly", "price_dev_lifetime")
MAX_PRICES = 20
# Schemes an "Open APP_NAME" link may not use: they open a browser, a file or a script, not an app.
RESERVED_SCHEMES = frozenset(
    {"http", "https", "file", "ftp", "ws", "wss", "data", "javascript", "vbscript", "blob", "about", "mailto", "chrome"}
)
_SCHEME = re.compile(r"[a-z][a-z0-9+.-]{0,31}")


class SettingsError(Exception):
    """A missing or malformed setting; the message names the variable."""


@dataclass(frozen=True)
class Settings:
    database_url: str = DEFAULT_DATABASE_URL
    redis_url: str | None = None
    # Starts every key the broker keeps in Redis (rate-limit counts): deployments, or test runs,
    # sharing one Redis keep their counts apart by giving each its own.
    redis_key_prefix: str = DEFAULT_REDIS_KEY_PREFIX
    transport: TransportName = "memory"
    poll_interval: float = 2.0
    webhook_secrets: tuple[str, ...] = ()
    # Signs the tokens the broker mints (`token`, development mode) and verifies.
    token_secret: str | None = None
    # During a rotation: still verify, never sign (STREAM_TOKEN_SECRET=new,old).
    previous_token_secrets: tuple[str, ...] = ()
    # Subscriber tokens: the longest lifetime accepted (seconds), the `aud` they must carry, and
    # the `iss` they must carry when set.
    token_max_ttl: float = 30 * 86400.0
    token_audience: str = DEFAULT_TOKEN_AUDIENCE
    token_issuer: str | None = None
    webhook_tolerance: int = 300
    heartbeat_interval: float = 15.0
    retry_ms: int = 2000
    client_buffer: int = 256
    send_timeout: float = 30.0
    replay_batch: int = 500
    # Admission: open streams per process (503 beyond) and per license in one process (429 beyond).
    max_streams: int = 20_000
    max_streams_per_license: int = 10
    # A client further behind than this many events gets the license's current state instead.
    replay_limit: int = 1000
    db_pool_size: int = 10
    # psycopg prepares a statement after 5 executions; PgBouncer in transaction mode (before 1.21,
    # or without max_prepared_statements) cannot follow them from one server connection to the next.
    db_prepared_statements: bool = True
    entitled_statuses: frozenset[str] = field(default_factory=lambda: frozenset(DEFAULT_ENTITLED_STATUSES))
    max_connection_lifetime: float | None = None
    # Rows of subscription_event_logs older than this are pruned (each license's latest row is
    # always kept); None keeps everything.
    event_log_retention_days: float | None = None
    # None: events of both modes change licenses (a warning at start-up); else only that mode's.
    stripe_livemode: bool | None = None
    # Connect accounts whose events count; an event with another `account` is ignored.
    stripe_accounts: frozenset[str] = frozenset()
    # Product or price ids that grant a license, optionally prefixed subscription: or perpetual:
    # (broker.stripe_ledger.ledger.Grants); empty: every purchase that names a license grants it.
    license_products: frozenset[str] = frozenset()
    # What a lost or fraudulent chargeback revokes: the period its payment paid for, or the license
    # (docs/stripe.md, "Disputes").
    dispute_revokes: DisputeScope = "license"
    # Optional: re-read objects from Stripe's API when an event is not newer than the ledger's.
    stripe_api_key: str | None = None
    stripe_api_base: str | None = None
    # Stripe's events are a few KiB; a larger body is refused (413) before it is buffered.
    webhook_max_body: int = 256 * 1024
    # /metrics on a port of its own (bound to metrics_host), or on the public port behind a Bearer token.
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    metrics_token: str | None = None
    # Signed leases (broker.signing.leases): off without a key.
    lease_keys: LeaseKeys | None = None
    lease_ttl: float = DEFAULT_TTL
    # License keys and machines (broker.licensing): off without LICENSE_KEY_SECRET.
    license_keys: KeyVault | None = None
    # Machines per license when neither the Checkout Session, the subscription nor the price says
    # (metadata.max_machines); 0: no limit.
    max_machines: int = DEFAULT_MAX_MACHINES
    # A machine not seen (holding a stream, activating, renewing) for this long is released; None: never.
    machine_ttl: float | None = None
    machine_token_ttl: float = DEFAULT_MACHINE_TOKEN_TTL
    # Where buyers reach this broker (the /activate page as Checkout's success_url), the app's name
    # on that page, and the URL scheme its "Open" link uses (<scheme>://activate?key=...).
    public_url: str | None = None
    app_name: str | None = None
    app_url_scheme: str | None = None
    # Buying from the app (docs/protocol.md): the Stripe prices an app may ask POST /api/checkout for
    # (the first is the default), how long an unpaid checkout's license is kept (seconds), the
    # length of a trial without a card (days, fractions allowed; None: no trials) and where the
    # Billing Portal sends the buyer back to (None: PUBLIC_URL/activate).
    stripe_prices: tuple[str, ...] = ()
    checkout_pending_ttl: float = DEFAULT_CHECKOUT_PENDING_TTL
    trial_days: float | None = None
    portal_return_url: str | None = None
    dev: bool = False
    # The command's servers: where they listen (PORT unset: each command's own port), how many
    # worker processes, and how they log.
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
                    "REDIS_URL: expected redis://host:port/db or redis+cluster://host:port,..., "
                    f"got {mask_password(redis_url)!r}"
                )
        redis_key_prefix = _str(env, "REDIS_KEY_PREFIX") or DEFAULT_REDIS_KEY_PREFIX
        if len(redis_key_prefix) > 64 or not redis_key_prefix.isprintable() or " " in redis_key_prefix:
            raise SettingsError(
                f"REDIS_KEY_PREFIX: expected up to 64 printable characters, no spaces, got {redis_key_prefix!r}"
            )
        transport = _str(env, "BROKER_TRANSPORT") or ("redis" if redis_url else "memory")
        if transport not in get_args(TransportName):
            raise SettingsError(f"BROKER_TRANSPORT: expected one of redis, poll, memory, got {transport!r}")
        if transport == "redis" and redis_url is None:
            raise SettingsError("REDIS_URL: required when BROKER_TRANSPORT=redis")
        webhook_secrets = tuple(s.strip() for s in (_str(env, "STRIPE_WEBHOOK_SECRET") or "").split(",") if s.strip())
        for secret in webhook_secrets:
            if not secret.startswith("whsec_"):
                raise SettingsError("STRIPE_WEBHOOK_SECRET: each secret must start with whsec_")
        token_secrets = [t.strip() for t in (_str(env, "STREAM_TOKEN_SECRET") or "").split(",") if t.strip()]
        if any(len(t) < 32 for t in token_secrets):
            # HS256 wants a key of at least 256 bits (RFC 7518 3.2).
            raise SettingsError("STREAM_TOKEN_SECRET: each secret must be at least 32 characters")
        token_secret = token_secrets[0] if token_secrets else None
        lease_keys = lease_keys_from_env(env)
        if dev:
            if lease_keys is not None:
                # A development server hands tokens to anyone on the machine and signs whatever
                # its buttons simulate: with the real key, those leases would unlock real apps.
                raise SettingsError(
                    "LICENSE_SIGNING_KEY: refused in development mode (BROKER_DEV=1 signs with a key "
                    "generated at each start); unset it, or run without BROKER_DEV"
                )
            # Generated at each start, never constants: a development secret that reached
            # production would be known to nobody. `serve` prints them (for `send` and `token`).
            webhook_secrets = webhook_secrets or (f"whsec_{DEV_MARK}_{secrets.token_hex(16)}",)
            token_secret = token_secret or f"{DEV_MARK}-{secrets.token_hex(24)}"
            lease_keys = LeaseKeys.generate(ephemeral=True)
        key_secrets = tuple(_list(env, "LICENSE_KEY_SECRET"))
        if any(len(k) < 32 for k in key_secrets):
            raise SettingsError("LICENSE_KEY_SECRET: each secret must be at least 32 characters")
        license_keys = KeyVault(key_secrets) if key_secrets else None
        if dev:
            # Per run: keys sealed by an earlier run cannot be opened (development data only).
            license_keys = license_keys or KeyVault((secrets.token_urlsafe(32),), ephemeral=True)
        token_max_ttl = _float(env, "STREAM_TOKEN_MAX_TTL", 30 * 86400.0, minimum=1)
        machine_token_ttl = _float(env, "MACHINE_TOKEN_TTL", min(DEFAULT_MACHINE_TOKEN_TTL, token_max_ttl), minimum=60)
        if machine_token_ttl > token_max_ttl:
            raise SettingsError(
                f"MACHINE_TOKEN_TTL: must be at most STREAM_TOKEN_MAX_TTL ({token_max_ttl:g}), "
                f"got {machine_token_ttl:g}"
            )
        machine_ttl = _float(env, "LICENSE_MACHINE_TTL", 0.0, minimum=0.0)
        if 0 < machine_ttl < 1:
            raise SettingsError("LICENSE_MACHINE_TTL: must be 0 (off) or at least 1 second")
        statuses = frozenset(
            s.strip() for s in (_str(env, "ENTITLED_STATUSES") or ",".join(DEFAULT_ENTITLED_STATUSES)).split(",")
        ) - {""}
        livemode = _str(env, "STRIPE_LIVEMODE")
        accounts = _list(env, "STRIPE_ACCOUNTS")
        for account in accounts:
            if not account.startswith("acct_"):
                raise SettingsError(f"STRIPE_ACCOUNTS: expected acct_... ids, got {account!r}")
        products = _list(env, "LICENSE_PRODUCTS")
        for entry in products:
            kind, _, product = entry.rpartition(":")
            if kind not in ("", "subscription", "perpetual") or not product.startswith(("prod_", "price_")):
                raise SettingsError(
                    "LICENSE_PRODUCTS: expected prod_... or price_... ids, each optionally prefixed "
                    f"subscription: or perpetual:, got {entry!r}"
                )
        dispute_revokes = (_str(env, "DISPUTE_REVOKES") or "license").lower()
        if dispute_revokes not in get_args(DisputeScope):
            raise SettingsError(f"DISPUTE_REVOKES: expected period or license, got {dispute_revokes!r}")
        api_key = _str(env, "STRIPE_API_KEY")
        if api_key is not None and not api_key.startswith(("sk_", "rk_")):
            raise SettingsError("STRIPE_API_KEY: expected a secret (sk_...) or restricted (rk_...) key")
        one_time = [e for e in products if not e.startswith("subscription:")]
        if one_time and api_key is None:
            # A one-time purchase is matched by its Checkout Session's line items, which no webhook
            # carries (https://docs.stripe.com/api/checkout/sessions/line_items): only the API has them.
            raise SettingsError(
                f"LICENSE_PRODUCTS: {one_time[0]} would grant one-time purchases, whose line items only "
                "Stripe's API gives (webhooks never carry them): set STRIPE_API_KEY, or list it as "
                f"subscription:{one_time[0].rpartition(':')[2]} to grant subscriptions only"
            )
        api_base = _str(env, "STRIPE_API_BASE")
        if api_base is not None:
            require_https_or_loopback("STRIPE_API_BASE", api_base)
        prices = tuple(_list(env, "STRIPE_PRICES"))
        for price in prices:
            if not re.fullmatch(r"price_[A-Za-z0-9_]{1,200}", price):
                raise SettingsError(f"STRIPE_PRICES: expected price_... ids, comma-separated, got {price!r}")
        if len(prices) > MAX_PRICES:
            raise SettingsError(f"STRIPE_PRICES: at most {MAX_PRICES} prices")
        if len(set(prices)) != len(prices):
            raise SettingsError("STRIPE_PRICES: a price is listed twice")
        trial_days = _trial_days(env)
        public_url = _public_url(env)
        if not dev:
            if prices and api_key is None:
                raise SettingsError("STRIPE_PRICES: needs STRIPE_API_KEY (the broker creates the Checkout Sessions)")
            if prices and public_url is None:
                raise SettingsError("STRIPE_PRICES: needs PUBLIC_URL (Checkout's success_url is PUBLIC_URL/activate)")
            if prices and license_keys is None:
                raise SettingsError("STRIPE_PRICES: needs LICENSE_KEY_SECRET (a checkout activates the app's machine)")
            if trial_days is not None and license_keys is None:
                raise SettingsError(
                    "LICENSE_TRIAL_DAYS: needs LICENSE_KEY_SECRET (a trial activates the app's machine)"
                )
        else:
            # Development mode: its own checkout page and prices unless a Stripe key is given.
            prices = prices or (DEV_PRICES if api_key is None else ())
            trial_days = trial_days or DEV_TRIAL_DAYS
        metrics_token = _str(env, "METRICS_TOKEN")
        if metrics_token is not None and len(metrics_token) < 16:
            raise SettingsError("METRICS_TOKEN: must be at least 16 characters")
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
            redis_key_prefix=redis_key_prefix,
            transport=cast(TransportName, transport),
            poll_interval=_float(env, "BROKER_POLL_INTERVAL", 2.0, minimum=0.01),
            webhook_secrets=webhook_secrets,
            token_secret=token_secret,
            previous_token_secrets=tuple(token_secrets[1:]),
            token_max_ttl=token_max_ttl,
            token_audience=_str(env, "STREAM_TOKEN_AUDIENCE") or DEFAULT_TOKEN_AUDIENCE,
            token_issuer=_str(env, "STREAM_TOKEN_ISSUER"),
            webhook_tolerance=int(_float(env, "STRIPE_WEBHOOK_TOLERANCE", 300, minimum=1)),
            heartbeat_interval=_float(env, "STREAM_HEARTBEAT_INTERVAL", 15.0, minimum=0.01),
            retry_ms=int(_float(env, "STREAM_RETRY_MS", 2000, minimum=0)),
            client_buffer=int(_float(env, "STREAM_CLIENT_BUFFER", 256, minimum=1)),
            send_timeout=_float(env, "STREAM_SEND_TIMEOUT", 30.0, minimum=0.01),
            replay_batch=int(_float(env, "STREAM_REPLAY_BATCH", 500, minimum=1)),
            max_streams=_int(env, "STREAM_MAX_CONNECTIONS", 20_000, minimum=1),
            max_streams_per_license=_int(env, "STREAM_MAX_PER_LICENSE", 10, minimum=1),
            replay_limit=_int(env, "STREAM_REPLAY_LIMIT", 1000, minimum=0),
            db_pool_size=int(_float(env, "DATABASE_POOL_SIZE", 10, minimum=1)),
            db_prepared_statements=_bool(env, "DATABASE_PREPARED_STATEMENTS", True),
            entitled_statuses=statuses,
            max_connection_lifetime=lifetime or None,
            event_log_retention_days=retention or None,
            stripe_livemode=None if livemode is None else _bool(env, "STRIPE_LIVEMODE", False),
            stripe_accounts=frozenset(accounts),
            license_products=frozenset(products),
            dispute_revokes=cast(DisputeScope, dispute_revokes),
            stripe_api_key=api_key,
            stripe_api_base=api_base,
            webhook_max_body=int(_float(env, "WEBHOOK_MAX_BODY", 256 * 1024, minimum=1024)),
            metrics_port=_int(env, "METRICS_PORT", 0, minimum=1, maximum=65535) or None,
            metrics_host=_str(env, "METRICS_HOST") or "127.0.0.1",
            metrics_token=metrics_token,
            lease_keys=lease_keys,
            lease_ttl=_float(env, "LICENSE_LEASE_TTL", DEFAULT_TTL, minimum=1),
            license_keys=license_keys,
            max_machines=_int(env, "LICENSE_MAX_MACHINES", DEFAULT_MAX_MACHINES, minimum=0, maximum=MACHINES_CEILING),
            machine_ttl=machine_ttl or None,
            machine_token_ttl=machine_token_ttl,
            public_url=public_url,
            app_name=_app_name(env),
            app_url_scheme=_url_scheme(env),
            stripe_prices=prices,
            checkout_pending_ttl=_float(env, "CHECKOUT_PENDING_TTL", DEFAULT_CHECKOUT_PENDING_TTL, minimum=1),
            trial_days=trial_days,
            portal_return_url=_https_url(env, "PORTAL_RETURN_URL"),
            dev=dev,
            port=int(port) or None,
            workers=int(_float(env, "WEB_CONCURRENCY", 1, minimum=1)),
            log_format=cast(LogFormat, log_format),
            log_level=log_level,
        )

    def require_webhook(self) -> None:
        if not self.webhook_secrets:
            raise SettingsError("STRIPE_WEBHOOK_SECRET: required by the webhook app (whsec_..., comma-separated)")
        self._refuse_development_secrets("STRIPE_WEBHOOK_SECRET", self.webhook_secrets)

    def require_stream(self) -> None:
        if not self.token_secret:
            raise SettingsError("STREAM_TOKEN_SECRET: required by the stream app")
        self._refuse_development_secrets("STREAM_TOKEN_SECRET", self.token_secrets)

    def _refuse_development_secrets(self, name: str, values: tuple[str, ...]) -> None:
        """An app outside development mode refuses a development secret: the constants of earlier
        versions are public, and a generated one was printed on a developer's terminal. (`token`
        and `send` take them: they talk to the development server.)"""
        if not self.dev and any(is_development_secret(value) for value in values):
            raise SettingsError(
                f"{name}: a development secret (from BROKER_DEV / `make run`) is refused outside development "
                f"mode; generate a real one (openssl rand -hex 32)"
            )

    @property
    def token_secrets(self) -> tuple[str, ...]:
        """Every secret a subscriber token may be signed with, the signing one first."""
        return (self.token_secret, *self.previous_token_secrets) if self.token_secret else ()

    def require_development_ok(self, command: str, host: str | None = None) -> None:
        """Development mode fills in secrets generated at start-up (printed by `serve`) and mounts
        /dev/token, which hands a token for any license to anyone on the machine who asks: it is
        allowed only where nobody else can reach it and nothing real is at stake (`serve`, a
        loopback host, SQLite)."""
        if not self.dev:
            return
        if command != "serve":
            raise SettingsError(f"BROKER_DEV: development mode works only with `license-broker serve`, not {command!r}")
        if host is not None and not is_loopback(host):
            raise SettingsError(f"BROKER_DEV: development mode serves on a loopback host only, not --host {host}")
        if not self.is_sqlite:
            raise SettingsError("BROKER_DEV: development mode needs an SQLite DATABASE_URL, never production")

    @property
    def stream_db_slots(self) -> int:
        """How many database connections the stream side may use at once (catch-up, gap fills,
        the sweep): two fewer than the pool, so that under `serve` a reconnect storm leaves
        connections to the webhook (and /readyz) instead of queueing them behind thousands of reads."""
        return max(1, self.db_pool_size - 2)

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


# scheme://user:password@ (the password up to the last @ of the URL) and ?password=... in a query.
_URL_PASSWORD = re.compile(r"\b([A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]*:)\S*@")
_QUERY_PASSWORD = re.compile(r"([?&](?:password|passwd|pass|pwd)=)[^&\s'\"]*", re.IGNORECASE)


def mask_password(text: str) -> str:
    """The one way a URL (DATABASE_URL, REDIS_URL), or a message that contains one, is printed,
    logged or put in an error: every password replaced by `***`."""
    return _QUERY_PASSWORD.sub(r"\1***", _URL_PASSWORD.sub(r"\1***@", text))


def is_development_secret(value: str) -> bool:
    return _DEV_SECRET.search(value) is not None


def lease_keys_from_env(env: Mapping[str, str]) -> LeaseKeys | None:
    """LICENSE_SIGNING_KEY, read on its own: `license-broker keys public` needs nothing else
    (and works whatever BROKER_DEV says)."""
    pem = _str(env, "LICENSE_SIGNING_KEY")
    if pem is None:
        return None
    try:
        return LeaseKeys.from_pem(pem)
    except InvalidKey as exc:
        raise SettingsError(f"LICENSE_SIGNING_KEY: {exc}") from None


def require_https_or_loopback(name: str, url: str) -> None:
    """An https URL, or http to a loopback host (a local fake or proxy): anything else would send
    a secret (an API key) in clear text and take the answer from whoever is on the path."""
    try:
        split = urlsplit(url)
        host = split.hostname
    except ValueError:
        host = None
        split = None
    if split is None or split.scheme not in ("http", "https") or not host:
        raise SettingsError(f"{name}: expected an https:// URL, got {mask_password(url)!r}")
    if split.scheme == "http" and not is_loopback(host):
        raise SettingsError(
            f"{name}: must be https:// (http:// only to a loopback host: 127.0.0.0/8, ::1, localhost), "
            f"got {mask_password(url)!r}"
        )


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 (bracketed or not) and localhost."""
    host = host.strip().removeprefix("[").removesuffix("]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def normalize_database_url(url: str) -> str:
    """Accept the URLs users write (postgresql://, sqlite:///) and pick the async drivers."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        # Not echoed: without a scheme the password cannot be told from the rest.
        raise SettingsError("DATABASE_URL: expected a URL such as postgresql://user:password@host/db")
    if scheme in ("postgres", "postgresql", "postgresql+psycopg", "postgresql+psycopg_async"):
        return f"postgresql+psycopg://{rest}"
    if scheme in ("sqlite", "sqlite+aiosqlite"):
        return f"sqlite+aiosqlite://{rest}"
    raise SettingsError(f"DATABASE_URL: unsupported scheme {scheme!r} (use postgresql:// or sqlite:///)")


def _trial_days(env: Mapping[str, str]) -> float | None:
    value = _str(env, "LICENSE_TRIAL_DAYS")
    if value is None:
        return None
    try:
        days = float(value)
    except ValueError:
        raise SettingsError(
            f"LICENSE_TRIAL_DAYS: expected a number of days (fractions allowed), got {value!r}"
        ) from None
    # A few seconds (0.0001 days) is allowed on purpose: the suite runs whole trials that way.
    if not 0 < days <= MAX_TRIAL_DAYS:
        raise SettingsError(f"LICENSE_TRIAL_DAYS: must be more than 0 and at most {MAX_TRIAL_DAYS:g}, got {value!r}")
    return days


def _https_url(env: Mapping[str, str], name: str) -> str | None:
    """A page a buyer is sent to: https, or http on a loopback host."""
    url = _str(env, name)
    if url is not None:
        require_https_or_loopback(name, url)
    return url


def _public_url(env: Mapping[str, str]) -> str | None:
    url = _str(env, "PUBLIC_URL")
    if url is None:
        return None
    bad = SettingsError(f"PUBLIC_URL: expected https://host[/path] with no query, got {url!r}")
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:
        raise bad from None
    if parts.scheme not in ("http", "https") or not host or parts.query or parts.fragment or parts.username:
        raise bad
    if parts.scheme == "http" and not is_loopback(host):
        raise SettingsError("PUBLIC_URL: must be https (buyers see their license key there), except on a loopback host")
    return url.rstrip("/")


def _app_name(env: Mapping[str, str]) -> str | None:
    name = _str(env, "APP_NAME")
    if name is not None and (len(name) > 80 or not name.isprintable()):
        raise SettingsError("APP_NAME: at most 80 printable characters")
    return name


def _url_scheme(env: Mapping[str, str]) -> str | None:
    scheme = _str(env, "APP_URL_SCHEME")
    if scheme is None:
        return None
    scheme = scheme.lower().removesuffix("://").removesuffix(":")
    if not _SCHEME.fullmatch(scheme) or scheme in RESERVED_SCHEMES:
        raise SettingsError(
            f"APP_URL_SCHEME: expected your app's own URL scheme (letters, digits, + . -; not http, file, ...), "
            f"got {scheme!r}"
        )
    return scheme


def _str(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name, "").strip()
    return value or None


def _list(env: Mapping[str, str], name: str) -> list[str]:
    return [part.strip() for part in (_str(env, name) or "").split(",") if part.strip()]


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    value = _str(env, name)
    if value is None:
        return default
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{name}: expected true or false, got {value!r}")


def _int(env: Mapping[str, str], name: str, default: int, *, minimum: int, maximum: int | None = None) -> int:
    value = _str(env, name)
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        raise SettingsError(f"{name}: expected a whole number, got {value!r}") from None
    if number < minimum:
        raise SettingsError(f"{name}: must be at least {minimum}, got {value!r}")
    if maximum is not None and number > maximum:
        raise SettingsError(f"{name}: must be at most {maximum}, got {value!r}")
    return number


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
