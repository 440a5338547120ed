"""Run mutmut's mutants of some modules against test files in phases: each mutant in a forked
child with `set_mutant_under_test`, against the first phase's files (fast, pure tests), then the
mutants that survived it against the next phase's (Postgres), and so on.

`make mutants` runs each mutant against every test the stats run saw reach its function, in no set
order, bounded by CPU time: for the ingest, whose functions dozens of Postgres tests reach, that is
about a minute a mutant and the batched path's idle hangs wait out the run's guard. Here a mutant
killed by a pure test costs a second, and a hang is stopped by the wall clock (pytest-timeout per
test, and the child killed past --limit).

    make mutants MUTANTS='<a mutant>'   # mutmut writes mutants/ first (the run can then be stopped)
    .venv/bin/python -m scripts.mutants_in_phases 'broker/ingest/*.py' \\
        --phase tests/test_ingest_decide.py --phase tests/test_fast_ingest.py --results ingest.jsonl

The tests run are mutants/'s copies, as mutmut made them at its last run: a test written since
must be copied there (or `make mutants` run again) before its mutants are.

Each result is a line of JSON appended to --results ({"mutant", "phase", "outcome", "test"}):
`killed` by `test`, `timeout` (a test stopped by pytest-timeout, or the child by --limit) or
`survived` every phase. A mutant already in the file is not run again.
"""

from __future__ import annotations

import argparse
import fnmatch
import glob
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

MUTANTS = Path("mutants")


def mutant_names(patterns: list[str]) -> list[str]:
    names: list[str] = []
    for pattern in patterns:
        for meta in sorted(glob.glob(str(MUTANTS / f"{pattern}.meta"))):
            names += json.loads(Path(meta).read_text())["exit_code_by_key"]
    return names


class Recorder:
    """A pytest plugin: the first failing test, and whether pytest-timeout stopped it (a test that
    gives up waiting within its own deadline fails: the mutant is killed)."""

    def __init__(self) -> None:
        self.failed: str | None = None
        self.timeout = False

    def pytest_runtest_logreport(self, report: Any) -> None:
        if report.failed and self.failed is None:
            self.failed = report.nodeid
            self.timeout = "from pytest-timeout" in str(report.longrepr)  # not a test giving up on its own


def run_child(name: str, tests: list[str], per_test: int, out: int) -> None:
    import pytest
    from mutmut.mutation.trampoline import set_mutant_under_test

    os.setpgid(0, 0)
    set_mutant_under_test(name)
    recorder = Recorder()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    # broker (and anyio through it) is imported before pytest starts: nothing of it is rewritten.
    args = ["-x", "-q", "-p", "no:cacheprovider", "-W", "ignore::pytest.PytestAssertRewriteWarning"]
    args += ["--timeout", str(per_test), *tests]
    code = pytest.main(args, plugins=[recorder])
    os.write(out, json.dumps({"code": int(code), "test": recorder.failed, "timeout": recorder.timeout}).encode())
    os._exit(0)


def run_one(name: str, tests: list[str], per_test: int, limit: float) -> dict[str, Any]:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            run_child(name, tests, per_test, write)
        except BaseException as exc:  # the child never returns into the parent's loop
            os.write(write, json.dumps({"code": None, "test": repr(exc), "timeout": False}).encode())
        os._exit(3)
    os.close(write)
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.05)
    else:
        os.killpg(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(read)
        return {"code": None, "test": None, "timeout": True}
    with os.fdopen(read, "rb") as pipe:
        raw = pipe.read()
    return json.loads(raw) if raw else {"code": None, "test": None, "timeout": False}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="+", help="paths under mutants/ (globs), e.g. 'broker/ingest/*.py'")
    parser.add_argument("--phase", action="append", required=True, help="test files of one phase, comma-separated")
    parser.add_argument("--results", required=True, type=Path)
    parser.add_argument("--only", help="a glob on the mutants' names")
    parser.add_argument("--shard", default="1/1", help="k/n: the k-th of n workers (run n at once)")
    parser.add_argument("--per-test", type=int, default=30, help="pytest-timeout, seconds")
    parser.add_argument("--limit", type=float, default=300, help="wall clock for one mutant's phase, seconds")
    args = parser.parse_args()

    results = args.results.resolve()
    done = set()
    if results.exists():
        done = {json.loads(line)["mutant"] for line in results.read_text().splitlines() if line}
    k, n = map(int, args.shard.split("/"))
    names = [name for name in mutant_names(args.modules)[k - 1 :: n] if name not in done]
    if args.only:
        names = [name for name in names if fnmatch.fnmatch(name, args.only)]
    os.chdir(MUTANTS)
    sys.path.insert(0, os.getcwd())
    os.environ.setdefault("CI", "true")
    import broker.ingest  # noqa: F401  (loaded once, before the forks: each child starts warm)

    for phase, files in enumerate(args.phase, 1):  # unmutated, every phase passes: or no result means anything
        started = time.monotonic()
        result = run_one("", files.split(","), args.per_test, args.limit)
        if result["code"] != 0 or result["timeout"]:
            sys.exit(f"phase {phase} fails without a mutant: {result}")
        print(f"phase {phase} passes unmutated in {time.monotonic() - started:.0f} s", flush=True)
    for i, name in enumerate(names, 1):
        outcome: dict[str, Any] = {"mutant": name, "outcome": "survived", "phase": None, "test": None}
        for phase, files in enumerate(args.phase, 1):
            result = run_one(name, files.split(","), args.per_test, args.limit)
            if result["timeout"]:
                outcome.update(outcome="timeout", phase=phase, test=result["test"])
                break
            if result["code"] != 0:
                kind = "killed" if result["code"] == 1 else f"error {result['code']}"
                outcome.update(outcome=kind, phase=phase, test=result["test"])
                break
        with results.open("a") as out:
            out.write(json.dumps(outcome) + "\n")
        print(f"{i}/{len(names)} {outcome['outcome']:8} {name} {outcome['test'] or ''}", flush=True)


if __name__ == "__main__":
    main()
