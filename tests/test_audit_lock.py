"""`make check`'s audit (scripts/audit_lock.py) judges pip-audit by its own exit status and output:
vulnerabilities, partial audits and other failures fail; an unreachable vulnerability service is
reported as skipped."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.audit_lock import audit, judge
from tests.support.processes import ROOT

LOCK = ROOT / "requirements.lock"


def fake_pip_audit(tmp_path: Path, stdout: str = "", stderr: str = "", code: int = 0, hang: bool = False) -> str:
    """An executable that answers like pip-audit would, and records its arguments."""
    script = tmp_path / "pip-audit"
    (tmp_path / "out").write_text(stdout)
    (tmp_path / "err").write_text(stderr)
    script.write_text(
        f"#!{sys.executable}\n"
        "import pathlib, sys, time\n"
        f"here = pathlib.Path({str(tmp_path)!r})\n"
        "(here / 'argv').write_text('\\n'.join(sys.argv[1:]))\n"
        f"time.sleep(60) if {hang} else None\n"
        "sys.stdout.write((here / 'out').read_text())\n"
        "sys.stderr.write((here / 'err').read_text())\n"
        f"sys.exit({code})\n"
    )
    script.chmod(0o755)
    return str(script)


def report(*dependencies: dict[str, object]) -> str:
    return json.dumps({"dependencies": list(dependencies), "fixes": []})


CLEAN = {"name": "starlette", "version": "1.0.0", "vulns": []}
UNKNOWN = {"name": "aiosqlite", "skip_reason": "Dependency not found and could not be audited: aiosqlite (0.22.1)"}


def test_a_clean_audit_passes_and_names_how_many_packages_it_audited(tmp_path: Path) -> None:
    verdict = audit(LOCK, fake_pip_audit(tmp_path, report(CLEAN, CLEAN | {"name": "redis"})))
    assert verdict.passed
    assert verdict.message == "pip-audit: 2 locked packages, no known vulnerabilities"
    argv = (tmp_path / "argv").read_text().splitlines()
    assert argv[:4] == ["--require-hashes", "--disable-pip", "-r", str(LOCK)]
    assert "json" in argv and "--timeout" in argv


def test_a_known_vulnerability_fails_with_its_id_and_fixed_version(tmp_path: Path) -> None:
    vulnerable = {"name": "jinja2", "version": "3.1.2", "vulns": [{"id": "GHSA-h5c8", "fix_versions": ["3.1.3"]}]}
    verdict = audit(LOCK, fake_pip_audit(tmp_path, report(CLEAN, vulnerable), "Found 1 known vulnerability", 1))
    assert not verdict.passed
    assert "jinja2 3.1.2: GHSA-h5c8 (fixed in 3.1.3)" in verdict.message


def test_some_packages_left_unaudited_fail_as_strict_would(tmp_path: Path) -> None:
    verdict = audit(LOCK, fake_pip_audit(tmp_path, report(CLEAN, UNKNOWN)))
    assert not verdict.passed
    assert "could not audit some locked packages" in verdict.message and "aiosqlite" in verdict.message


def test_a_service_that_knows_none_of_the_packages_is_reported_as_skipped(tmp_path: Path) -> None:
    """What a proxy that serves packages but not the vulnerability data answers: 404 for each."""
    verdict = audit(LOCK, fake_pip_audit(tmp_path, report(UNKNOWN, UNKNOWN | {"name": "alembic"})))
    assert verdict.passed
    assert verdict.message.startswith("pip-audit skipped: its vulnerability service knows none of the 2 locked")
    assert "requirements.lock was not audited" in verdict.message


@pytest.mark.parametrize(
    "stderr",
    [
        "ERROR:pip_audit._cli:Could not connect to the vulnerability feed\n"
        "ERROR:pip_audit._cli:Tip: your network may be blocking this service. Try another service with `-s SERVICE`\n",
        "Traceback (most recent call last):\n  ...\nrequests.exceptions.ConnectionError: Max retries exceeded "
        "(Caused by NameResolutionError: Failed to resolve)\n",
    ],
    ids=["its-own-connection-error", "a-requests-error"],
)
def test_an_unreachable_service_is_reported_as_skipped_with_pip_audits_reason(tmp_path: Path, stderr: str) -> None:
    verdict = audit(LOCK, fake_pip_audit(tmp_path, "", stderr, 1))
    assert verdict.passed
    assert verdict.message.startswith("pip-audit skipped: its vulnerability service could not be reached (")
    assert stderr.strip().splitlines()[-1] in verdict.message


def test_no_answer_within_the_timeout_is_reported_as_skipped(tmp_path: Path) -> None:
    verdict = audit(LOCK, fake_pip_audit(tmp_path, hang=True), timeout=1)
    assert verdict.passed
    assert verdict.message.startswith("pip-audit skipped: its vulnerability service did not answer within 1 s")


def test_any_other_failure_of_pip_audit_fails(tmp_path: Path) -> None:
    stderr = "ERROR:pip_audit._cli:invalid requirements input: requirements.lock\n"
    verdict = audit(LOCK, fake_pip_audit(tmp_path, "", stderr, 1))
    assert not verdict.passed
    assert "invalid requirements input" in verdict.message


def test_the_command_exits_zero_on_a_skip_and_one_on_a_failure(tmp_path: Path) -> None:
    def run(pip_audit: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "scripts.audit_lock", str(LOCK), "--pip-audit", pip_audit]
        return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=30)

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    skip = run(fake_pip_audit(tmp_path / "a", report(UNKNOWN)))
    assert skip.returncode == 0 and "pip-audit skipped:" in skip.stdout
    fail = run(fake_pip_audit(tmp_path / "b", report(CLEAN, UNKNOWN)))
    assert fail.returncode == 1 and "could not audit some locked packages" in fail.stderr


def test_judge_takes_unparseable_output_with_success_as_a_failure() -> None:
    assert not judge(0, "not json", "").passed
