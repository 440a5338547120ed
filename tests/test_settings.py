from __future__ import annotations

import argparse
import re
import shlex
import subprocess

import pytest

from broker.settings import Settings, SettingsError
from broker.signing.leases import LeaseKeys, private_pem
from license_broker import cli
from license_broker.cli import parser
from tests.support.processes import ROOT, run_module


def test_defaults_are_the_embedded_sqlite_and_memory_transport() -> None:
    settings = Settings.from_env({})
    assert settings.database_url.startswith("sqlite+aiosqlite:///")
    assert settings.transport == "memory"
    assert settings.poll_interval == 2.0
    assert settings.entitled_statuses == {"trialing", "active", "past_due"}
    assert settings.webhook_secrets == () and settings.token_secret is None
    assert settings.webhook_max_body == 256 * 1024
    assert (settings.max_streams, settings.max_streams_per_license, settings.replay_limit) == (20_000, 10, 1000)


def test_the_stream_reads_leave_connections_of_the_pool_to_the_webhook() -> None:
    assert Settings.from_env({"DATABASE_POOL_SIZE": "10"}).stream_db_slots == 8
    assert Settings.from_env({"DATABASE_POOL_SIZE": "1"}).stream_db_slots == 1


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
        ({"REDIS_KEY_PREFIX": "two words:"}, "REDIS_KEY_PREFIX"),
        ({"REDIS_KEY_PREFIX": "p" * 65}, "REDIS_KEY_PREFIX"),
        ({"BROKER_POLL_INTERVAL": "fast"}, "BROKER_POLL_INTERVAL"),
        ({"BROKER_POLL_INTERVAL": "0"}, "BROKER_POLL_INTERVAL"),
        ({"STRIPE_WEBHOOK_SECRET": "sk_live_oops"}, "STRIPE_WEBHOOK_SECRET"),
        ({"STREAM_TOKEN_SECRET": "short"}, "STREAM_TOKEN_SECRET"),
        ({"DATABASE_URL": "mysql://db/x"}, "DATABASE_URL"),
        ({"BROKER_DEV": "maybe"}, "BROKER_DEV"),
        ({"WEBHOOK_MAX_BODY": "lots"}, "WEBHOOK_MAX_BODY"),
        ({"WEBHOOK_MAX_BODY": "10"}, "WEBHOOK_MAX_BODY"),
        ({"STREAM_MAX_CONNECTIONS": "0"}, "STREAM_MAX_CONNECTIONS"),
        ({"STREAM_MAX_CONNECTIONS": "lots"}, "STREAM_MAX_CONNECTIONS"),
        ({"STREAM_MAX_PER_LICENSE": "1.5"}, "STREAM_MAX_PER_LICENSE"),
        ({"STREAM_REPLAY_LIMIT": "-1"}, "STREAM_REPLAY_LIMIT"),
        ({"STREAM_TOKEN_MAX_TTL": "0"}, "STREAM_TOKEN_MAX_TTL"),
        ({"STREAM_TOKEN_MAX_TTL": "30d"}, "STREAM_TOKEN_MAX_TTL"),
        ({"METRICS_PORT": "70000"}, "METRICS_PORT"),
        ({"METRICS_PORT": "metrics"}, "METRICS_PORT"),
        ({"METRICS_TOKEN": "short"}, "METRICS_TOKEN"),
        ({"LOG_FORMAT": "xml"}, "LOG_FORMAT"),
        ({"LOG_LEVEL": "LOUD"}, "LOG_LEVEL"),
        ({"PORT": "http"}, "PORT"),
        ({"PORT": "0"}, "PORT"),
        ({"WEB_CONCURRENCY": "0"}, "WEB_CONCURRENCY"),
        ({"DISPUTE_REVOKES": "everything"}, "DISPUTE_REVOKES"),
        ({"STRIPE_API_BASE": "stripe-proxy.internal"}, "STRIPE_API_BASE"),
        ({"STRIPE_API_BASE": "ftp://stripe-proxy.internal"}, "STRIPE_API_BASE"),
    ],
)
def test_a_malformed_setting_names_the_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(SettingsError, match=f"^{named}:"):
        Settings.from_env(env)


def test_the_servers_listen_work_and_log_as_the_environment_says() -> None:
    assert Settings.from_env({}).port is None
    settings = Settings.from_env(
        {"HOST": "0.0.0.0", "PORT": "9000", "WEB_CONCURRENCY": "3", "LOG_FORMAT": "JSON", "LOG_LEVEL": "debug"}
    )
    assert (settings.port, settings.workers) == (9000, 3)  # HOST is never read: --host only
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
    assert seen == [("127.0.0.1", 8002, 1), ("127.0.0.1", 7001, 1), ("127.0.0.1", 8002, 2)]


def test_secrets_have_no_default_outside_development() -> None:
    settings = Settings.from_env({})
    with pytest.raises(SettingsError, match=r"^STRIPE_WEBHOOK_SECRET:"):
        settings.require_webhook()
    with pytest.raises(SettingsError, match=r"^STREAM_TOKEN_SECRET:"):
        settings.require_stream()


# What earlier versions filled in under BROKER_DEV: public, since they were in this repository.
OLD_DEVELOPMENT_SECRETS = {
    "STRIPE_WEBHOOK_SECRET": "whsec_development_only_do_not_use_in_production",
    "STREAM_TOKEN_SECRET": "development-only-stream-token-secret-do-not-use",
}


def test_development_mode_generates_its_secrets_and_lease_key_at_each_start() -> None:
    first, second = Settings.from_env({"BROKER_DEV": "1"}), Settings.from_env({"BROKER_DEV": "1"})
    assert first.token_secret and second.token_secret and len(first.token_secret) >= 32
    assert first.webhook_secrets[0].startswith("whsec_")
    assert first.webhook_secrets != second.webhook_secrets and first.token_secret != second.token_secret
    assert first.lease_keys and second.lease_keys and first.lease_keys.ephemeral
    assert first.lease_keys.signing.public_key() != second.lease_keys.signing.public_key()
    assert {*first.webhook_secrets, first.token_secret}.isdisjoint(OLD_DEVELOPMENT_SECRETS.values())
    first.require_webhook()
    first.require_stream()
    explicit = Settings.from_env({"BROKER_DEV": "1", "STRIPE_WEBHOOK_SECRET": "whsec_mine"})
    assert explicit.webhook_secrets == ("whsec_mine",)


@pytest.mark.parametrize("name", ["STRIPE_WEBHOOK_SECRET", "STREAM_TOKEN_SECRET"])
def test_the_apps_refuse_a_development_secret_outside_development_mode(name: str) -> None:
    generated = Settings.from_env({"BROKER_DEV": "1"})
    printed = generated.webhook_secrets[0] if name == "STRIPE_WEBHOOK_SECRET" else str(generated.token_secret)
    require = Settings.require_webhook if name == "STRIPE_WEBHOOK_SECRET" else Settings.require_stream
    for value in (OLD_DEVELOPMENT_SECRETS[name], printed):
        # Alone, or as the second secret of a rotation.
        real = "whsec_real" if name == "STRIPE_WEBHOOK_SECRET" else "r" * 40
        for setting in (value, f"{real},{value}"):
            settings = Settings.from_env({name: setting})
            with pytest.raises(SettingsError, match=f"^{name}: a development secret"):
                require(settings)


@pytest.mark.parametrize("command", ["webhook", "stream", "serve"])
def test_a_server_started_with_the_old_public_development_secrets_stops_with_one_line(command: str) -> None:
    env = {"PATH": "/usr/bin:/bin", "DATABASE_URL": "sqlite:///x.db", **OLD_DEVELOPMENT_SECRETS}
    result = run_module("license_broker", command, "--port", "0", env=env)
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert re.match(r"license-broker: (STRIPE_WEBHOOK_SECRET|STREAM_TOKEN_SECRET): a development secret", line)


def test_development_mode_refuses_a_configured_lease_signing_key() -> None:
    env = {"BROKER_DEV": "1", "LICENSE_SIGNING_KEY": private_pem(LeaseKeys.generate().signing)}
    with pytest.raises(SettingsError, match=r"^LICENSE_SIGNING_KEY: refused in development mode"):
        Settings.from_env(env)
    result = run_module("license_broker", "serve", "--port", "0", env={"PATH": "/usr/bin:/bin", **env})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "license-broker: LICENSE_SIGNING_KEY: refused in development mode (BROKER_DEV=1 signs with a key "
        "generated at each start); unset it, or run without BROKER_DEV"
    ]


@pytest.mark.parametrize(
    "base",
    ["http://stripe-proxy.internal", "http://10.0.0.7:8080/", "http://[2001:db8::1]/", "http://127.0.0.1.nip.example"],
)
def test_the_stripe_api_base_must_be_https_except_to_a_loopback_host(base: str) -> None:
    with pytest.raises(SettingsError, match=r"^STRIPE_API_BASE: must be https://"):
        Settings.from_env({"STRIPE_API_BASE": base})


@pytest.mark.parametrize(
    "base",
    [
        "https://stripe-proxy.internal",
        "http://127.0.0.1:12111",
        "http://127.8.0.1",
        "http://[::1]:8080",
        "http://localhost",
    ],
)
def test_an_https_or_loopback_stripe_api_base_is_accepted(base: str) -> None:
    assert Settings.from_env({"STRIPE_API_BASE": base}).stripe_api_base == base


@pytest.mark.parametrize("command", ["webhook", "stream", "serve"])
def test_the_process_refuses_to_start_with_one_line_naming_the_setting(command: str) -> None:
    env = {"PATH": "/usr/bin:/bin", "DATABASE_URL": "sqlite:///x.db", "BROKER_POLL_INTERVAL": "-1"}
    result = run_module("license_broker", command, env=env)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "license-broker: BROKER_POLL_INTERVAL: must be at least 0.01, got '-1'"
    ]


def test_uvicorn_on_its_own_refuses_a_missing_secret_with_one_line() -> None:
    env = {"PATH": "/usr/bin:/bin", "DATABASE_URL": "sqlite:///x.db"}
    result = run_module("uvicorn", "webhook.app:app", "--port", "0", env=env)
    assert result.returncode == 2
    assert "license-broker: STRIPE_WEBHOOK_SECRET: required by the webhook app" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("command", "host", "database_url", "refused"),
    [
        ("serve", "127.0.0.1", "sqlite:///x.db", None),
        ("serve", "localhost", "sqlite:///x.db", None),
        ("serve", "::1", "sqlite:///x.db", None),
        ("serve", "[::1]", "sqlite:///x.db", None),
        ("serve", "127.0.0.2", "sqlite:///x.db", None),
        ("serve", None, "sqlite:///x.db", None),
        ("serve", "0.0.0.0", "sqlite:///x.db", "loopback host only"),
        ("serve", "::", "sqlite:///x.db", "loopback host only"),
        ("serve", "10.0.0.7", "sqlite:///x.db", "loopback host only"),
        ("serve", "localhost.example.com", "sqlite:///x.db", "loopback host only"),
        ("serve", "127.0.0.1", "postgresql://db/broker", "needs an SQLite DATABASE_URL"),
        ("webhook", "127.0.0.1", "sqlite:///x.db", "not 'webhook'"),
        ("token", None, "sqlite:///x.db", "not 'token'"),
        ("uvicorn", None, "sqlite:///x.db", "not 'uvicorn'"),
    ],
)
def test_development_mode_is_only_for_serve_on_loopback_with_sqlite(
    command: str, host: str | None, database_url: str, refused: str | None
) -> None:
    settings = Settings.from_env({"BROKER_DEV": "1", "DATABASE_URL": database_url})
    if refused is None:
        settings.require_development_ok(command, host)
    else:
        with pytest.raises(SettingsError, match=f"^BROKER_DEV: .*{re.escape(refused)}"):
            settings.require_development_ok(command, host)
    # Outside development mode nothing is refused.
    Settings.from_env({"DATABASE_URL": database_url}).require_development_ok(command, host)


@pytest.mark.parametrize(
    ("argv", "extra", "reason"),
    [
        (["license_broker", "token", "lic_1"], {}, "not 'token'"),
        (["license_broker", "webhook", "--port", "0"], {}, "not 'webhook'"),
        (["license_broker", "serve", "--host", "0.0.0.0", "--port", "0"], {}, "loopback host only, not --host 0.0.0.0"),
        (
            ["license_broker", "serve", "--port", "0"],
            {"DATABASE_URL": "postgresql://127.0.0.1:1/x"},
            "an SQLite DATABASE",
        ),
        (["uvicorn", "webhook.app:app", "--port", "0"], {}, "not 'uvicorn'"),
        (["uvicorn", "stream.app:app", "--port", "0"], {}, "not 'uvicorn'"),
    ],
    ids=["token", "webhook", "serve-public-host", "serve-postgres", "uvicorn-webhook", "uvicorn-stream"],
)
def test_development_mode_anywhere_else_stops_start_up_with_one_line(
    argv: list[str], extra: dict[str, str], reason: str
) -> None:
    env = {"PATH": "/usr/bin:/bin", "DATABASE_URL": "sqlite:///x.db", "BROKER_DEV": "1", **extra}
    result = run_module(*argv, env=env)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("license-broker: BROKER_DEV: ") and reason in lines[0], lines


def test_a_host_variable_in_the_environment_does_not_change_where_make_run_binds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HOST", "0.0.0.0")
    dry_run = subprocess.run(["make", "-n", "run"], cwd=ROOT, capture_output=True, text=True, timeout=30, check=True)
    line = next(line for line in dry_run.stdout.splitlines() if "license-broker serve" in line)
    args = parser().parse_args(shlex.split(line)[2:])
    assert (args.command, args.host, args.port) == ("serve", "127.0.0.1", 8000)
    assert parser().parse_args(["serve"]).host == "127.0.0.1"


def readme_settings() -> set[str]:
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("| variable | default | meaning |") :].split("\n\n", 1)[0]
    return set(re.findall(r"`([A-Z][A-Z0-9_]+)`", "\n".join(line.split("|")[1] for line in table.splitlines())))


def test_every_setting_the_broker_reads_is_in_the_readme_table() -> None:
    source = (ROOT / "broker" / "settings.py").read_text()
    read = set(re.findall(r"_(?:str|bool|float)\(env, \"([A-Z][A-Z0-9_]+)\"", source))
    assert "WEBHOOK_MAX_BODY" in read
    assert read - readme_settings() == set()


# The settings of the hostile-input work (DESIGN.md's contract names), and the secrets an
# operator has to be able to rotate.
SECURITY_SETTINGS = [
    "WEBHOOK_MAX_BODY",
    "STREAM_MAX_CONNECTIONS",
    "STREAM_MAX_PER_LICENSE",
    "STREAM_REPLAY_LIMIT",
    "STREAM_TOKEN_MAX_TTL",
    "STREAM_TOKEN_AUDIENCE",
    "STREAM_TOKEN_ISSUER",
    "METRICS_PORT",
    "METRICS_TOKEN",
    "BROKER_DEV",
]
ROTATED_SECRETS = [
    "STRIPE_WEBHOOK_SECRET",
    "STREAM_TOKEN_SECRET",
    "METRICS_TOKEN",
    "LICENSE_KEY_SECRET",
    "POSTGRES_PASSWORD",
    "REDIS_PASSWORD",
]


def test_the_security_doc_covers_every_limit_and_how_to_rotate_every_secret() -> None:
    security = (ROOT / "docs" / "security.md").read_text()
    table = security[security.index("| variable | default |") :].split("\n\n", 1)[0]
    for name in SECURITY_SETTINGS:
        assert f"| `{name}` |" in table, name
        assert name in readme_settings(), name
    rotation = security[security.index("## Rotating secrets") :].split("\n## ", 1)[0]
    for secret in ROTATED_SECRETS:
        assert f"**`{secret}`" in rotation, secret
    for who in ("Stripe", "desktop app", "operators"):
        assert who in security[: security.index("## Development mode")], who
