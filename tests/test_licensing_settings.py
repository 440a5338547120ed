"""The settings of keys and machines: defaults, development mode, and one line naming the
variable for each bad value."""

from __future__ import annotations

import pytest

from broker.settings import Settings, SettingsError

SECRET = "s" * 32


def test_keys_are_off_until_license_key_secret_is_set_and_development_mode_makes_one_per_run() -> None:
    assert Settings.from_env({}).license_keys is None
    on = Settings.from_env({"LICENSE_KEY_SECRET": f"{SECRET}, {'t' * 40}"})
    assert on.license_keys is not None and len(on.license_keys.secrets) == 2 and not on.license_keys.ephemeral
    dev = [Settings.from_env({"BROKER_DEV": "1"}).license_keys for _ in range(2)]
    assert all(v is not None and v.ephemeral for v in dev)
    assert dev[0] is not None and dev[1] is not None and dev[0].current.id != dev[1].current.id
    defaults = Settings.from_env({})
    assert (defaults.max_machines, defaults.machine_ttl, defaults.machine_token_ttl) == (3, None, 30 * 86400)
    assert (defaults.public_url, defaults.app_name, defaults.app_url_scheme) == (None, None, None)


def test_the_new_settings_are_read() -> None:
    settings = Settings.from_env(
        {
            "LICENSE_MAX_MACHINES": "0",
            "LICENSE_MACHINE_TTL": "3600",
            "MACHINE_TOKEN_TTL": "86400",
            "PUBLIC_URL": "https://licenses.example.com/broker/",
            "APP_NAME": "Acme Draw",
            "APP_URL_SCHEME": "AcmeDraw://",
        }
    )
    assert (settings.max_machines, settings.machine_ttl, settings.machine_token_ttl) == (0, 3600, 86400)
    assert settings.public_url == "https://licenses.example.com/broker"
    assert (settings.app_name, settings.app_url_scheme) == ("Acme Draw", "acmedraw")
    assert Settings.from_env({"PUBLIC_URL": "http://127.0.0.1:8000"}).public_url == "http://127.0.0.1:8000"
    # A shorter STREAM_TOKEN_MAX_TTL shortens the default machine token too.
    assert Settings.from_env({"STREAM_TOKEN_MAX_TTL": "86400"}).machine_token_ttl == 86400


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"LICENSE_KEY_SECRET": "short"}, "LICENSE_KEY_SECRET: each secret must be at least 32 characters"),
        ({"LICENSE_KEY_SECRET": f"{SECRET},short"}, "LICENSE_KEY_SECRET: each secret"),
        ({"LICENSE_MAX_MACHINES": "-1"}, "LICENSE_MAX_MACHINES: must be at least 0"),
        ({"LICENSE_MAX_MACHINES": "three"}, "LICENSE_MAX_MACHINES: expected a whole number"),
        ({"LICENSE_MAX_MACHINES": "5000"}, "LICENSE_MAX_MACHINES: must be at most 1000"),
        ({"LICENSE_MACHINE_TTL": "0.5"}, "LICENSE_MACHINE_TTL: must be 0 (off) or at least 1 second"),
        ({"LICENSE_MACHINE_TTL": "soon"}, "LICENSE_MACHINE_TTL: expected a number"),
        ({"MACHINE_TOKEN_TTL": "10"}, "MACHINE_TOKEN_TTL: must be at least 60"),
        ({"MACHINE_TOKEN_TTL": "9999999"}, "MACHINE_TOKEN_TTL: must be at most STREAM_TOKEN_MAX_TTL"),
        ({"PUBLIC_URL": "licenses.example.com"}, "PUBLIC_URL: expected https://host"),
        ({"PUBLIC_URL": "http://licenses.example.com"}, "PUBLIC_URL: must be https"),
        ({"PUBLIC_URL": "https://x.example/?a=1"}, "PUBLIC_URL: expected https://host"),
        ({"APP_NAME": "x" * 81}, "APP_NAME: at most 80 printable characters"),
        ({"APP_URL_SCHEME": "https"}, "APP_URL_SCHEME: expected your app's own URL scheme"),
        ({"APP_URL_SCHEME": "javascript"}, "APP_URL_SCHEME: expected your app's own URL scheme"),
        ({"APP_URL_SCHEME": "my app"}, "APP_URL_SCHEME: expected your app's own URL scheme"),
    ],
)
def test_a_bad_value_stops_with_one_line_naming_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError) as error:
        Settings.from_env(env)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)
