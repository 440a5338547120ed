"""Servers for the tests: an ASGI app on a real socket in this process, and `license-broker`
commands in processes of their own."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from tests.support.licenses import REDIS_KEY_PREFIX, TOKEN_SECRET, WEBHOOK_SECRET
from tests.support.waiting import free_port, wait_until

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def unused_port() -> int:
    return free_port()


@contextlib.asynccontextmanager
async def serving(app: Any, **options: Any) -> AsyncIterator[str]:
    """An ASGI app on a real socket, in this process (uvicorn, lifespan included); `options`: more
    of uvicorn.Config's (e.g. `http`, the protocol class; forwarded_allow_ips, to give requests the
    client address of X-Forwarded-For)."""
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="on", log_level="warning", **options)
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


@contextlib.contextmanager
def serving_in_thread(app: Any) -> Iterator[str]:
    """`serving`, for code without an event loop of its own (a module-scoped fixture whose servers
    are processes): the app on a real socket, served by a thread with its own loop."""
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off", log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="asgi-in-thread", daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started or not thread.is_alive(), 15, what="the server in its thread")
        assert server.started, "the server in its thread exited during start-up"
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)


class Process:
    """`license-broker <command>` in a separate process, ready once /healthz answers."""

    def __init__(
        self, command: list[str], env: dict[str, str], port: int, log: Path, module: str = "license_broker"
    ) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        with log.open("ab") as out:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(
                [sys.executable, "-m", module, *command, "--port", str(port)],
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

    def start(
        command: str, env: dict[str, str], port: int | None = None, ready: bool = True, module: str = "license_broker"
    ) -> Process:
        """`license-broker <command>`, or `python -m <module>` (a test's own server, command "")."""
        args = [command] if command else []
        process = Process(args, env, port or free_port(), tmp_path / f"{command or module}-{len(started)}.log", module)
        started.append(process)
        if ready:
            process.wait_ready()
        return process

    yield start
    for process in started:
        process.stop(signal.SIGKILL)


def run_module(
    *argv: str, env: Mapping[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """`python -m <argv>` from the repository root, with PATH and `env` for its environment and its
    output captured as text (a command's one-line refusals, its printed results)."""
    return subprocess.run(
        [sys.executable, "-m", *argv],
        env={"PATH": "/usr/bin:/bin", **(env or {})},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# BROKER_POLL_INTERVAL for a test of the Redis path: the database sweep far slower than any wait of
# the test, so that what arrives came through Redis (or through a sweep that a reconnect woke),
# not through the 0.2 s sweep of process_env, which would hide a publish that never happens.
SLOW_SWEEP = "600"


def process_env(database_url: str, **extra: str) -> dict[str, str]:
    env = {
        "DATABASE_URL": database_url,
        "STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "STREAM_TOKEN_SECRET": TOKEN_SECRET,
        "BROKER_POLL_INTERVAL": "0.2",
        "LOG_LEVEL": "WARNING",
        "REDIS_KEY_PREFIX": REDIS_KEY_PREFIX,
    }
    for name in ("REDIS_URL", "BROKER_TRANSPORT", "BROKER_DEV"):
        env.setdefault(name, "")
    env.update(extra)
    return env
