"""Shared fixtures: a Postgres database of this run's own, Redis, private redis-servers, servers
in this process and in separate processes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
import psycopg
import pytest
import redis
import sqlalchemy as sa
import uvicorn
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

import bench.cluster
from broker import tokens
from broker.db import create_engine, migrate
from broker.eventlog import EventLog, LicenseEvent
from broker.licenses import LicenseStore
from broker.schema import metadata
from broker.settings import Settings, normalize_database_url
from broker.transports import Transport
from broker.transports.memory import MemoryTransport
from broker.transports.poll import PollTransport
from broker.transports.redis import RedisTransport
from broker.transports.redis_cluster import RedisClusterTransport
from webhook.signature import sign

CI = os.environ.get("CI", "").lower() == "true"
ROOT = Path(__file__).resolve().parent.parent
WEBHOOK_SECRET = "whsec_test_secret_for_the_suite"
TOKEN_SECRET = "test-token-secret-0123456789abcdef"
ADMIN_URL = os.environ.get("TEST_DATABASE_URL", "postgresql://127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def unavailable(what: str, exc: BaseException) -> None:
    """A missing service fails the run under CI=true; elsewhere it skips."""
    message = f"{what} is not available: {exc}"
    if CI:
        pytest.fail(message)
    pytest.skip(message)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def unused_port() -> int:
    return free_port()


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.01)


async def async_wait_until(predicate: Callable[[], bool], deadline_s: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + deadline_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def new_license() -> str:
    return f"lic_{uuid.uuid4().hex[:12]}"


# --- Postgres -----------------------------------------------------------------------------------


def _psycopg_connect(url: str) -> psycopg.Connection[Any]:
    u = make_url(normalize_database_url(url))
    return psycopg.connect(
        host=u.host or "127.0.0.1",
        port=u.port or 5432,
        user=u.username,
        password=u.password,
        dbname=u.database,
        autocommit=True,
        connect_timeout=5,
    )


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A database created for this test run, migrated, dropped at the end."""
    name = f"lb_test_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    try:
        with _psycopg_connect(ADMIN_URL) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as exc:
        unavailable("Postgres", exc)
    url = make_url(normalize_database_url(ADMIN_URL)).set(database=name).render_as_string(hide_password=False)

    async def setup() -> None:
        engine = create_engine(Settings(database_url=url))
        try:
            await migrate(engine)
        finally:
            await engine.dispose()

    asyncio.run(setup())
    yield url
    with _psycopg_connect(ADMIN_URL) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def truncate(url: str) -> None:
    with _psycopg_connect(url) as conn:
        tables = ", ".join(table.name for table in metadata.sorted_tables)
        conn.execute(f"TRUNCATE {tables} RESTART IDENTITY")


@pytest.fixture
def pg_url(postgres_url: str) -> str:
    truncate(postgres_url)
    return postgres_url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'broker.db'}"


@pytest.fixture(params=["postgres", "sqlite"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgres":
        url: str = request.getfixturevalue("pg_url")
        return url
    return f"sqlite+aiosqlite:///{tmp_path / 'broker.db'}"


async def count_rows(url: str, table: str) -> int:
    engine = create_engine(Settings(database_url=url))
    try:
        if url.startswith("sqlite"):
            await migrate(engine)
        async with engine.connect() as conn:
            return int(await conn.scalar(sa.text(f"SELECT count(*) FROM {table}")) or 0)
    finally:
        await engine.dispose()


# --- Redis --------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_url() -> str:
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except redis.RedisError as exc:
        unavailable("Redis", exc)
    return REDIS_URL


class RedisServer:
    """A private redis-server on a free port, which a test may stop and start again."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="lb-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            unavailable("redis-server", FileNotFoundError("redis-server"))
        assert binary is not None
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            cwd=self.dir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)

        def up() -> bool:
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False

        wait_until(up, what=f"redis-server on {self.port}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    yield server
    server.stop()
    shutil.rmtree(server.dir, ignore_errors=True)


# --- settings, tokens, webhooks -----------------------------------------------------------------


def make_settings(database_url: str, **changes: Any) -> Settings:
    base = Settings(
        database_url=database_url,
        webhook_secrets=(WEBHOOK_SECRET,),
        token_secret=TOKEN_SECRET,
        poll_interval=0.2,
        heartbeat_interval=15.0,
    )
    return base.with_(**changes)


def token_for(license_id: str, ttl: float = 600) -> str:
    return tokens.mint(TOKEN_SECRET, license_id, ttl=ttl)


def signed(
    event: dict[str, Any], secret: str = WEBHOOK_SECRET, timestamp: int | None = None
) -> tuple[bytes, dict[str, str]]:
    payload = orjson.dumps(event)
    return payload, {"stripe-signature": sign(payload, secret, timestamp), "content-type": "application/json"}


async def post_event(client: httpx.AsyncClient, base_url: str, event: dict[str, Any]) -> httpx.Response:
    payload, headers = signed(event)
    return await client.post(f"{base_url}/api/stripe/webhooks", content=payload, headers=headers)


# --- servers ------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def serving(app: Any) -> AsyncIterator[str]:
    """An ASGI app on a real socket, in this process (uvicorn, lifespan included)."""
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="on", log_level="warning")
    config.timeout_graceful_shutdown = 2
    server = uvicorn.Server(config)
    task = asyncio.create_task(server._serve())
    deadline = time.monotonic() + 15
    while not server.started:
        if task.done():
            task.result()
            raise RuntimeError("server exited during start-up")
        if time.monotonic() > deadline:
            raise TimeoutError("server did not start")
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 15)


class Process:
    """`license-broker <command>` in a separate process, ready once /healthz answers."""

    def __init__(self, command: list[str], env: dict[str, str], port: int, log: Path) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        with log.open("ab") as out:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "license_broker", *command, "--port", str(port)],
                env={**os.environ, **env},
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def wait_ready(self, timeout: float = 20) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"process exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                return httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, timeout, what=f"{self.url}/healthz")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., Process]]:
    started: list[Process] = []

    def start(command: str, env: dict[str, str], port: int | None = None, ready: bool = True) -> Process:
        process = Process([command], env, port or free_port(), tmp_path / f"{command}-{len(started)}.log")
        started.append(process)
        if ready:
            process.wait_ready()
        return process

    yield start
    for process in started:
        process.stop(signal.SIGKILL)


def process_env(database_url: str, **extra: str) -> dict[str, str]:
    env = {
        "DATABASE_URL": database_url,
        "STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "STREAM_TOKEN_SECRET": TOKEN_SECRET,
        "BROKER_POLL_INTERVAL": "0.2",
        "LOG_LEVEL": "WARNING",
    }
    for name in ("REDIS_URL", "BROKER_TRANSPORT", "BROKER_DEV"):
        env.setdefault(name, "")
    env.update(extra)
    return env


class TcpProxy:
    """A TCP relay a test can cut and restore, to take a service away from one process only."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        import threading

        self.target = (target_host, target_port)
        self.port = free_port()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._listener.settimeout(0.1)
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self.up = True
        self._stopped = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        import threading

        while not self._stopped:
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if not self.up:
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=2)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        """Refuse new connections and reset the open ones, as an outage would."""
        self.up = False
        with self._lock:
            for conn in self._conns:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
                conn.close()
            self._conns.clear()

    def restore(self) -> None:
        self.up = True

    def close(self) -> None:
        self._stopped = True
        self.cut()
        self._listener.close()


class LocalCluster(bench.cluster.LocalCluster):
    """bench.cluster.LocalCluster, skipped (or failed under CI) where redis-server is missing."""

    def start(self) -> None:
        try:
            super().start()
        except bench.cluster.ClusterUnavailable as exc:
            unavailable("redis-server and redis-cli", exc)


def _running_cluster() -> Iterator[LocalCluster]:
    local = LocalCluster()
    try:
        local.start()
        yield local
    finally:
        local.stop()


@pytest.fixture(scope="session")
def shared_cluster() -> Iterator[LocalCluster]:
    """For the tests that do not break it."""
    yield from _running_cluster()


@pytest.fixture
def cluster() -> Iterator[LocalCluster]:
    """A cluster of the test's own, to break (kill a master)."""
    yield from _running_cluster()


# --- the transport suite's harness (one per transport, tests/test_transports.py) ------------


async def append(engine: AsyncEngine, license_id: str, status: str = "active") -> LicenseEvent:
    """What the webhook's transaction does, without Stripe."""
    async with engine.begin() as conn:
        row = await LicenseStore.lock(conn, license_id)
        row.seq += 1
        row.state = {**row.state, "status": status, "entitled": status == "active"}
        await LicenseStore.save(conn, row)
        return await EventLog.append(
            conn,
            license_id,
            row.seq,
            row.state,
            stripe_event_id=None,
            stripe_event_type="test",
            occurred_at=datetime.now(UTC),
        )


class Harness:
    def __init__(self, transport: Transport, engine: AsyncEngine) -> None:
        self.transport = transport
        self.engine = engine
        self.received: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
        self.gaps = 0

    def on_message(self, license_id: str, payload: bytes) -> None:
        self.received.put_nowait((license_id, payload))

    def on_gap(self) -> None:
        self.gaps += 1

    async def commit_and_publish(self, license_id: str, status: str = "active") -> LicenseEvent:
        event = await append(self.engine, license_id, status)
        await self.transport.publish(license_id, event.data)
        return event

    async def next(self, within: float = 5.0) -> LicenseEvent:
        license_id, payload = await asyncio.wait_for(self.received.get(), within)
        event = LicenseEvent.from_json(payload)
        assert event.license_id == license_id
        return event


@pytest.fixture(params=["memory", "poll", "redis", "redis-cluster"])
async def harness(request: pytest.FixtureRequest, pg_url: str) -> AsyncIterator[Harness]:
    engine = create_engine(Settings(database_url=pg_url))
    transport: Transport
    if request.param == "memory":
        transport = MemoryTransport()
    elif request.param == "poll":
        transport = PollTransport(EventLog(engine), interval=0.05)
    elif request.param == "redis":
        transport = RedisTransport(request.getfixturevalue("redis_url"))
    else:
        transport = RedisClusterTransport(request.getfixturevalue("shared_cluster").url)
    h = Harness(transport, engine)
    await transport.connect()
    await transport.start(h.on_message, h.on_gap)
    try:
        yield h
    finally:
        await transport.close()
        await engine.dispose()
