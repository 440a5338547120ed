"""The stack under test, started as production runs it: a scratch Postgres database migrated with
`license-broker migrate`, and separate `license-broker webhook` and `license-broker stream`
processes."""

from __future__ import annotations

import contextlib
import os
import platform
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
import redis
from sqlalchemy.engine import make_url

from broker.settings import CLUSTER_SCHEMES, normalize_database_url, parse_cluster_url
from localcluster import free_port

ROOT = Path(__file__).resolve().parent.parent
WEBHOOK_SECRET = "whsec_bench_" + secrets.token_hex(16)
TOKEN_SECRET = "bench-token-secret-" + secrets.token_hex(16)


def machine() -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    ram_kb = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        ram_kb = int(Path("/proc/meminfo").read_text().split("MemTotal:", 1)[1].split()[0])
    cpus = os.cpu_count() or 0
    ram_gb = round(ram_kb / 1024 / 1024, 1)
    return {
        "summary": f"{cpus} cores, {model}, {ram_gb} GB RAM, {platform.system()} {platform.release()}",
        "nproc": cpus,
        "cpu": model,
        "ram_gb": ram_gb,
        "python": platform.python_version(),
        "load_average": list(os.getloadavg()),
    }


def libpq_url(url: str) -> str:
    # libpq takes the URL itself, so ?host=/var/run/postgresql (a Unix socket) works too.
    return make_url(normalize_database_url(url)).set(drivername="postgresql").render_as_string(hide_password=False)


def _admin(url: str) -> psycopg.Connection[Any]:
    return psycopg.connect(libpq_url(url), autocommit=True, connect_timeout=5)


@contextlib.contextmanager
def scratch_database(admin_url: str) -> Iterator[str]:
    """CREATE DATABASE lb_bench_<random>, migrated by the real command; dropped at the end."""
    name = f"lb_bench_{secrets.token_hex(4)}"
    with _admin(admin_url) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = make_url(normalize_database_url(admin_url)).set(database=name).render_as_string(hide_password=False)
    try:
        subprocess.run(
            [sys.executable, "-m", "license_broker", "migrate"],
            env={**os.environ, "DATABASE_URL": url},
            cwd=ROOT,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        yield url
    finally:
        with _admin(admin_url) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def backend_pids(database_url: str) -> list[int]:
    """The Postgres server processes serving connections to this database (not this one)."""
    with _admin(database_url) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchall()
    return [int(row[0]) for row in rows]


@dataclass
class Server:
    """`license-broker <command>` in its own process, ready once /readyz answers; or, with
    `argv`, that command (`{port}` in it replaced), such as the Flask-SSE peer's gunicorn."""

    command: str
    env: dict[str, str]
    log: Path
    port: int = field(default_factory=free_port)
    extra_args: tuple[str, ...] = ()
    proc: subprocess.Popen[bytes] | None = None
    argv: tuple[str, ...] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def worker_pid(self) -> int:
        """The process that serves: the server's own, or its one worker (gunicorn's master forks it)."""
        children = _children(self.pid)
        return children[0] if len(children) == 1 and self.argv is not None else self.pid

    def start(self, timeout: float = 30) -> Server:
        if self.argv is not None:
            args = [a.replace("{port}", str(self.port)) for a in self.argv]
        else:
            args = [sys.executable, "-m", "license_broker", self.command, "--port", str(self.port), *self.extra_args]
        with self.log.open("ab") as log:  # the child holds its own copy
            self.proc = subprocess.Popen(
                args,
                env={**os.environ, **self.env},
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.command} exited with {self.proc.returncode}; see {self.log}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.command} not ready after {timeout}s; see {self.log}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def server_env(database_url: str, redis_url: str, transport: str, poll_interval: float) -> dict[str, str]:
    return {
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "BROKER_TRANSPORT": transport,
        "BROKER_POLL_INTERVAL": str(poll_interval),
        "STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "STREAM_TOKEN_SECRET": TOKEN_SECRET,
        # Per-request log lines are not what is measured; warnings and errors still show.
        "LOG_LEVEL": "WARNING",
        "BROKER_DEV": "",
    }


def flask_sse_server(role: str, redis_url: str, log: Path, *, max_clients: int, publish: str = "sse") -> Server:
    """The Flask-SSE peer (bench.flask_sse_peer) as Flask-SSE's docs deploy it: gunicorn with one
    gevent worker. `role` only names it: the bench starts two, one taking the webhooks and one
    serving the streams, as the project's webhook and stream processes. Access log off (gunicorn's
    default), as the project's servers write no line per request at LOG_LEVEL=WARNING. `publish`:
    its FLASK_SSE_PUBLISH (sse | pooled)."""
    return Server(
        f"flask-sse {role}",
        {"REDIS_URL": redis_url, "STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET, "FLASK_SSE_PUBLISH": publish},
        log,
        argv=(
            sys.executable, "-m", "gunicorn", "--worker-class", "gevent", "--workers", "1",
            # gevent's default is 1,000 connections per worker: the clients and the driver's own.
            "--worker-connections", str(max_clients + 100),
            "--keep-alive", "75", "--graceful-timeout", "2", "--log-level", "warning",
            "--bind", "127.0.0.1:{port}", "bench.flask_sse_peer:app",
        ),
    )  # fmt: skip


@contextlib.contextmanager
def running(*servers: Server) -> Iterator[tuple[Server, ...]]:
    try:
        for server in servers:
            server.start()
        yield servers
    finally:
        for server in reversed(servers):
            server.stop()


# --- what a process holds -------------------------------------------------------------------------


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def _children(pid: int) -> list[int]:
    found = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            found += [int(c) for c in (task / "children").read_text().split()]
    return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its live children (uvicorn --workers)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for p in [pid, *_children(pid)]:
        with contextlib.suppress(OSError):
            # Fields after the command name, which is in parentheses and may hold spaces.
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    return inodes


def _tcp_connections(pid: int) -> set[tuple[int, int]]:
    """(local port, remote port) of the process's TCP sockets, from /proc/<pid>/net/tcp{,6} by inode."""
    inodes = _socket_inodes(pid)
    found = set()
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                cols = line.split()
                if cols[9] in inodes:
                    found.add((int(cols[1].rsplit(":", 1)[1], 16), int(cols[2].rsplit(":", 1)[1], 16)))
    return found


def _port_of(address: Any) -> int:
    return int(str(address).rsplit(":", 1)[1])


def redis_nodes(redis_url: str) -> list[redis.Redis]:
    """A client per server: the one of redis://, or every node of a redis+cluster:// cluster."""
    if not redis_url.startswith(tuple(f"{scheme}://" for scheme in CLUSTER_SCHEMES)):
        return [redis.Redis.from_url(redis_url)]
    address = parse_cluster_url(redis_url)
    seed = redis.RedisCluster(
        startup_nodes=[redis.cluster.ClusterNode(host, port) for host, port in address.nodes],  # type: ignore[no-untyped-call]
        username=address.username,
        password=address.password,
    )
    try:
        nodes = [(node.host, node.port) for node in seed.get_nodes()]  # type: ignore[no-untyped-call]
    finally:
        seed.close()
    return [redis.Redis(host=host, port=port, username=address.username, password=address.password)
            for host, port in nodes]  # fmt: skip


@dataclass
class RedisConnections:
    total: int
    # In (sharded) pub/sub mode, i.e. subscribed to at least one channel: CLIENT LIST flag P, or
    # a count of shard channels. A subscriber connection with nothing to follow yet is not one.
    subscribers: int


def redis_connections(redis_url: str, pid: int) -> RedisConnections:
    """Redis's clients (CLIENT LIST, on every node of a cluster) that are sockets of process `pid`:
    its local port and the server's port match one of the process's TCP connections."""
    mine = _tcp_connections(pid)
    total = subscribers = 0
    for node in redis_nodes(redis_url):
        try:
            clients: list[dict[str, Any]] = node.client_list()
        finally:
            node.close()
        for c in clients:
            if (_port_of(c["addr"]), _port_of(c["laddr"])) in mine:
                total += 1
                subscribers += "P" in str(c.get("flags", "")) or int(c.get("ssub", 0) or 0) > 0
    return RedisConnections(total, subscribers)
