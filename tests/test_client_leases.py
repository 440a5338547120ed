"""The Python client (license_broker_client, installed from its wheel) against a real server
that signs leases: it unlocks on verified leases, caches them, starts offline from the cache,
tells the app when a lease runs out offline, and verifies across a key rotation with the keys
the app pins."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from license_broker_client import InvalidLease, Lease, LeaseCache, LeaseVerifier, LicenseClient

from broker.signing.leases import LeaseKeys, public_pem
from license_broker.embedded import create_app
from tests.support.licenses import make_settings, new_license, post_event, token_for
from tests.support.processes import serving
from tests.support.waiting import async_wait_until, free_port
from webhook.samples import SampleEvents

KEY_A, KEY_B = LeaseKeys.generate(), LeaseKeys.generate()
OFFLINE = f"http://127.0.0.1:{free_port()}"  # nothing listens there


def pinned(keys: LeaseKeys = KEY_A, **options: Any) -> LeaseVerifier:
    return LeaseVerifier([public_pem(keys.signing.public_key())], **options)


async def send(url: str, license_id: str, action: str) -> None:
    async with httpx.AsyncClient() as client:
        for event in SampleEvents(license_id).for_action(action):
            assert (await post_event(client, url, event)).status_code == 200


async def served_lease(url: str, license_id: str) -> str:
    headers = {"authorization": f"Bearer {token_for(license_id)}"}
    async with httpx.AsyncClient() as client:
        lease: str = (await client.get(f"{url}/api/licenses/{license_id}", headers=headers)).json()["lease"]
    return lease


async def test_the_client_unlocks_and_locks_on_verified_leases_and_caches_the_last(pg_url: str, tmp_path: Path) -> None:
    license_id = new_license()
    leases: list[Lease] = []
    async with serving(create_app(make_settings(pg_url, lease_keys=KEY_A))) as url:
        client = LicenseClient(
            url, license_id, token_for(license_id), verifier=pinned(), cache=tmp_path / "lease", on_lease=leases.append
        )
        task = asyncio.create_task(client.run(lambda event: None))
        try:
            await async_wait_until(lambda: len(leases) == 1, 10, "the first lease")
            assert not client.is_entitled() and leases[0].status == "none"
            await send(url, license_id, "pay")
            await async_wait_until(client.is_entitled, 10, "unlocked by a lease")
            assert client.state is not None and client.lease is not None
            assert client.lease.seq == client.state["seq"] == client.last_event_id
            await send(url, license_id, "cancel")
            await async_wait_until(lambda: not client.is_entitled(), 10, "locked by a lease")
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    assert client.rejected_leases == 0
    assert [lease.seq for lease in leases] == sorted({lease.seq for lease in leases})  # one per state, in order
    cached = pinned().verify(LeaseCache(tmp_path / "lease").load() or "", license_id)
    assert (cached.seq, cached.status, cached.entitled) == (leases[-1].seq, "canceled", False)


async def test_an_app_started_offline_is_entitled_by_its_cached_lease_and_locked_without_one(
    pg_url: str, tmp_path: Path
) -> None:
    license_id = new_license()
    async with serving(create_app(make_settings(pg_url, lease_keys=KEY_A))) as url:
        await send(url, license_id, "pay")
        online = LicenseClient(url, license_id, token_for(license_id), verifier=pinned(), cache=tmp_path / "lease")
        task = asyncio.create_task(online.run(lambda event: None))
        try:
            await async_wait_until(online.is_entitled, 10, "its lease")
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    # The server is gone; the app restarts.
    offline = LicenseClient(OFFLINE, license_id, token_for(license_id), verifier=pinned(), cache=tmp_path / "lease")
    assert offline.is_entitled()
    no_cache = LicenseClient(OFFLINE, license_id, token_for(license_id), verifier=pinned(), cache=tmp_path / "none")
    assert not no_cache.is_entitled()
    # A cached lease whose payload was edited (any claim) does not verify: locked.
    header, payload, signature = (tmp_path / "lease").read_text().strip().split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["exp"] += 365 * 86400
    edited = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    (tmp_path / "lease").write_text(f"{header}.{edited}.{signature}\n")
    assert not LicenseClient(OFFLINE, license_id, "t", verifier=pinned(), cache=tmp_path / "lease").is_entitled()


async def test_a_served_lease_is_refused_when_tampered_expired_or_for_another_license(pg_url: str) -> None:
    license_id = new_license()
    async with serving(create_app(make_settings(pg_url, lease_keys=KEY_A, lease_ttl=600))) as url:
        await send(url, license_id, "pay")
        token = await served_lease(url, license_id)
    lease = pinned().verify(token, license_id)
    assert lease.entitled and lease.expires_at - lease.issued_at == 600
    header, payload, signature = token.split(".")
    with pytest.raises(InvalidLease, match="does not verify"):
        pinned().verify(f"{header}.{payload[:-2]}{'AA' if payload[-2:] != 'AA' else 'BB'}.{signature}", license_id)
    with pytest.raises(InvalidLease, match="expired"):
        pinned(clock=lambda: lease.expires_at).verify(token, license_id)
    with pytest.raises(InvalidLease, match="another license"):
        pinned().verify(token, new_license())
    with pytest.raises(InvalidLease, match="does not pin"):
        pinned(KEY_B).verify(token, license_id)


async def test_across_a_rotation_an_app_verifies_the_keys_it_pins_and_no_other(pg_url: str) -> None:
    """Two deployments on one database: key A; then B signing with A still published. The app
    update of rotation step 1 pins both keys; an app that pins only A refuses B's leases (and
    locks once its cached lease expires), whatever the broker's JWKS publishes."""
    license_id = new_license()
    rotating = KEY_B.with_published(KEY_A.signing.public_key())
    async with (
        serving(create_app(make_settings(pg_url, lease_keys=KEY_A))) as before,
        serving(create_app(make_settings(pg_url, lease_keys=rotating))) as during,
    ):
        await send(before, license_id, "pay")
        old = await served_lease(before, license_id)
        new = await served_lease(during, license_id)
    both = LeaseVerifier([public_pem(KEY_B.signing.public_key()), public_pem(KEY_A.signing.public_key())])
    assert both.verify(old, license_id).entitled and both.verify(new, license_id).entitled
    assert pinned(KEY_A).verify(old, license_id).entitled
    with pytest.raises(InvalidLease, match="does not pin"):
        pinned(KEY_A).verify(new, license_id)


async def test_the_app_is_told_when_its_lease_runs_out_offline(pg_url: str, tmp_path: Path) -> None:
    """The lease-expiry timer: the broker goes away, and the client reports the lock itself when
    the last lease expires (a 2 s lease here), without the app polling is_entitled()."""
    license_id = new_license()
    entitlement: list[tuple[bool, float]] = []
    statuses: list[str] = []
    async with serving(create_app(make_settings(pg_url, lease_keys=KEY_A, lease_ttl=2))) as url:
        await send(url, license_id, "pay")
        client = LicenseClient(
            url, license_id, token_for(license_id), verifier=pinned(), cache=tmp_path / "lease",
            on_entitlement=lambda entitled: entitlement.append((entitled, time.time())),
            on_status=statuses.append, min_backoff=0.05, max_backoff=0.2,
        )  # fmt: skip
        task = asyncio.create_task(client.run(lambda event: None))
        await async_wait_until(lambda: [e for e, _ in entitlement] == [True], 10, "unlocked")
    # The server is gone: the client keeps reconnecting, and its last lease runs out.
    try:
        await async_wait_until(lambda: len(entitlement) == 2, 10, "the lock when the lease expires")
        assert client.lease is not None
        assert entitlement[1][0] is False and entitlement[1][1] >= client.lease.expires_at
        assert entitlement[1][1] - client.lease.expires_at < 1.5  # told within a moment, not a minute
        assert not client.is_entitled() and "reconnecting" in statuses
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert statuses[:2] == ["connecting", "live"] and statuses[-1] == "stopped"
