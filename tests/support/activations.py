"""Keys and machines as the tests use them: settings with keys on, a purchase through the webhook,
fingerprints, activations."""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

import httpx

from broker.licensing.keys import KeyVault
from broker.settings import Settings
from broker.signing.leases import LeaseKeys
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


class EventStream:
    """An SSE stream read event by event: (event name, data) pairs; `ended` once the server
    closed it."""

    def __init__(self, client: httpx.AsyncClient, url: str, headers: dict[str, str] | None = None) -> None:
        self.client = client
        self.url = url
        self.headers = headers or {}
        self.response: httpx.Response | None = None
        self.ended = False
        self._lines: Any = None

    async def __aenter__(self) -> EventStream:
        request = self.client.build_request("GET", self.url, headers=self.headers)
        self.response = await self.client.send(request, stream=True)
        self._lines = self.response.aiter_lines()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.response is not None
        await self.response.aclose()

    async def next(self, within: float = 10.0) -> tuple[str, str] | None:
        """The next event (comments and retry hints skipped), or None when the stream ends."""
        name, data = "message", []
        async with asyncio.timeout(within):
            while True:
                try:
                    line = await anext(self._lines)
                except StopAsyncIteration:
                    self.ended = True
                    return None
                if line == "":
                    if data:
                        return name, "\n".join(data)
                    name = "message"
                    continue
                field, _, value = line.partition(": ")
                if field == "event":
                    name = value
                elif field == "data":
                    data.append(value)

    async def until(self, name: str, within: float = 10.0) -> str:
        """The data of the next event called `name` (others skipped)."""
        while True:
            event = await self.next(within)
            assert event is not None, f"the stream ended before an {name!r} event"
            if event[0] == name:
                return event[1]

    async def end(self, within: float = 10.0) -> None:
        """Read until the server ends the stream (each event within `within` seconds)."""
        while await self.next(within) is not None:
            pass
