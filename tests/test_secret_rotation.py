"""Rotating each secret without downtime (docs/security.md): during a rotation the broker takes
what was signed with the old secret and with the new one, and signs only with the new one."""

from __future__ import annotations

import time

import httpx
import pytest

from broker.settings import Settings, SettingsError
from broker.signing import tokens
from license_broker.embedded import create_app
from tests.support.licenses import make_settings, new_license, signed
from tests.support.processes import run_module, serving
from webhook.samples import SampleEvents

OLD = "old-stream-token-secret-0123456789abcdef"
NEW = "new-stream-token-secret-0123456789abcdef"


def test_stream_token_secret_takes_several_the_first_one_signing() -> None:
    settings = Settings.from_env({"STREAM_TOKEN_SECRET": f"{NEW}, {OLD}"})
    assert settings.token_secret == NEW
    assert settings.token_secrets == (NEW, OLD)
    assert Settings.from_env({"STREAM_TOKEN_SECRET": NEW}).token_secrets == (NEW,)
    with pytest.raises(SettingsError, match=r"^STREAM_TOKEN_SECRET: each secret must be at least 32"):
        Settings.from_env({"STREAM_TOKEN_SECRET": f"{NEW},short"})


def test_a_token_signed_with_any_secret_of_a_rotation_verifies() -> None:
    for secret in (NEW, OLD):
        assert tokens.verify((NEW, OLD), tokens.mint(secret, "lic_1")).license_id == "lic_1"
    with pytest.raises(tokens.InvalidToken):
        tokens.verify((NEW, OLD), tokens.mint("a-third-secret-nobody-configured-000000", "lic_1"))
    # An expired token is refused whichever secret signed it, not tried against the next one.
    with pytest.raises(tokens.InvalidToken, match="expired"):
        tokens.verify((NEW, OLD), tokens.mint(OLD, "lic_1", ttl=-10))


def test_the_token_command_signs_with_the_first_secret() -> None:
    env = {"PATH": "/usr/bin:/bin", "STREAM_TOKEN_SECRET": f"{NEW},{OLD}"}
    result = run_module("license_broker", "token", "lic_9", env=env)
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    assert tokens.verify(NEW, token).license_id == "lic_9"
    with pytest.raises(tokens.InvalidToken):
        tokens.verify(OLD, token)


async def test_during_a_rotation_the_stream_and_the_webhook_take_old_and_new_signatures(sqlite_url: str) -> None:
    license_id = new_license()
    settings = make_settings(
        sqlite_url,
        token_secret=NEW,
        previous_token_secrets=(OLD,),
        webhook_secrets=("whsec_new_rotation", "whsec_old_rotation"),
    )
    sample = SampleEvents(license_id)
    async with serving(create_app(settings)) as url, httpx.AsyncClient(base_url=url) as client:
        for secret in ("whsec_old_rotation", "whsec_new_rotation"):
            payload, headers = signed(sample.checkout_completed(sample.tick()), secret=secret)
            assert (await client.post("/api/stripe/webhooks", content=payload, headers=headers)).status_code == 200
        payload, headers = signed(sample.checkout_completed(int(time.time())), secret="whsec_retired_rotation")
        assert (await client.post("/api/stripe/webhooks", content=payload, headers=headers)).status_code == 400
        for secret in (OLD, NEW):
            auth = {"authorization": f"Bearer {tokens.mint(secret, license_id)}"}
            assert (await client.get(f"/api/licenses/{license_id}", headers=auth)).status_code == 200, secret
        retired = {"authorization": f"Bearer {tokens.mint('retired-stream-token-secret-0123456789', license_id)}"}
        assert (await client.get(f"/api/licenses/{license_id}", headers=retired)).status_code == 401
