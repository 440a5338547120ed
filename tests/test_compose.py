"""compose.yaml against the real CLI: services, commands, settings (no Docker engine here)."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import yaml

from broker.settings import Settings
from license_broker.cli import parser
from tests.support.processes import ROOT, Process

SECRETS = {"STRIPE_WEBHOOK_SECRET": "whsec_compose_test", "STREAM_TOKEN_SECRET": "c" * 40}


def interpolate(value: str) -> str:
    """Compose's ${VAR:?message} / ${VAR} with the secrets a user puts in .env."""
    return re.sub(r"\$\{(\w+)(?::\?[^}]*)?\}", lambda m: SECRETS[m.group(1)], value)


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
    if command == "webhook":
        settings.require_webhook()
        assert f"{args.port}:{args.port}" in spec["ports"]
    if command == "stream":
        settings.require_stream()
        assert f"{args.port}:{args.port}" in spec["ports"] and args.workers >= 1


def test_the_image_installs_every_package_and_runs_the_console_script() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for package in project["tool"]["setuptools"]["packages"]["find"]["include"]:
        assert f"COPY {package.rstrip('*')} " in dockerfile
    assert 'ENTRYPOINT ["license-broker"]' in dockerfile
    assert project["project"]["scripts"]["license-broker"] == "license_broker.cli:main"


def test_the_services_start_with_the_compose_settings(
    compose: dict[str, Any], postgres_url: str, redis_url: str, spawn: Callable[..., Process]
) -> None:
    """The compose environment, with the hosts pointed at this machine's services."""

    def local(service: str) -> dict[str, str]:
        env = env_of(compose["services"][service])
        env["DATABASE_URL"] = postgres_url
        env["REDIS_URL"] = redis_url
        return env

    webhook = spawn("webhook", local("webhook"))
    stream = spawn("stream", local("stream"))
    for process in (webhook, stream):
        ready = httpx.get(f"{process.url}/readyz", timeout=5)
        assert ready.status_code == 200 and ready.json()["transport_name"] == "redis"


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
