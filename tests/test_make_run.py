"""`make run` as a new user meets it: on a fresh copy of the repository it installs only what
serving needs, prints no build warnings and no migration docstrings, and serves the page on
`PORT` (default 8000)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.support.processes import ROOT
from tests.support.services import unavailable
from tests.support.waiting import free_port, wait_until

ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root"), "LANG": "C.UTF-8"}


def dry_run(*args: str, env: dict[str, str] | None = None) -> list[str]:
    done = subprocess.run(
        ["make", "-n", "--no-print-directory", *args],
        cwd=ROOT,
        env={**ENV, **(env or {})},
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return done.stdout.splitlines()


def test_make_run_listens_on_port_8000_unless_port_says_otherwise(tmp_path: Path) -> None:
    venv = f"VENV={tmp_path / 'venv'}"  # a venv that does not exist: the dry run shows the install too
    assert dry_run("run", venv)[-1].endswith("license-broker serve --host 127.0.0.1 --port 8000")
    assert dry_run("run", venv, env={"PORT": "18731"})[-1].endswith("serve --host 127.0.0.1 --port 18731")
    assert dry_run("run", venv, "PORT=18732")[-1].endswith("serve --host 127.0.0.1 --port 18732")


def test_make_run_installs_the_project_without_its_extras_and_make_test_with_them(tmp_path: Path) -> None:
    venv = f"VENV={tmp_path / 'venv'}"
    run = [line for line in dry_run("run", venv) if " pip install " in line]
    assert run[-1].endswith("-m pip install --quiet -e '.'"), run
    test = [line for line in dry_run("test", venv) if " pip install " in line and " -e " in line]
    assert test[0].endswith("-m pip install --quiet -e '.[test,bench]'"), test


def copy_of_the_repository(to: Path) -> Path:
    """What a fresh clone holds: the tracked files and the new ones git does not ignore (so that
    the working tree's changes are tested too)."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        unavailable("a git checkout", FileNotFoundError(ROOT / ".git"))
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    for name in filter(None, listed.split("\0")):
        if (ROOT / name).is_file():
            (to / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, to / name)
    return to


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_make_run_on_a_fresh_copy_serves_the_page_quietly_with_only_the_serving_install(tmp_path: Path) -> None:
    clone = copy_of_the_repository(tmp_path / "license-broker")
    port = free_port()
    log = tmp_path / "make-run.log"
    with log.open("wb") as out:
        make = subprocess.Popen(
            ["make", "run", f"PORT={port}"],
            cwd=clone,
            env=ENV,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # make, the venv's pip, then the server: stopped together below
        )
    try:

        def served() -> bool:
            assert make.poll() is None, log.read_text()
            try:
                return httpx.get(f"http://127.0.0.1:{port}/", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(served, 500, what="make run's page")
        wait_until(lambda: "Application startup complete" in log.read_text(), 10, what="the start-up lines")
    finally:
        os.killpg(make.pid, signal.SIGTERM)
        make.wait(30)
    output = log.read_text()
    assert f"license-broker is serving on http://127.0.0.1:{port}" in output
    # pip's notes on index locations of the machine's own pip configuration are not the project's.
    lines = [line for line in output.splitlines() if not re.match(r"WARNING: Location '.*' is ignored", line)]
    # Nothing from the build backend, and no migration's docstring (alembic's "Running upgrade").
    noise = [line for line in lines if re.search(r"setuptools|BuildBackendWarning|[Dd]eprecat|Running upgrade", line)]
    assert noise == [], output
    # The server's own warnings: only the one about STRIPE_LIVEMODE, which production must set.
    warnings = [line for line in lines if re.match(r"\S+ \S+ WARNING ", line)]
    assert len(warnings) == 1 and "STRIPE_LIVEMODE is not set" in warnings[0], output
    venv = clone / ".venv"
    assert (venv / ".base").exists() and not (venv / ".installed").exists()
    installed = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "list", "--format=freeze"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env=ENV,
    ).stdout.lower()
    assert "starlette==" in installed and "uvicorn==" in installed
    for extra in ("pytest", "playwright", "mypy", "matplotlib", "pip-audit", "twine"):
        assert f"\n{extra}==" not in f"\n{installed}", f"{extra} is installed by make run"
