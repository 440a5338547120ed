"""The repository itself: complete on its own (a clone with nothing beside it passes `make test`),
what the docs tell a user to create stays out of git, and no file names a package index's host
(the tools know where their index is; the project does not say)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from tests.support.markdown import commands, redirect_targets
from tests.support.processes import ROOT
from tests.support.services import unavailable


def git(*args: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        unavailable("a git checkout", FileNotFoundError(ROOT / ".git"))
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30)


def files() -> list[Path]:
    """Every file of the repository: tracked, and new ones not ignored."""
    listed = git("ls-files", "-z", "--cached", "--others", "--exclude-standard").stdout
    return [ROOT / name for name in sorted(set(listed.split("\0"))) if name and (ROOT / name).is_file()]


def docs() -> list[Path]:
    return [f for f in files() if f.suffix == ".md"]


def ignored(path: str) -> bool:
    return git("check-ignore", "--quiet", "--no-index", path).returncode == 0


def test_what_the_docs_tell_a_user_to_create_is_ignored() -> None:
    created: set[str] = set()
    for doc in docs():
        for command in commands(doc):
            # `... > lease-key.pem`, `keys public > examples/electron/public-key.pem`
            created |= {t for t in redirect_targets(command) if not t.startswith("/")}
            # `cd examples/electron && npm install`: its node_modules
            for directory in re.findall(r"cd (\S+) && npm (?:ci|install)\b", command.text):
                created.add(f"{directory}/node_modules/a-package/index.js")
            if command.words[:2] == ["make", "dist"]:
                created.add("dist/license_broker-0.1.0.tar.gz")
    assert {"lease-key.pem", "examples/electron/public-key.pem", "clients/js/node_modules/a-package/index.js",
            "examples/electron/node_modules/a-package/index.js"} <= created  # fmt: skip
    created |= {"license-broker.db", ".venv/bin/python", "dist/license-broker-client-0.1.0.tgz", "clients/js/dist/x.js"}
    assert [path for path in sorted(created) if not ignored(path)] == []


def test_lock_files_are_not_ignored() -> None:
    """npm install writes examples/electron/package-lock.json: it is committed, not ignored."""
    for lock in ("requirements.lock", "clients/js/package-lock.json", "examples/electron/package-lock.json"):
        assert not ignored(lock), lock


def index_hosts() -> set[str]:
    """The hosts of the default package indexes, as pip and npm know them."""
    from pip._internal.models.index import PyPI, TestPyPI  # the defaults pip itself uses

    hosts = {PyPI.netloc, PyPI.file_storage_domain, TestPyPI.netloc}
    if shutil.which("npm") is not None:
        home = Path(subprocess.run(["mktemp", "-d"], capture_output=True, text=True, check=True).stdout.strip())
        try:
            (home / "npmrc").touch()
            (home / "globalrc").touch()
            registry = subprocess.run(
                ["npm", f"--userconfig={home / 'npmrc'}", f"--globalconfig={home / 'globalrc'}", "config", "get",
                 "registry"],
                env={"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(home)},
                capture_output=True, text=True, timeout=60, check=True,
            ).stdout.strip()  # fmt: skip
        finally:
            shutil.rmtree(home)
        hosts.add(re.sub(r"^https?://([^/:]+).*$", r"\1", registry))
    return {h for h in hosts if h}


def test_no_file_names_a_package_index_host() -> None:
    hosts = index_hosts()
    assert len(hosts) >= 3, hosts
    pattern = re.compile("|".join(re.escape(h) for h in sorted(hosts)), re.IGNORECASE)
    naming = []
    for path in files():
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        naming += [f"{path.relative_to(ROOT)}: {m.group(0)}" for m in pattern.finditer(text)]
    assert naming == []


# A path that climbs out of the checkout to a sibling folder (the way the fixtures were once read
# from a `shared/` folder beside the worktree).
_SCANNED = {".py", ".mjs", ".js", ".ts", ".toml", ".cfg", ".sh", ".yaml", ".yml"}
_OUTSIDE = re.compile(r"\.\./(?:\.\./)*shared\b|parents\[[2-9]\]\s*/\s*[\"']shared[\"']")


def test_no_file_reads_a_folder_outside_the_repository() -> None:
    offenders = [
        str(path.relative_to(ROOT))
        for path in files()
        if (path.suffix in _SCANNED or path.name in {"Makefile", "run"})
        and path.resolve() != Path(__file__).resolve()
        and _OUTSIDE.search(path.read_text(errors="replace"))
    ]
    assert offenders == []


def test_the_stripe_examples_the_tests_build_on_are_in_the_repository() -> None:
    assert (ROOT / "tests" / "fixtures" / "stripe-openapi" / "resources.json").is_file()
    assert "MIT" in (ROOT / "tests" / "fixtures" / "stripe-openapi" / "README.md").read_text()
