"""Engine creation and migrations."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from broker.settings import Settings

if TYPE_CHECKING:
    from alembic.config import Config

MIGRATIONS = Path(__file__).parent / "migrations"


def create_engine(settings: Settings) -> AsyncEngine:
    """A bounded pool: however many clients are connected, at most `db_pool_size` connections."""
    if settings.is_sqlite:
        engine = create_async_engine(
            settings.database_url,
            pool_size=settings.db_pool_size,
            max_overflow=0,
            hide_parameters=True,
            connect_args={"timeout": 30},
        )

        @sa.event.listens_for(engine.sync_engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            # WAL lets readers (the stream) run while a writer (the webhook) commits.
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        return engine
    return create_async_engine(
        settings.database_url,
        pool_size=settings.db_pool_size,
        max_overflow=0,
        pool_timeout=10,
        # No pre-ping: it costs a round trip per transaction on the webhook's hot path. A connection
        # that died with the server fails its first statement instead; SQLAlchemy then discards
        # the whole pool, the webhook answers 503 (Stripe retries) and a stream ends (the client
        # resumes), so a Postgres restart costs one retry, never an event.
        pool_pre_ping=False,
        pool_recycle=1800,
        # Database errors are logged (and str() of one includes its bound parameters, which carry
        # Stripe payloads: names, e-mail addresses): the statement is enough to debug.
        hide_parameters=True,
        # A short connect timeout so that an unreachable database answers 503 quickly.
        connect_args={
            "connect_timeout": 5,
            # None turns psycopg's automatic prepared statements off (PgBouncer, docs/scaling.md).
            **({} if settings.db_prepared_statements else {"prepare_threshold": None}),
        },
        # psycopg encodes and decodes JSON columns with these: orjson rather than the stdlib json
        # takes ~10% off the stream's CPU per replayed event (docs/bench.md). Postgres only:
        # SQLite stores JSON as text and wants str.
        json_serializer=orjson.dumps,
        json_deserializer=orjson.loads,
    )


def upsert_into(conn: AsyncConnection, table: sa.Table) -> Any:
    """INSERT with ON CONFLICT for the connection's dialect (Postgres, or the embedded SQLite)."""
    return (postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert)(table)


def _alembic_config(connection: sa.Connection) -> Config:
    # Alembic (and Mako) are imported here, not at the top: only `migrate` and the embedded default
    # need them, and every server process and CLI command would otherwise pay ~0.2 s of start-up.
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


async def migrate(engine: AsyncEngine) -> None:
    """Apply every pending migration (idempotent)."""

    def upgrade(connection: sa.Connection) -> None:
        if connection.dialect.name == "postgresql":
            # Several processes may start at once; one migrates, the others wait and find nothing to do.
            connection.execute(sa.text("SELECT pg_advisory_xact_lock(7210482)"))
        from alembic import command

        command.upgrade(_alembic_config(connection), "head")

    async with engine.begin() as conn:
        await conn.run_sync(upgrade)


async def ping(engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        await conn.execute(sa.text("SELECT 1"))
