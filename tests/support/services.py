"""The services the suite talks to: a Postgres database of this run's own, and Redis. A missing
service skips its tests, or fails the run under CI=true."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from broker.settings import Settings, normalize_database_url
from broker.storage.db import create_engine, migrate
from broker.storage.schema import metadata

CI = os.environ.get("CI", "").lower() == "true"
ADMIN_URL = os.environ.get("TEST_DATABASE_URL", "postgresql://127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def unavailable(what: str, exc: BaseException) -> None:
    """A missing service fails the run under CI=true; elsewhere it skips."""
    message = f"{what} is not available: {exc}"
    if CI:
        pytest.fail(message)
    pytest.skip(message)


def psycopg_connect(url: str) -> psycopg.Connection[Any]:
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
        with psycopg_connect(ADMIN_URL) as conn:
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
    with psycopg_connect(ADMIN_URL) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def truncate(url: str) -> None:
    with psycopg_connect(url) as conn:
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


@pytest.fixture(scope="session")
def redis_url() -> str:
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except redis.RedisError as exc:
        unavailable("Redis", exc)
    return REDIS_URL
