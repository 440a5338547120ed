"""The repository is complete on its own: a clone with nothing beside it passes `make test`."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# A path that climbs out of the checkout to a sibling folder (the way the fixtures were once read
# from a `shared/` folder beside the worktree).
_SCANNED = {".py", ".mjs", ".js", ".ts", ".toml", ".cfg", ".sh", ".yaml", ".yml"}
_OUTSIDE = re.compile(r"\.\./(?:\.\./)*shared\b|parents\[[2-9]\]\s*/\s*[\"']shared[\"']")


def test_no_tracked_file_reads_a_folder_outside_the_repository() -> None:
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    offenders = []
    for name in listed.splitlines():
        path = ROOT / name
        if path.suffix not in _SCANNED and path.name not in {"Makefile", "run"}:
            continue
        if path.resolve() == Path(__file__).resolve() or not path.is_file():
            continue
        if _OUTSIDE.search(path.read_text(errors="replace")):
            offenders.append(name)
    assert offenders == []


def test_the_stripe_examples_the_tests_build_on_are_in_the_repository() -> None:
    assert (ROOT / "tests" / "fixtures" / "stripe-openapi" / "resources.json").is_file()
    assert "MIT" in (ROOT / "tests" / "fixtures" / "stripe-openapi" / "README.md").read_text()
