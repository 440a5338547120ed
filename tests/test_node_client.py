"""The Electron main-process code of docs/desktop.md (tests/node/license-stream.mjs), run by Node
with the `eventsource` npm package against a real server: it receives the state, then the event."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from license_broker.embedded import create_app
from tests.support.licenses import make_settings, new_license, post_event, token_for
from tests.support.processes import ROOT, serving
from tests.support.services import unavailable
from webhook.samples import SampleEvents

NODE_DIR = ROOT / "tests" / "node"
EVENTSOURCE = "eventsource@4"  # 4.x runs on Node 20 (5.x wants Node 22.12)


@pytest.fixture(scope="session")
def node_client(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/node's scripts beside a node_modules holding `eventsource` (npm's cache makes the
    install quick after the first run)."""
    npm, node = shutil.which("npm"), shutil.which("node")
    if npm is None or node is None:
        unavailable("node and npm", FileNotFoundError("npm" if npm is None else "node"))
    assert npm is not None
    where = tmp_path_factory.mktemp("node-client")
    (where / "package.json").write_text('{"private": true, "type": "module"}\n')
    install = subprocess.run(
        [npm, "install", "--no-audit", "--no-fund", "--loglevel=error", EVENTSOURCE],
        cwd=where,
        capture_output=True,
        text=True,
        timeout=180,
    )
    if install.returncode != 0:
        unavailable(f"npm install {EVENTSOURCE}", RuntimeError(install.stderr.strip()[-500:]))
    for script in NODE_DIR.glob("*.mjs"):
        shutil.copy(script, where / script.name)
    return where


class NodeFollower:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def next(self, deadline_s: float = 10) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), deadline_s)
        assert line, "node exited"
        message: dict[str, Any] = orjson.loads(line)
        return message

    async def next_state(self, deadline_s: float = 10) -> dict[str, Any]:
        while "state" not in (message := await self.next(deadline_s)):
            pass
        state: dict[str, Any] = message["state"]
        return state


@pytest.fixture
async def follow(node_client: Path) -> AsyncIterator[Any]:
    started: list[asyncio.subprocess.Process] = []

    async def start(url: str, license_id: str, token: str) -> NodeFollower:
        env = {**os.environ, "BROKER_URL": url, "LICENSE_ID": license_id, "TOKEN": token}
        proc = await asyncio.create_subprocess_exec(
            "node", "follow.mjs", cwd=node_client, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        started.append(proc)
        return NodeFollower(proc)

    yield start
    for proc in started:
        if proc.returncode is None:
            assert proc.stdin is not None
            proc.stdin.close()  # follow.mjs stops and exits when stdin closes
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def test_the_node_eventsource_client_receives_the_state_then_the_event(pg_url: str, follow: Any) -> None:
    license_id = new_license()
    async with serving(create_app(make_settings(pg_url))) as url:
        node = await follow(url, license_id, token_for(license_id))
        first = await node.next_state()
        assert (first["seq"], first["status"], first["entitled"]) == (0, "none", False)
        seqs = []
        async with httpx.AsyncClient() as client:
            for event in SampleEvents(license_id).for_action("pay"):
                response = await post_event(client, url, event)
                assert response.status_code == 200
                seqs.append(response.json().get("seq", 0))
        received = [await node.next_state() for _ in range(max(seqs))]
        assert [state["seq"] for state in received] == list(range(1, max(seqs) + 1))
        assert (received[-1]["status"], received[-1]["entitled"]) == ("active", True)


async def test_the_node_client_reports_a_refused_token(pg_url: str, follow: Any) -> None:
    license_id = new_license()
    async with serving(create_app(make_settings(pg_url))) as url:
        node = await follow(url, license_id, token_for(new_license()))
        assert await node.next() == {"status": "unauthorized"}
