"""`make check`'s audit of requirements.lock: pip-audit, judged by its own exit status and output.

- every locked package audited, none with a known vulnerability: passes;
- a known vulnerability, or some packages audited and others not: fails (as `--strict` would);
- pip-audit's vulnerability service cannot be reached (a connection error, no answer within the
  timeout, or it knows none of the locked packages, which is what a proxy that serves packages but
  not that service answers): passes with "pip-audit skipped: <why>", loudly, so that nobody takes
  it for an audit;
- pip-audit fails for any other reason (a malformed lock): fails with its output.

Where the service lives is pip-audit's business: nothing here names it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

TIMEOUT = 180.0  # seconds for the whole audit
REQUEST_TIMEOUT = 20  # seconds per request, pip-audit's --timeout
# What pip-audit prints when its service is unreachable: its own ConnectionError (with its tip), or
# the traceback of a requests error it does not catch (refused, no DNS, a 5xx).
UNREACHABLE = (
    "your network may be blocking this service",
    "could not connect",
    "requests.exceptions.",
    "ServiceError",
    "Max retries exceeded",
)


@dataclass(frozen=True)
class Verdict:
    passed: bool
    message: str


def command(pip_audit: str, lock: Path) -> list[str]:
    return [
        pip_audit,
        "--require-hashes",
        "--disable-pip",
        "-r",
        str(lock),
        "--progress-spinner",
        "off",
        "--format",
        "json",
        "--timeout",
        str(REQUEST_TIMEOUT),
    ]


def skipped(why: str) -> Verdict:
    message = f"pip-audit skipped: {why}; requirements.lock was not audited (run make check where it can be)"
    return Verdict(True, message)


def judge(returncode: int, stdout: str, stderr: str) -> Verdict:
    """The verdict on one pip-audit run (--format json)."""
    try:
        report = json.loads(stdout)
        dependencies = report["dependencies"]
    except (ValueError, KeyError, TypeError):
        report = None
    if report is None:
        last = next((line.strip() for line in reversed(stderr.splitlines()) if line.strip()), "no output")
        if returncode != 0 and any(marker.lower() in stderr.lower() for marker in UNREACHABLE):
            return skipped(f"its vulnerability service could not be reached ({last})")
        return Verdict(False, f"pip-audit failed (exit {returncode}):\n{stderr.strip() or stdout.strip()}")
    unaudited = [d for d in dependencies if "skip_reason" in d]
    vulnerable = [d for d in dependencies if d.get("vulns")]
    if vulnerable:
        lines = [
            f"  {d['name']} {d['version']}: {v['id']} (fixed in {', '.join(v.get('fix_versions') or ['no release'])})"
            for d in vulnerable
            for v in d["vulns"]
        ]
        return Verdict(False, "pip-audit: known vulnerabilities in requirements.lock:\n" + "\n".join(lines))
    if dependencies and len(unaudited) == len(dependencies):
        return skipped(
            f"its vulnerability service knows none of the {len(dependencies)} locked packages "
            f"(first: {unaudited[0]['skip_reason']})"
        )
    if unaudited:
        lines = [f"  {d['name']}: {d['skip_reason']}" for d in unaudited]
        return Verdict(False, "pip-audit could not audit some locked packages:\n" + "\n".join(lines))
    if returncode != 0:
        return Verdict(False, f"pip-audit failed (exit {returncode}):\n{stderr.strip()}")
    return Verdict(True, f"pip-audit: {len(dependencies)} locked packages, no known vulnerabilities")


def audit(lock: Path, pip_audit: str, timeout: float = TIMEOUT) -> Verdict:
    try:
        done = subprocess.run(command(pip_audit, lock), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return skipped(f"its vulnerability service did not answer within {timeout:g} s")
    return judge(done.returncode, done.stdout, done.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.audit_lock", description=(__doc__ or "").splitlines()[0])
    parser.add_argument("lock", type=Path)
    parser.add_argument("--pip-audit", default=str(Path(sys.executable).parent / "pip-audit"))
    parser.add_argument("--timeout", type=float, default=TIMEOUT, help="seconds for the whole audit")
    args = parser.parse_args(argv)
    print(f"{args.pip_audit} {' '.join(command('', args.lock)[1:])}", flush=True)
    verdict = audit(args.lock, args.pip_audit, args.timeout)
    print(verdict.message, file=sys.stdout if verdict.passed else sys.stderr)
    return 0 if verdict.passed else 1


if __name__ == "__main__":
    sys.exit(main())
