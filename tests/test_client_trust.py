"""What the Python client trusts (license_broker_client, installed from its wheel): a fake broker
serving its own key and a forged ten-year lease unlocks nothing when the real key is pinned; a
client with no pinned key follows the live state only, says so, and never unlocks offline; the
keys it pins are exactly what `license-broker keys public` prints."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from license_broker_client import InvalidLease, LeaseVerifier, LicenseClient, key_id
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from broker.signing.leases import LeaseKeys, LeaseSigner, lease_claims, private_pem, public_jwk, public_pem
from tests.support.processes import run_module, serving
from tests.support.waiting import async_wait_until, free_port

REAL = LeaseKeys.generate()  # the broker's key, pinned in the app
LICENSE = "lic_trust_test"
OFFLINE = f"http://127.0.0.1:{free_port()}"  # nothing listens there


class FakeBroker:
    """Thirty lines of what an attacker serves at the broker's address (a hostile BROKER_URL, a
    DNS or network attacker): its own key in the JWKS, and an entitled ten-year lease it signed."""

    def __init__(self, license_id: str) -> None:
        self.key = Ed25519PrivateKey.generate()
        now = int(time.time())
        self.state = {"license_id": license_id, "seq": 99, "status": "active", "entitled": True,
                      "stripe_event_id": "evt_fake", "stripe_event_type": "invoice.paid",
                      "occurred_at": "2030-01-01T00:00:00Z", "state": {"features": ["pro"]}}  # fmt: skip
        claims = {**lease_claims(self.state), "iat": now, "exp": now + 10 * 365 * 86400}
        self.lease = jwt.encode(claims, self.key, algorithm="EdDSA", headers={"kid": key_id(self.key.public_key())})
        self.requests: list[str] = []
        self.app = Starlette(
            routes=[
                Route("/.well-known/jwks.json", self.jwks),
                Route("/api/licenses/{license_id}", self.current),
                Route("/api/licenses/{license_id}/events", self.events),
            ]
        )

    async def jwks(self, request: Request) -> Response:
        self.requests.append(request.url.path)
        return JSONResponse({"keys": [public_jwk(self.key.public_key())]})

    async def current(self, request: Request) -> Response:
        self.requests.append(request.url.path)
        return JSONResponse({**self.state, "lease": self.lease})

    async def events(self, request: Request) -> Response:
        self.requests.append(request.url.path)

        async def body() -> AsyncIterator[bytes]:
            lease = json.dumps({"lease": self.lease, "seq": 99, "exp": jwt.decode(self.lease, options={
                "verify_signature": False})["exp"]})  # fmt: skip
            yield f"retry: 100\nid: 99\ndata: {json.dumps(self.state)}\n\nevent: lease\ndata: {lease}\n\n".encode()
            await asyncio.Event().wait()  # open until the client leaves

        return StreamingResponse(body(), media_type="text/event-stream")


async def follow_until(client: LicenseClient, done: Callable[[], bool]) -> None:
    task = asyncio.create_task(client.run(lambda event: None))
    try:
        await async_wait_until(lambda: task.done() or done(), 10, "the fake broker's state and lease")
        if task.done():
            task.result()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_fake_broker_with_its_own_jwks_cannot_unlock_a_client_that_pins_the_real_key(tmp_path: Path) -> None:
    fake = FakeBroker(LICENSE)
    real_pem = public_pem(REAL.signing.public_key())
    async with serving(fake.app) as url:
        # As the 0.1 docs wrote it: for_server(<the broker's address>, <the pinned key>).
        verifier = LeaseVerifier.for_server(url, real_pem)
        client = LicenseClient(url, LICENSE, "any-token", verifier=verifier, cache=tmp_path / "lease")
        await follow_until(client, lambda: client.rejected_leases >= 1 or client.is_entitled())
        assert client.state is not None and client.state["entitled"] is True  # it did serve its state
        assert not client.is_entitled() and client.lease is None
        assert client.rejected_leases == 1
        assert await client.accept_lease(fake.lease) is None  # GET /api/licenses/{id}'s lease: the same
        with pytest.raises(InvalidLease, match="does not pin"):
            verifier.verify(fake.lease, LICENSE)
    assert "/.well-known/jwks.json" not in fake.requests  # never asked: nothing it serves is trusted
    assert "/api/licenses/lic_trust_test/events" in fake.requests
    assert not (tmp_path / "lease").exists()  # nothing cached
    restarted = LicenseClient(OFFLINE, LICENSE, "t", verifier=LeaseVerifier(real_pem), cache=tmp_path / "lease")
    assert not restarted.is_entitled()


@pytest.mark.parametrize("verifier", ["none", "for_server(url), no key"])
async def test_a_client_with_no_pinned_key_follows_the_live_state_only_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, verifier: str
) -> None:
    fake = FakeBroker(LICENSE)
    async with serving(fake.app) as url:
        unpinned = None if verifier == "none" else LeaseVerifier.for_server(url)  # 0.1 read the JWKS then
        with caplog.at_level(logging.WARNING, "license_broker_client"):
            client = LicenseClient(url, LICENSE, "any-token", verifier=unpinned, cache=tmp_path / "lease")
        assert client.trust == "unverified"
        assert "no pinned lease key" in caplog.text and "never unlocks offline" in caplog.text
        entitlement: list[bool] = []
        client.on_entitlement = entitlement.append
        await follow_until(client, lambda: client.state is not None)
        # Online it follows the (unsigned, here fake) live state: that is all an unpinned client can do.
        assert client.is_entitled() and entitlement == [True]
        assert client.lease is None and await client.accept_lease(fake.lease) is None
    assert "/.well-known/jwks.json" not in fake.requests
    assert not (tmp_path / "lease").exists() and not (tmp_path / "lease.watermark").exists()
    assert not LicenseClient(OFFLINE, LICENSE, "t", verifier=unpinned, cache=tmp_path / "lease").is_entitled()


def test_the_client_pins_exactly_what_keys_public_prints_during_a_rotation() -> None:
    """`license-broker keys public > public-key.pem` with the key of rotation step 2 configured:
    the new key signs, the old one is still published. Both verify; a third key does not."""
    old, new = LeaseKeys.generate(), LeaseKeys.generate()
    setting = private_pem(new.signing) + public_pem(old.signing.public_key())
    printed = run_module("license_broker", "keys", "public", env={"LICENSE_SIGNING_KEY": setting})
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout.count("BEGIN PUBLIC KEY") == 2
    verifier = LeaseVerifier(printed.stdout)  # the file's text, as the app reads it
    assert verifier.kids == {key_id(old.signing.public_key()), key_id(new.signing.public_key())}
    state = {"license_id": LICENSE, "seq": 4, "status": "active", "entitled": True, "state": {}}
    for keys in (old, new):
        assert verifier.verify(LeaseSigner(keys).sign(lease_claims(state)).token, LICENSE).entitled
    with pytest.raises(InvalidLease, match="does not pin"):
        verifier.verify(LeaseSigner(LeaseKeys.generate()).sign(lease_claims(state)).token, LICENSE)
