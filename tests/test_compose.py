"""compose.yaml against the real CLI: services, commands, settings (no Docker engine here)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import yaml
from sqlalchemy.engine import make_url

from broker.settings import Settings, SettingsError
from license_broker.cli import parser
from tests.support.processes import ROOT, Process
from tests.support.services import unavailable
from tests.support.waiting import free_port, wait_until

# What a user puts in .env next to compose.yaml.
SECRETS = {
    "STRIPE_WEBHOOK_SECRET": "whsec_compose_test",
    "STREAM_TOKEN_SECRET": "c" * 40,
    "POSTGRES_PASSWORD": "pg0compose0secret",
    "REDIS_PASSWORD": "redis0compose0secret",
}
_VARIABLE = re.compile(r"\$\{(\w+)(?:(:\?|:-)([^}]*))?\}")


class Unset(Exception):
    """What compose stops with: a required variable is unset (the message is the user's hint)."""


def interpolate(value: str, env: dict[str, str] | None = None) -> str:
    """Compose's ${VAR}, ${VAR:?message} and ${VAR:-default}."""
    env = SECRETS if env is None else env

    def one(match: re.Match[str]) -> str:
        name, kind, argument = match.groups()
        if env.get(name):
            return env[name]
        if kind == ":?":
            raise Unset(argument)
        if kind == ":-":
            return argument
        return ""

    return _VARIABLE.sub(one, value)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
    return data


def env_of(service: dict[str, Any]) -> dict[str, str]:
    return {name: interpolate(str(value)) for name, value in (service.get("environment") or {}).items()}


def test_the_stack_has_postgres_redis_a_one_shot_migration_webhook_and_stream(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"postgres", "redis", "migrate", "webhook", "stream"}
    assert services["migrate"]["restart"] == "no"
    for name in ("webhook", "stream"):
        assert services[name]["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}
        assert services[name]["depends_on"]["redis"] == {"condition": "service_healthy"}
    assert services["migrate"]["depends_on"]["postgres"] == {"condition": "service_healthy"}


@pytest.mark.parametrize(("service", "command"), [("migrate", "migrate"), ("webhook", "webhook"), ("stream", "stream")])
def test_each_command_is_a_real_subcommand_with_valid_settings(
    compose: dict[str, Any], service: str, command: str
) -> None:
    spec = compose["services"][service]
    args = parser().parse_args(spec["command"])
    assert args.command == command
    settings = Settings.from_env(env_of(spec))
    assert settings.transport == "redis" and settings.database_url.startswith("postgresql+psycopg://")
    ports = [interpolate(port) for port in spec.get("ports", [])]
    if command == "webhook":
        settings.require_webhook()
        assert ports == [f"127.0.0.1:{args.port}:{args.port}"]
    if command == "stream":
        settings.require_stream()
        assert ports == [f"127.0.0.1:{args.port}:{args.port}"] and args.workers >= 1


def test_the_image_installs_every_package_and_runs_the_console_script() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for package in project["tool"]["setuptools"]["packages"]["find"]["include"]:
        assert f"COPY {package.rstrip('*')} " in dockerfile
    assert 'ENTRYPOINT ["license-broker"]' in dockerfile
    assert project["project"]["scripts"]["license-broker"] == "license_broker.cli:main"


def test_the_image_does_not_default_to_development_mode() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "BROKER_DEV" not in dockerfile.replace("(BROKER_DEV)", "")
    assert not re.search(r"^ENV .*\bHOST=", dockerfile, re.M)
    command = json.loads(re.search(r"^CMD (.+)$", dockerfile, re.M).group(1))  # type: ignore[union-attr]
    args = parser().parse_args(command)
    assert (args.command, args.host) == ("serve", "0.0.0.0")
    # Were BROKER_DEV given to the container, its command would refuse to start.
    with pytest.raises(SettingsError, match=r"^BROKER_DEV: development mode serves on a loopback host only"):
        Settings.from_env({"BROKER_DEV": "1"}).require_development_ok(args.command, args.host)


def test_every_credential_comes_from_the_environment_with_no_default(compose: dict[str, Any]) -> None:
    text = (ROOT / "compose.yaml").read_text()
    required = {m.group(1) for m in _VARIABLE.finditer(text) if m.group(2) == ":?"}
    assert required == set(SECRETS)
    # Each one, unset, stops compose with a message naming it; none has a default anywhere.
    for name in SECRETS:
        for m in _VARIABLE.finditer(text):
            if m.group(1) == name:
                assert m.group(2) == ":?" and m.group(3).startswith(f"set {name}"), m.group(0)
        with pytest.raises(Unset, match=f"^set {name}"):
            for service in compose["services"].values():
                for value in [*(service.get("environment") or {}).values(), *(service.get("command") or [])]:
                    interpolate(str(value), {k: v for k, v in SECRETS.items() if k != name})
    postgres = env_of(compose["services"]["postgres"])
    assert postgres["POSTGRES_PASSWORD"] == SECRETS["POSTGRES_PASSWORD"]
    for service in ("migrate", "webhook", "stream"):
        env = env_of(compose["services"][service])
        database, redis_address = make_url(env["DATABASE_URL"]), make_url(env["REDIS_URL"])
        assert (database.username, database.password) == (postgres["POSTGRES_USER"], SECRETS["POSTGRES_PASSWORD"])
        assert redis_address.password == SECRETS["REDIS_PASSWORD"]


def test_redis_requires_the_password_the_services_use(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    command = [interpolate(str(arg)) for arg in redis["command"]]
    assert command[command.index("--requirepass") + 1] == SECRETS["REDIS_PASSWORD"]
    # The health check's redis-cli authenticates through REDISCLI_AUTH.
    assert env_of(redis)["REDISCLI_AUTH"] == SECRETS["REDIS_PASSWORD"]


def test_published_ports_listen_on_loopback_unless_overridden(compose: dict[str, Any]) -> None:
    published = [port for service in compose["services"].values() for port in service.get("ports", [])]
    assert published, "the webhook and the stream publish their ports"
    for port in published:
        assert interpolate(port).startswith("127.0.0.1:"), port
        assert interpolate(port, {**SECRETS, "BIND_ADDRESS": "0.0.0.0"}).startswith("0.0.0.0:"), port
    for name in ("postgres", "redis", "migrate"):
        assert "ports" not in compose["services"][name]


def test_metrics_answer_only_inside_the_container_unless_a_metrics_token_is_set(compose: dict[str, Any]) -> None:
    for service in ("webhook", "stream"):
        env = env_of(compose["services"][service])
        settings = Settings.from_env(env)
        # Neither its own port nor a token: /metrics answers loopback peers only, i.e. inside the
        # container (a published port reaches it from docker's gateway, not from loopback).
        assert (settings.metrics_port, settings.metrics_token) == (None, None)
        assert "METRICS_HOST" not in env
        token = "t" * 24
        given = {name: interpolate(str(value), {**SECRETS, "METRICS_TOKEN": token}) for name, value in
                 compose["services"][service]["environment"].items()}  # fmt: skip
        assert Settings.from_env(given).metrics_token == token


def test_the_services_start_with_the_compose_settings(
    compose: dict[str, Any], postgres_url: str, tmp_path: Path, spawn: Callable[..., Process]
) -> None:
    """The compose environment and a redis-server run with the compose command line, with the
    hosts pointed at this machine's services."""
    binary = shutil.which("redis-server")
    if binary is None:
        unavailable("redis-server", FileNotFoundError("redis-server"))
    port = free_port()
    redis_command = [interpolate(str(arg)) for arg in compose["services"]["redis"]["command"]]
    redis_command[0:1] = [str(binary), "--port", str(port), "--bind", "127.0.0.1"]
    server = subprocess.Popen(redis_command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        anonymous = redis.Redis(port=port, socket_connect_timeout=1)

        def refuses_anonymous() -> bool:
            try:
                anonymous.ping()
            except redis.AuthenticationError:
                return True
            except redis.ResponseError as exc:
                return "NOAUTH" in str(exc)
            except redis.ConnectionError:
                return False
            return False

        wait_until(refuses_anonymous, what="redis-server with --requirepass")

        def local(service: str) -> dict[str, str]:
            env = env_of(compose["services"][service])
            env["DATABASE_URL"] = postgres_url
            # The compose URL, password included, pointed at the server above.
            env["REDIS_URL"] = make_url(env["REDIS_URL"]).set(host="127.0.0.1", port=port).render_as_string(False)
            return env

        webhook = spawn("webhook", local("webhook"))
        stream = spawn("stream", local("stream"))
        for process in (webhook, stream):
            ready = httpx.get(f"{process.url}/readyz", timeout=5)
            assert ready.status_code == 200
            assert (ready.json()["transport_name"], ready.json()["transport"]) == ("redis", "ok")
            # From inside the container: answered. Through a proxy on the host: refused.
            assert httpx.get(f"{process.url}/metrics", timeout=5).status_code == 200
            proxied = httpx.get(f"{process.url}/metrics", headers={"x-forwarded-for": "203.0.113.9"}, timeout=5)
            assert proxied.status_code == 403
    finally:
        server.kill()
        server.wait()


def test_every_file_the_packages_need_at_run_time_is_in_the_wheel() -> None:
    """The image installs a wheel: a template or page missing from package-data is a 500 there."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    package_data: dict[str, list[str]] = project["tool"]["setuptools"]["package-data"]
    for package in project["tool"]["setuptools"]["packages"]["find"]["include"]:
        top = ROOT / package.rstrip("*")
        for path in top.rglob("*"):
            if path.is_dir() or path.suffix in (".py", ".pyc") or "__pycache__" in path.parts:
                continue
            relative = path.relative_to(top)
            patterns = package_data.get(top.name, [])
            assert any(relative.match(pattern) for pattern in patterns), f"{path} is not in package-data"
