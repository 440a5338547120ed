"""No password, secret or personal data in anything the broker prints or logs: URLs are printed
through one masking helper, database errors are logged without their bound parameters."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator

import httpx
import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from broker.settings import Settings, SettingsError, mask_password
from broker.storage.db import create_engine
from tests.support.licenses import make_settings, new_license, post_event
from tests.support.processes import Process, process_env, run_module, serving
from tests.support.services import ADMIN_URL, psycopg_connect, unavailable
from tests.support.waiting import wait_until
from webhook.app import create_app
from webhook.samples import SampleEvents

PASSWORD = "hunter2-Secret"
PERSONAL = "jane.doe@example.com"


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("postgresql://broker:hunter2@db:5432/broker", "postgresql://broker:***@db:5432/broker"),
        ("postgresql+psycopg://u:p%40ss@db/x", "postgresql+psycopg://u:***@db/x"),
        ("postgresql://u:p@ss@db/x", "postgresql://u:***@db/x"),  # an unencoded @ in the password
        ("redis://:hunter2@redis:6379/0", "redis://:***@redis:6379/0"),
        ("rediss://default:hunter2@redis:6380", "rediss://default:***@redis:6380"),
        ("redis+cluster://u:hunter2@h1:7000,h2:7001", "redis+cluster://u:***@h1:7000,h2:7001"),
        ("redis://redis:6379/0?password=hunter2&db=1", "redis://redis:6379/0?password=***&db=1"),
        ("postgresql://db/x?user=u&PASSWORD=hunter2", "postgresql://db/x?user=u&PASSWORD=***"),
        ("sqlite+aiosqlite:///./license-broker.db", "sqlite+aiosqlite:///./license-broker.db"),
        ("redis://redis:6379/0", "redis://redis:6379/0"),
        ("postgresql://broker@db/x", "postgresql://broker@db/x"),
        ("got 'http://u:hunter2@h/0' for REDIS_URL", "got 'http://u:***@h/0' for REDIS_URL"),
    ],
)
def test_mask_password_hides_every_password_and_keeps_the_rest(text: str, masked: str) -> None:
    assert mask_password(text) == masked


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"REDIS_URL": f"http://user:{PASSWORD}@redis:6379/0"}, "REDIS_URL"),
        ({"REDIS_URL": f"redis+cluster://user:{PASSWORD}@redis"}, "REDIS_URL"),
        ({"DATABASE_URL": f"user:{PASSWORD}@db/broker"}, "DATABASE_URL"),
        ({"DATABASE_URL": f"mysql://user:{PASSWORD}@db/broker"}, "DATABASE_URL"),
    ],
)
def test_a_malformed_url_setting_is_named_without_its_password(env: dict[str, str], named: str) -> None:
    with pytest.raises(SettingsError, match=f"^{named}:") as raised:
        Settings.from_env(env)
    assert PASSWORD not in str(raised.value)


def test_serve_prints_the_database_url_with_its_password_masked(pg_url: str, spawn: Callable[..., Process]) -> None:
    # Postgres here trusts local connections: any password is accepted, and must not be shown.
    url = make_url(pg_url).set(username="postgres", password=PASSWORD).render_as_string(hide_password=False)
    server = spawn("serve", process_env(url, LOG_LEVEL="INFO"))
    wait_until(lambda: "database:" in server.log.read_text(), what="the banner")
    server.stop()
    log = server.log.read_text()
    assert f"postgres:***@{make_url(pg_url).host}" in log
    assert PASSWORD not in log


def test_migrate_prints_the_database_url_with_its_password_masked(postgres_url: str) -> None:
    url = make_url(postgres_url).set(username="postgres", password=PASSWORD).render_as_string(hide_password=False)
    env = {"PATH": "/usr/bin:/bin", "DATABASE_URL": url}
    ok = run_module("license_broker", "migrate", env=env, timeout=60)
    env["DATABASE_URL"] = f"postgresql://postgres:{PASSWORD}@127.0.0.1:1/none"
    failed = run_module("license_broker", "migrate", env=env, timeout=60)
    assert ok.returncode == 0 and "postgres:***@" in ok.stdout, ok.stderr
    assert failed.returncode == 1
    assert PASSWORD not in ok.stdout + ok.stderr + failed.stdout + failed.stderr


@pytest.fixture
def empty_database() -> Iterator[str]:
    """A Postgres database without the schema: every statement of the webhook fails."""
    name = f"lb_empty_{uuid.uuid4().hex[:8]}"
    try:
        with psycopg_connect(ADMIN_URL) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as exc:  # no server: skipped, or failed under CI=true
        unavailable("Postgres", exc)
    yield ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    with psycopg_connect(ADMIN_URL) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def test_a_database_error_is_raised_without_its_bound_parameters(db_url: str) -> None:
    engine = create_engine(Settings(database_url=db_url))
    try:
        async with engine.connect() as conn:
            with pytest.raises(SQLAlchemyError) as raised:
                await conn.execute(sa.text("INSERT INTO no_such_table VALUES (:email)"), {"email": PERSONAL})
    finally:
        await engine.dispose()
    assert "no_such_table" in str(raised.value)
    assert PERSONAL not in str(raised.value)


async def test_the_webhook_logs_a_database_error_without_the_payload(
    empty_database: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    event = SampleEvents(new_license()).checkout_completed(int(time.time()))
    event["data"]["object"]["customer_details"] = {"email": PERSONAL, "name": "Jane Doe"}
    async with serving(create_app(make_settings(empty_database))) as url, httpx.AsyncClient() as client:
        response = await post_event(client, url, event)
    assert response.status_code == 503
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "not recorded, database unavailable" in logged
    # SQLAlchemy shows the first few hundred characters of each parameter: the start of the payload.
    assert "[parameters:" not in logged and "Json({" not in logged
    assert PERSONAL not in logged
