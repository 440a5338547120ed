"""Licenses and their events as the tests make them: settings, subscriber tokens, signed Stripe
webhooks, and events appended the way the webhook's transaction appends them."""

from __future__ import annotations

import dataclasses
import uuid
from datetime import UTC, datetime
from typing import Any

import httpx
import orjson
from sqlalchemy.ext.asyncio import AsyncEngine

from broker.settings import Settings
from broker.signing import tokens
from broker.storage.eventlog import EventLog, LicenseEvent
from broker.storage.licenses import LicenseStore
from webhook.signature import sign

WEBHOOK_SECRET = "whsec_test_secret_for_the_suite"
TOKEN_SECRET = "test-token-secret-0123456789abcdef"
# This run's own Redis keys (rate-limit counts): runs sharing a Redis server, and the hour a trial
# count lives, never see each other's (10 trials an hour per address would otherwise carry over).
REDIS_KEY_PREFIX = f"license-broker-test-{uuid.uuid4().hex[:8]}:"


def new_license() -> str:
    return f"lic_{uuid.uuid4().hex[:12]}"


def make_settings(database_url: str, **changes: Any) -> Settings:
    base = Settings(
        database_url=database_url,
        webhook_secrets=(WEBHOOK_SECRET,),
        token_secret=TOKEN_SECRET,
        poll_interval=0.2,
        heartbeat_interval=15.0,
        redis_key_prefix=REDIS_KEY_PREFIX,
    )
    return dataclasses.replace(base, **changes)


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
