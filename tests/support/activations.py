"""Keys and machines as the tests use them: settings with keys on, a purchase through the webhook,
fingerprints, activations."""

from __future__ import annotations

import secrets
from typing import Any

import httpx

from broker.leases import LeaseKeys
from broker.licensing.keys import KeyVault
from broker.settings import Settings
from tests.support.licenses import make_settings, post_event
from webhook.samples import SampleEvents

KEY_SECRET = "license-key-secret-for-the-suite-0123456789"
LEASE_KEYS = LeaseKeys.generate()


def keyed_settings(database_url: str, **changes: Any) -> Settings:
    base: dict[str, Any] = {"license_keys": KeyVault((KEY_SECRET,)), "lease_keys": LEASE_KEYS}
    return make_settings(database_url, **(base | changes))


def keyed_env(**extra: str) -> dict[str, str]:
    return {"LICENSE_KEY_SECRET": KEY_SECRET, **extra}


def fingerprint() -> str:
    """What a client sends: a SHA-256 in hex (of its app's salt and the OS machine id)."""
    return secrets.token_hex(32)


def session_of(license_id: str) -> str:
    """The Checkout Session id of SampleEvents' purchase."""
    checkout = SampleEvents(license_id).checkout_completed(0)
    session_id: str = checkout["data"]["object"]["id"]
    return session_id


async def buy(client: httpx.AsyncClient, webhook_url: str, license_id: str) -> str:
    """Pay for the license as Stripe would tell the webhook; its Checkout Session id."""
    for event in SampleEvents(license_id).for_action("pay"):
        response = await post_event(client, webhook_url, event)
        assert response.status_code == 200, response.text
    return session_of(license_id)


async def key_of(client: httpx.AsyncClient, url: str, session_id: str) -> str:
    response = await client.get(f"{url}/api/checkout-sessions/{session_id}/license")
    assert response.status_code == 200, response.text
    key: str = response.json()["key"]
    return key


async def activate(
    client: httpx.AsyncClient, url: str, key: str, fp: str | None = None, **extra: Any
) -> httpx.Response:
    body = {"key": key, "fingerprint": fp or fingerprint(), **extra}
    return await client.post(f"{url}/api/activations", json=body)


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}
