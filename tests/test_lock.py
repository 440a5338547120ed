"""The supply chain: requirements.lock pins every dependency to one version and its hashes, it is
current with pyproject.toml, the image installs exactly it, and `make check` audits it."""

from __future__ import annotations

import re
import subprocess
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from scripts.audit_lock import command
from tests.support.processes import ROOT

_PIN = re.compile(r"^([A-Za-z0-9._-]+)==(\S+)")


def locked() -> dict[str, tuple[str, list[str], list[str]]]:
    """name -> (version, hashes, what it is there for) from pip-compile's output."""
    entries: dict[str, tuple[str, list[str], list[str]]] = {}
    name = ""
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if match := _PIN.match(line):
            name = canonicalize_name(match.group(1))
            entries[name] = (match.group(2), [], [])
        elif name and (hashed := re.search(r"--hash=sha256:([0-9a-f]{64})", line)):
            entries[name][1].append(hashed.group(1))
        elif name and (via := re.match(r"\s+#\s+(?:via\s+)?(\S.*)$", line)):
            entries[name][2].append(via.group(1))
    return entries


def project() -> dict[str, object]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_dependency_is_pinned_with_hashes_within_the_bounds_of_pyproject() -> None:
    entries = locked()
    assert entries, "requirements.lock pins nothing"
    for name, (version, hashes, _) in entries.items():
        assert re.fullmatch(r"[0-9][0-9A-Za-z.+-]*", version), (name, version)
        assert hashes, f"{name} has no hash"
    for spec in project()["project"]["dependencies"]:  # type: ignore[index]
        requirement = Requirement(spec)
        name = canonicalize_name(requirement.name)
        assert name in entries, f"{name} is not in requirements.lock: run make lock"
        assert requirement.specifier.contains(entries[name][0]), f"{name}=={entries[name][0]} is not {spec}"


def test_the_lock_is_current_with_pyproject() -> None:
    """What pip-compile marks as coming from pyproject.toml is exactly what pyproject.toml asks for."""
    wanted = {canonicalize_name(Requirement(spec).name) for spec in project()["project"]["dependencies"]}  # type: ignore[index]
    build = {canonicalize_name(Requirement(spec).name) for spec in project()["build-system"]["requires"]}  # type: ignore[index]
    direct = {name for name, (_, _, via) in locked().items() if "license-broker (pyproject.toml)" in via}
    from_build = {name for name, (_, _, via) in locked().items() if any("build-system.requires" in v for v in via)}
    assert direct == wanted
    assert from_build == build


def test_the_image_installs_the_lock_with_its_hashes_and_resolves_nothing_else() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    runs = [line for line in dockerfile.splitlines() if line.startswith("RUN ")]
    installs = [part.strip() for line in runs for part in line[4:].split("&&") if "pip install" in part]
    assert installs == [
        "pip install --require-hashes --no-deps -r requirements.lock",
        "pip install --no-deps --no-build-isolation .",
    ]
    assert dockerfile.index("COPY requirements.lock") < dockerfile.index("--require-hashes")
    assert "pip check" in dockerfile


def test_make_check_audits_the_lock() -> None:
    dry_run = subprocess.run(["make", "-n", "check"], cwd=ROOT, capture_output=True, text=True, timeout=30, check=True)
    audit = [line for line in dry_run.stdout.splitlines() if "scripts.audit_lock" in line]
    assert audit == [".venv/bin/python -m scripts.audit_lock requirements.lock"], dry_run.stdout
    # What it runs: pip-audit on the lock with its hashes (tests/test_audit_lock.py: how it judges).
    assert command("pip-audit", ROOT / "requirements.lock")[1:5] == [
        "--require-hashes", "--disable-pip", "-r", str(ROOT / "requirements.lock")
    ]  # fmt: skip
