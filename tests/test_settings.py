from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from broker.settings import DEV_TOKEN_SECRET, DEV_WEBHOOK_SECRET, Settings, SettingsError
from license_broker import cli
from tests.support.processes import ROOT


def test_defaults_are_the_embedded_sqlite_and_memory_transport() -> None:
    settings = Settings.from_env({})
    assert settings.database_url.startswith("sqlite+aiosqlite:///")
    assert settings.transport == "memory"
    assert settings.poll_interval == 2.0
    assert settings.entitled_statuses == {"trialing", "active", "past_due"}
    assert settings.webhook_secrets == () and settings.token_secret is None


def test_redis_url_selects_the_redis_transport() -> None:
    assert Settings.from_env({"REDIS_URL": "redis://127.0.0.1:6379/0"}).transport == "redis"
    settings = Settings.from_env({"REDIS_URL": "redis://127.0.0.1:6379/0", "BROKER_TRANSPORT": "poll"})
    assert settings.transport == "poll"


def test_postgres_urls_get_the_async_driver() -> None:
    settings = Settings.from_env({"DATABASE_URL": "postgresql://u:p@db:5432/broker"})
    assert settings.database_url == "postgresql+psycopg://u:p@db:5432/broker"


def test_several_webhook_secrets_during_a_rotation() -> None:
    settings = Settings.from_env({"STRIPE_WEBHOOK_SECRET": "whsec_old, whsec_new"})
    assert settings.webhook_secrets == ("whsec_old", "whsec_new")


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"BROKER_TRANSPORT": "kafka"}, "BROKER_TRANSPORT"),
        ({"BROKER_TRANSPORT": "redis"}, "REDIS_URL"),
        ({"REDIS_URL": "localhost:6379"}, "REDIS_URL"),
        ({"BROKER_POLL_INTERVAL": "fast"}, "BROKER_POLL_INTERVAL"),
        ({"BROKER_POLL_INTERVAL": "0"}, "BROKER_POLL_INTERVAL"),
        ({"STRIPE_WEBHOOK_SECRET": "sk_live_oops"}, "STRIPE_WEBHOOK_SECRET"),
        ({"STREAM_TOKEN_SECRET": "short"}, "STREAM_TOKEN_SECRET"),
        ({"DATABASE_URL": "mysql://db/x"}, "DATABASE_URL"),
        ({"BROKER_DEV": "maybe"}, "BROKER_DEV"),
        ({"LOG_FORMAT": "xml"}, "LOG_FORMAT"),
        ({"LOG_LEVEL": "LOUD"}, "LOG_LEVEL"),
        ({"PORT": "http"}, "PORT"),
        ({"PORT": "0"}, "PORT"),
        ({"WEB_CONCURRENCY": "0"}, "WEB_CONCURRENCY"),
    ],
)
def test_a_malformed_setting_names_the_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(SettingsError, match=f"^{named}:"):
        Settings.from_env(env)


def test_the_servers_listen_work_and_log_as_the_environment_says() -> None:
    assert Settings.from_env({}).host == "127.0.0.1" and Settings.from_env({}).port is None
    settings = Settings.from_env(
        {"HOST": "0.0.0.0", "PORT": "9000", "WEB_CONCURRENCY": "3", "LOG_FORMAT": "JSON", "LOG_LEVEL": "debug"}
    )
    assert (settings.host, settings.port, settings.workers) == ("0.0.0.0", 9000, 3)
    assert (settings.log_format, settings.log_level) == ("json", "DEBUG")


def test_the_command_line_overrides_the_settings_and_each_command_has_its_own_port(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[tuple[str, int, int | None]] = []

    def run(args: argparse.Namespace, settings: Settings) -> int:
        seen.append((args.host, args.port, getattr(args, "workers", None)))
        return 0

    monkeypatch.setattr(cli, "cmd_stream", run)
    monkeypatch.setattr(cli, "cmd_webhook", run)
    for name in ("HOST", "PORT", "WEB_CONCURRENCY"):
        monkeypatch.delenv(name, raising=False)
    assert cli.main(["stream"]) == cli.main(["webhook", "--port", "7001"]) == 0
    monkeypatch.setenv("HOST", "0.0.0.0")
    monkeypatch.setenv("WEB_CONCURRENCY", "4")
    assert cli.main(["stream", "--workers", "2"]) == 0
    assert seen == [("127.0.0.1", 8002, 1), ("127.0.0.1", 7001, 1), ("0.0.0.0", 8002, 2)]


def test_secrets_have_no_default_outside_development() -> None:
    settings = Settings.from_env({})
    with pytest.raises(SettingsError, match=r"^STRIPE_WEBHOOK_SECRET:"):
        settings.require_webhook()
    with pytest.raises(SettingsError, match=r"^STREAM_TOKEN_SECRET:"):
        settings.require_stream()


def test_development_mode_supplies_development_secrets() -> None:
    settings = Settings.from_env({"BROKER_DEV": "1"})
    assert settings.webhook_secrets == (DEV_WEBHOOK_SECRET,)
    assert settings.token_secret == DEV_TOKEN_SECRET
    explicit = Settings.from_env({"BROKER_DEV": "1", "STRIPE_WEBHOOK_SECRET": "whsec_mine"})
    assert explicit.webhook_secrets == ("whsec_mine",)


@pytest.mark.parametrize("command", ["webhook", "stream", "serve"])
def test_the_process_refuses_to_start_with_one_line_naming_the_setting(command: str) -> None:
    env = {"PATH": "/usr/bin:/bin", "DATABASE_URL": "sqlite:///x.db", "BROKER_POLL_INTERVAL": "-1"}
    result = subprocess.run(
        [sys.executable, "-m", "license_broker", command], env=env, cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "license-broker: BROKER_POLL_INTERVAL: must be at least 0.01, got '-1'"
    ]


def test_uvicorn_on_its_own_refuses_a_missing_secret_with_one_line() -> None:
    env = {"PATH": "/usr/bin:/bin", "DATABASE_URL": "sqlite:///x.db"}
    result = subprocess.run(
        [sys.executable, "-m", "uvicorn", "webhook.app:app", "--port", "0"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "license-broker: STRIPE_WEBHOOK_SECRET: required by the webhook app" in result.stderr
    assert "Traceback" not in result.stderr
