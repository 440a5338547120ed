"""`make dist`: the server's and the Python client's wheel and sdist and the npm tarball, each
checked, then installed the way the docs say into clean environments (a new virtualenv, a new node
project) and used there: the server serves its page, the clients follow a license on a live broker."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from license_broker.embedded import create_app
from scripts.check_npm_tarball import problems
from tests.support.licenses import make_settings, new_license, token_for
from tests.support.markdown import Command, commands
from tests.support.processes import ROOT, serving
from tests.support.services import unavailable
from tests.support.waiting import free_port, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
FILES = {
    "server_wheel": f"license_broker-{VERSION}-py3-none-any.whl",
    "server_sdist": f"license_broker-{VERSION}.tar.gz",
    "client_wheel": f"license_broker_client-{VERSION}-py3-none-any.whl",
    "client_sdist": f"license_broker_client-{VERSION}.tar.gz",
    "npm": f"license-broker-client-{VERSION}.tgz",
}
# The docs' placeholder for the seller's copy of the repository (clients/python/README.md).
PLACEHOLDER_REPOSITORY = "https://git.example.com/your-org/license-broker.git"
CLEAN_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root"), "LANG": "C.UTF-8"}


def run(argv: list[str] | str, cwd: Path, timeout: float = 600, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        argv,
        cwd=cwd,
        shell=isinstance(argv, str),
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**CLEAN_ENV, **(env or {})},
    )
    assert done.returncode == 0, f"{argv} in {cwd}:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """`make dist` into a folder of its own: (the folder that holds dist/, make's output)."""
    if shutil.which("npm") is None or shutil.which("node") is None:
        unavailable("node and npm", FileNotFoundError("npm"))
    root = tmp_path_factory.mktemp("release")
    venv = Path(sys.prefix)  # the venv running these tests: make finds its extras installed
    output = run(
        ["make", "--no-print-directory", "dist", f"DIST={root / 'dist'}", f"VENV={venv}"],
        ROOT,
        env={"PATH": f"{venv / 'bin'}:{CLEAN_ENV['PATH']}", "COLUMNS": "400"},  # twine: one line per file
    )
    yield root, output


def doc_commands(doc: Path, section: str) -> list[Command]:
    """The shell commands of one `## section` of a Markdown file, in order."""
    text = doc.read_text()
    match = re.search(rf"^## {re.escape(section)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"{doc} has no ## {section}"
    first_line = text[: match.start(1)].count("\n") + 1
    last_line = first_line + match.group(1).count("\n")
    return [c for c in commands(doc) if first_line <= c.line <= last_line]


def new_venv(path: Path) -> Path:
    run([sys.executable, "-m", "venv", str(path)], path.parent)
    return path / "bin"


def test_make_dist_builds_the_five_packages_and_checks_each(built: tuple[Path, str]) -> None:
    root, output = built
    output = re.sub(r"\x1b\[[0-9;]*m", "", output)  # twine's colours
    assert sorted(p.name for p in (root / "dist").iterdir()) == sorted(FILES.values())
    for name in FILES.values():
        assert re.search(rf"^Checking \S*/{re.escape(name)}: PASSED$", output, re.M), output
    assert "twine check --strict" in output


def test_the_tarball_check_names_a_missing_entry_point_a_wrong_module_type_and_shipped_stamps(
    tmp_path: Path,
) -> None:
    package = {"name": "p", "version": "1.0.0", "description": "d", "license": "MIT", "engines": {"node": ">=20"},
               "main": "./dist/cjs/index.js", "types": "./dist/cjs/index.d.ts",
               "exports": {".": {"import": "./dist/esm/index.js", "require": "./dist/cjs/index.js"}}}  # fmt: skip
    files = {"package.json": json.dumps(package), "README.md": "# p", "dist/cjs/index.js": "",
             "dist/cjs/index.d.ts": "", "dist/cjs/package.json": '{"type": "commonjs"}',
             "dist/esm/package.json": '{"type": "commonjs"}', "dist/.built": "", "test/a.test.mjs": ""}  # fmt: skip
    for name, text in files.items():
        (tmp_path / "package" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "package" / name).write_text(text)
    with tarfile.open(tmp_path / "p.tgz", "w:gz") as tar:
        tar.add(tmp_path / "package", arcname="package")
    assert sorted(problems(tmp_path / "p.tgz")) == [
        "./dist/esm/index.js is named by package.json but is not in the tarball",
        "dist/.built should not be shipped",
        "dist/esm/package.json does not say type 'module'",
        "test/a.test.mjs should not be shipped",
    ]


def test_the_server_packages_hold_the_migrations_the_page_and_the_command(built: tuple[Path, str]) -> None:
    dist = built[0] / "dist"
    with zipfile.ZipFile(dist / FILES["server_wheel"]) as wheel:
        names = set(wheel.namelist())
        entry_points = wheel.read(f"license_broker-{VERSION}.dist-info/entry_points.txt").decode()
        metadata = wheel.read(f"license_broker-{VERSION}.dist-info/METADATA").decode()
    assert {"broker/storage/migrations/env.py", "broker/storage/migrations/versions/0001_initial.py",
            "stream/static/index.html", "webhook/app.py", "license_broker/cli.py",
            "broker/web/openapi.yaml"} <= names  # fmt: skip
    assert not any(n.startswith(("tests/", "bench/", "clients/", "scripts/")) for n in names)
    assert "license-broker = license_broker.cli:main" in entry_points
    assert "License-Expression: MIT" in metadata and "Requires-Dist: starlette>=1.0" in metadata
    with tarfile.open(dist / FILES["server_sdist"]) as sdist:
        inside = {m.name.split("/", 1)[1] for m in sdist.getmembers() if "/" in m.name}
    assert {"README.md", "pyproject.toml", "broker/storage/migrations/versions/0001_initial.py"} <= inside
    assert not any(n.startswith("tests/") for n in inside)  # MANIFEST.in: they need the whole repository


def test_the_server_installs_as_the_readme_says_and_serves_its_page(built: tuple[Path, str], tmp_path: Path) -> None:
    """README, "Without containers": the locked versions with their hashes, then the wheel."""
    root = built[0]
    (root / "requirements.lock").unlink(missing_ok=True)
    shutil.copy(ROOT / "requirements.lock", root / "requirements.lock")
    steps = [c for c in commands(ROOT / "README.md") if "/opt/license-broker" in c.text]
    assert [c.words[:2] for c in steps] == [
        ["python3", "-m"], ["/opt/license-broker/bin/pip", "install"], ["/opt/license-broker/bin/pip", "install"]
    ]  # fmt: skip
    venv = tmp_path / "opt-license-broker"
    for step in steps:
        run(step.text.replace("/opt/license-broker", str(venv)), root)
    port = free_port()
    workdir = tmp_path / "run"
    workdir.mkdir()
    log = workdir / "serve.log"
    with log.open("wb") as out:  # the child keeps its own copy
        server = subprocess.Popen(
            [str(venv / "bin" / "license-broker"), "serve", "--port", str(port)],
            cwd=workdir,
            env={**CLEAN_ENV, "BROKER_DEV": "1"},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:

        def page() -> bool:
            assert server.poll() is None, log.read_text()
            try:
                return httpx.get(f"http://127.0.0.1:{port}/", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(page, 30, what="the installed server's page")
        assert "EventSource" in httpx.get(f"http://127.0.0.1:{port}/").text
        assert "/api/licenses/{license_id}/events" in httpx.get(f"http://127.0.0.1:{port}/openapi.json").json()["paths"]
        # Served from the wheel, not from this checkout.
        where = run([str(venv / "bin" / "python"), "-c", "import broker; print(broker.__file__)"], workdir)
        assert where.startswith(str(venv))
    finally:
        server.terminate()
        server.wait(15)


FOLLOW_PY = """
import asyncio, sys
from license_broker_client import LicenseClient

async def main():
    client = LicenseClient(sys.argv[1], sys.argv[2], lambda: sys.argv[3])
    stream = client.connect_once()
    first = await asyncio.wait_for(anext(stream), 15)
    await stream.aclose()
    print(first["license_id"], first["status"], first["entitled"])

asyncio.run(main())
"""


async def follow_with(python: Path, cwd: Path) -> str:
    """The installed client, in its own process, follows a new license on a live broker."""
    license_id = new_license()
    async with serving(create_app(make_settings(f"sqlite+aiosqlite:///{cwd / 'broker.db'}"))) as url:
        out = await asyncio.to_thread(
            run, [str(python), "-c", FOLLOW_PY, url, license_id, token_for(license_id)], cwd, 60
        )
    # The line the script prints (a client without a pinned key also logs a warning).
    [line] = [line for line in out.splitlines() if line.startswith(f"{license_id} ")]
    return line


async def test_the_python_client_installs_from_the_wheel_as_its_readme_says(
    built: tuple[Path, str], tmp_path: Path
) -> None:
    root = built[0]
    venv = await asyncio.to_thread(new_venv, tmp_path / "app-venv")
    steps = doc_commands(ROOT / "clients" / "python" / "README.md", "Install")
    wheel = [c for c in steps if "dist/" in c.text and c.words[:2] == ["pip", "install"]]
    assert [c.words for c in wheel] == [["pip", "install", f"dist/{FILES['client_wheel']}"]]
    await asyncio.to_thread(run, f"{venv}/{wheel[0].text}", root)
    line = await follow_with(venv / "python", tmp_path)
    assert line.split()[1:] == ["none", "False"]


async def test_the_python_client_installs_from_a_git_url_and_subdirectory_as_its_readme_says(
    built: tuple[Path, str], tmp_path: Path
) -> None:
    """The README's git line, with this repository (its committed HEAD) for the placeholder."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        unavailable("a git checkout", FileNotFoundError(ROOT / ".git"))
    steps = doc_commands(ROOT / "clients" / "python" / "README.md", "Install")
    [git_line] = [c for c in steps if "git+" in c.text]
    assert PLACEHOLDER_REPOSITORY in git_line.text and git_line.text.endswith('#subdirectory=clients/python"')
    venv = await asyncio.to_thread(new_venv, tmp_path / "app-venv")
    # file://localhost/...: pip before 24 refuses a git+file URL without a host.
    command = git_line.text.replace(PLACEHOLDER_REPOSITORY, f"file://localhost{ROOT}")
    await asyncio.to_thread(run, f"{venv}/{command}", tmp_path)
    line = await follow_with(venv / "python", tmp_path)
    assert line.split()[1:] == ["none", "False"]


async def test_the_python_client_sdist_builds_and_installs(built: tuple[Path, str], tmp_path: Path) -> None:
    venv = await asyncio.to_thread(new_venv, tmp_path / "sdist-venv")
    await asyncio.to_thread(
        run, [str(venv / "pip"), "install", str(built[0] / "dist" / FILES["client_sdist"])], tmp_path
    )
    out = await asyncio.to_thread(
        run, [str(venv / "python"), "-c", "import license_broker_client as c; print(sorted(c.__all__))"], tmp_path
    )
    assert "LicenseClient" in out and "LeaseVerifier" in out


FOLLOW_MJS = """
import { LicenseClient, LeaseVerifier } from "license-broker-client";
const [url, licenseId, token] = process.argv.slice(2);
if (typeof LeaseVerifier !== "function") throw new Error("no LeaseVerifier");
const client = new LicenseClient({ baseUrl: url, licenseId, token: () => token });
for await (const state of client) {
  console.log(state.license_id, state.status, state.entitled);
  break;
}
"""
REQUIRE_CJS = """
const { LicenseClient, LeaseVerifier } = require("license-broker-client");
const client = new LicenseClient({ baseUrl: "http://127.0.0.1:1", licenseId: "lic_1", token: "t" });
console.log(require.resolve("license-broker-client"), typeof LeaseVerifier, client.isEntitled());
"""


async def test_the_npm_tarball_installs_into_a_new_project_and_loads_as_esm_and_commonjs(
    built: tuple[Path, str], tmp_path: Path
) -> None:
    """clients/js/README.md: the tarball copied into the app's vendor/, installed from there."""
    app = tmp_path / "app"
    (app / "vendor").mkdir(parents=True)
    (app / "package.json").write_text(json.dumps({"name": "an-app", "version": "1.0.0", "private": True}))
    shutil.copy(built[0] / "dist" / FILES["npm"], app / "vendor" / FILES["npm"])
    steps = doc_commands(ROOT / "clients" / "js" / "README.md", "Install")
    [install] = [c for c in steps if c.words[:2] == ["npm", "install"]]
    assert install.words == ["npm", "install", f"./vendor/{FILES['npm']}"]
    npm_env = {"npm_config_audit": "false", "npm_config_fund": "false", "npm_config_update_notifier": "false"}
    await asyncio.to_thread(run, install.text, app, 300, npm_env)
    manifest = json.loads((app / "package.json").read_text())
    assert manifest["dependencies"] == {"license-broker-client": f"file:vendor/{FILES['npm']}"}
    assert not (app / "node_modules" / "license-broker-client").is_symlink()  # a copy, as from a registry

    (app / "follow.mjs").write_text(FOLLOW_MJS)
    (app / "require.cjs").write_text(REQUIRE_CJS)
    required = await asyncio.to_thread(run, ["node", "require.cjs"], app)
    # Its lines, not the process warnings a client without a pinned key writes (stderr is merged in).
    cjs = str(app / "node_modules/license-broker-client/dist/cjs/index.js")
    assert [line.split() for line in required.splitlines() if line.startswith(cjs)] == [[cjs, "function", "false"]]
    license_id = new_license()
    async with serving(create_app(make_settings(f"sqlite+aiosqlite:///{tmp_path / 'broker.db'}"))) as url:
        followed = await asyncio.to_thread(run, ["node", "follow.mjs", url, license_id, token_for(license_id)], app, 60)
    assert [line.split() for line in followed.splitlines() if line.startswith(license_id)] == [
        [license_id, "none", "false"]
    ]


def test_the_three_packages_share_one_version_and_the_docs_name_its_files() -> None:
    """docs/publishing.md: one version for the three; the install lines name its files."""
    client = tomllib.loads((ROOT / "clients" / "python" / "pyproject.toml").read_text())["project"]["version"]
    npm = json.loads((ROOT / "clients" / "js" / "package.json").read_text())["version"]
    assert VERSION == client == npm
    for doc in ("README.md", "clients/python/README.md", "clients/js/README.md", "docs/desktop.md"):
        text = (ROOT / doc).read_text()
        named = re.findall(r"license[-_]broker(?:[-_]client)?-(\d[^\s`\"/]*?)(?:-py3|\.tar\.gz|\.tgz)", text)
        assert named, f"{doc} names no package file"
        assert set(named) == {VERSION}, f"{doc} names versions {sorted(set(named))}, not {VERSION}"
