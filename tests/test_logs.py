"""Logs as an operator reads them: a line per webhook with its outcome, a request id on every
request's lines, no secret and no token, whether started by `license-broker` or by bare uvicorn."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import orjson
import pytest

from broker.web.requestlog import RequestIds, redact
from license_broker.embedded import create_app
from tests.support.licenses import (
    TOKEN_SECRET,
    WEBHOOK_SECRET,
    make_settings,
    new_license,
    post_event,
    signed,
    token_for,
)
from tests.support.processes import ROOT, Process, process_env, serving
from tests.support.waiting import free_port, wait_until
from webhook.samples import SampleEvents


def exercise(url: str, license_id: str) -> str:
    """A token in a query string, a good webhook and a forged one; returns the token used."""
    token = token_for(license_id)
    with httpx.Client(base_url=url, timeout=10) as client:
        response = client.get(
            f"/api/licenses/{license_id}", params={"token": token}, headers={"x-request-id": "req-q1"}
        )
        assert response.status_code == 200
        assert response.headers["x-request-id"] == "req-q1"
        # The server decodes the name: this token is accepted, so the log must not keep it either.
        encoded = client.get(f"/api/licenses/{license_id}?%74oken={token}")
        assert encoded.status_code == 200
        client.get(f"/api/licenses/{license_id}?TOKEN={token}&tok%65n={token}")
        payload, headers = signed(SampleEvents(license_id).checkout_completed(int(time.time())))
        posted = client.post("/api/stripe/webhooks", content=payload, headers={**headers, "x-request-id": "req-w1"})
        assert posted.json()["outcome"] == "applied"
        forged = client.post("/api/stripe/webhooks", content=payload, headers={"stripe-signature": "t=1,v1=00"})
        assert forged.status_code == 400
    return token


def assert_no_secrets(log: str, token: str) -> None:
    for secret in (token, TOKEN_SECRET, WEBHOOK_SECRET):
        assert secret not in log


def test_serve_logs_each_webhook_with_its_outcome_and_request_id_and_redacts_tokens(
    pg_url: str, spawn: Callable[..., Process]
) -> None:
    license_id = new_license()
    server = spawn("serve", process_env(pg_url, LOG_LEVEL="INFO"))
    token = exercise(server.url, license_id)
    server.stop()
    log = server.log.read_text()
    lines = log.splitlines()
    assert any("[req-q1] " in line and f"/api/licenses/{license_id}?token=[redacted] " in line for line in lines)
    webhook = [line for line in lines if " webhook " in line and "checkout.session.completed -> applied" in line]
    assert len(webhook) == 1 and "[req-w1]" in webhook[0] and f"license={license_id} seq=1" in webhook[0]
    assert sum("webhook rejected:" in line for line in lines) == 1
    assert_no_secrets(log, token)


def test_json_logs_carry_the_request_id_as_a_field(pg_url: str, spawn: Callable[..., Process]) -> None:
    license_id = new_license()
    server = spawn("serve", process_env(pg_url, LOG_LEVEL="INFO", LOG_FORMAT="json"))
    token = exercise(server.url, license_id)
    server.stop()
    log = server.log.read_text()
    entries = [orjson.loads(line) for line in log.splitlines() if line.startswith("{")]
    webhook = [e for e in entries if e["logger"] == "webhook" and "-> applied" in e["message"]]
    assert len(webhook) == 1 and webhook[0]["request_id"] == "req-w1" and webhook[0]["level"] == "info"
    access = [e for e in entries if e["logger"] == "uvicorn.access" and e.get("request_id") == "req-q1"]
    assert len(access) == 1 and "token=[redacted]" in access[0]["message"]
    assert_no_secrets(log, token)


def test_bare_uvicorn_redacts_query_tokens_in_its_access_log_too(pg_url: str, tmp_path: Path) -> None:
    """`uvicorn stream.app:app` uses uvicorn's own log configuration, not ours."""
    license_id = new_license()
    port = free_port()
    log = tmp_path / "uvicorn.log"
    env = {**os.environ, **process_env(pg_url)}
    command = [sys.executable, "-m", "uvicorn", "stream.app:app", "--port", str(port), "--log-level", "info"]
    with log.open("ab") as out:
        proc = subprocess.Popen(command, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:

        def ready() -> bool:
            assert proc.poll() is None, log.read_text()
            try:
                return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, 20, "uvicorn stream.app:app")
        token = token_for(license_id)
        response = httpx.get(f"http://127.0.0.1:{port}/api/licenses/{license_id}", params={"token": token})
        assert response.status_code == 200
        wait_until(lambda: "token=[redacted]" in log.read_text(), 10, "the access log line")
    finally:
        proc.terminate()
        proc.wait(15)
    assert token not in log.read_text()


@pytest.mark.parametrize(
    ("line", "redacted"),
    [
        ('"GET /e?token=abc.def HTTP/1.1" 200', '"GET /e?token=[redacted] HTTP/1.1" 200'),
        ("/e?lastEventId=3&token=abc", "/e?lastEventId=3&token=[redacted]"),
        ("/e?%74oken=abc", "/e?%74oken=[redacted]"),
        ("/e?%74%6F%6B%65%6E=abc", "/e?%74%6F%6B%65%6E=[redacted]"),
        ("/e?%2574oken=abc", "/e?%2574oken=[redacted]"),
        ("/e?TOKEN=abc&x=1", "/e?TOKEN=[redacted]&x=1"),
        ("/e?Token=abc", "/e?Token=[redacted]"),
        ("/e?access_token=abc", "/e?access_token=[redacted]"),
        ("/e?tokens=abc&lastEventId=3", "/e?tokens=abc&lastEventId=3"),
        ("token=abc", "token=[redacted]"),
    ],
)
def test_token_redaction_survives_case_and_percent_encoding(line: str, redacted: str) -> None:
    assert redact(line) == redacted


async def test_a_request_id_is_made_when_none_or_an_unsafe_one_is_given(pg_url: str) -> None:
    async with serving(create_app(make_settings(pg_url))) as url, httpx.AsyncClient(base_url=url) as client:
        made = (await client.get("/healthz")).headers["x-request-id"]
        assert len(made) == 32 and made != (await client.get("/healthz")).headers["x-request-id"]
        kept = await client.get("/healthz", headers={"x-request-id": "edge-7f3a:1"})
        assert kept.headers["x-request-id"] == "edge-7f3a:1"
        for unsafe in ("two words", "x" * 200, "a\tb"):
            replaced = (await client.get("/healthz", headers={"x-request-id": unsafe})).headers["x-request-id"]
            assert replaced != unsafe and len(replaced) == 32
        license_id = new_license()
        event = SampleEvents(license_id).checkout_completed(int(time.time()))
        assert "x-request-id" in (await post_event(client, url, event)).headers


def test_made_request_ids_differ_between_processes_and_after_a_fork() -> None:
    ids = RequestIds()
    made = [ids.next() for _ in range(1000)]
    assert len(set(made)) == 1000 and all(len(i) == 32 and int(i, 16) >= 0 for i in made)
    assert RequestIds().next()[:16] != made[0][:16]  # another process has another prefix
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child reports the id it makes next, as the parent would have made it
        os.write(write, ids.next().encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    child = os.read(read, 64).decode()
    os.close(read)
    assert len(child) == 32 and child[:16] != made[0][:16] and child != ids.next()
