"""A doc's shell commands run the way a reader types them: one bash for the whole doc, so `cd` and
`export` carry over from one command to the next; each command's output in a file of its own;
servers (and `curl -N`) left running in the background while the next commands use them; and
what the doc elides filled in from what earlier commands printed (`fill_in`).

Used by tests/test_doc_commands.py with the commands tests/support/markdown.py reads."""

from __future__ import annotations

import os
import re
import secrets
import select
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType


@dataclass(frozen=True)
class Ran:
    text: str  # what the shell was given (the doc's command, filled in)
    out: Path  # its stdout and stderr, still growing while it runs in the background
    status: int | None  # None: left running in the background
    seconds: float  # how long it took (0 in the background)

    @property
    def output(self) -> str:
        try:
            return self.out.read_text(errors="replace")
        except FileNotFoundError:
            return ""  # in the background, and the shell has not opened it yet


class ShellSession:
    """One `bash` (no profile, no rc files) in `cwd` with exactly `env`. Every process it starts
    is in its own process group, ended when the session closes."""

    def __init__(self, cwd: Path, env: dict[str, str], logs: Path) -> None:
        self.cwd = cwd
        self.env = env
        self.logs = logs
        self.ran: list[Ran] = []
        self._token = secrets.token_hex(8)
        self._buffer = b""
        self._bash: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> ShellSession:
        self.logs.mkdir(parents=True, exist_ok=True)
        self._bash = subprocess.Popen(
            ["bash", "--noprofile", "--norc"],
            cwd=self.cwd,
            env=self.env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # the shell, its servers and their children: one group to end
        )
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        bash = self._bash
        assert bash is not None
        for sig, grace in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(bash.pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and _group_alive(bash.pid):
                time.sleep(0.05)  # the group's members are not our children: no wait() for them
            if not _group_alive(bash.pid):
                break
        bash.wait(5)
        assert bash.stdin is not None and bash.stdout is not None
        bash.stdin.close()
        bash.stdout.close()

    @property
    def printed(self) -> str:
        """Everything every command has printed so far, in order."""
        return "\n".join(ran.output for ran in self.ran)

    def run(self, text: str, *, background: bool = False, timeout: float = 120.0) -> Ran:
        """Run `text` (a command as the doc writes it, here-documents included); in the background
        it returns at once. The exit status of a foreground command is in the answer: the caller
        judges it."""
        bash = self._bash
        assert bash is not None and bash.stdin is not None
        out = self.logs / f"{len(self.ran) + 1:02d}.out"
        # A brace group, not a subshell: `cd` and `export` stay. Its closing brace on a line of its
        # own, so that a here-document's terminator stays alone on its line.
        group = f"{{\n{text}\n}} >{_quoted(out)} 2>&1 </dev/null"
        # In the foreground, then a line with the token and the status, which _status waits for.
        script = f"{group} &\n" if background else f"{group}\nprintf '\\n{self._token} %s\\n' $?\n"
        started = time.monotonic()
        bash.stdin.write(script.encode())
        bash.stdin.flush()
        status = None if background else self._status(timeout, text, out)
        ran = Ran(text, out, status, time.monotonic() - started)
        self.ran.append(ran)
        return ran

    def _status(self, timeout: float, text: str, out: Path) -> int:
        bash = self._bash
        assert bash is not None and bash.stdout is not None
        marker = re.compile(rb"\n" + self._token.encode() + rb" (\d+)\n")
        deadline = time.monotonic() + timeout
        fd = bash.stdout.fileno()
        while (found := marker.search(self._buffer)) is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"still running after {timeout:g} s: {text}\n{out.read_text(errors='replace')}")
            if bash.poll() is not None:
                raise AssertionError(f"the shell exited ({bash.returncode}) running: {text}")
            if select.select([fd], [], [], min(left, 1.0))[0]:
                self._buffer += os.read(fd, 65536)
        self._buffer = self._buffer[found.end() :]
        return int(found.group(1))


def _group_alive(pgid: int) -> bool:
    """Whether a process of the group still runs. Not killpg(pgid, 0): the servers a doc starts
    with `&` are reparented to the machine's init once their subshell exits, and until it reaps
    them they are zombies, which that signal still finds."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # pid (comm) state ppid pgrp ...: comm may hold spaces, so split after its ')'.
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue  # gone meanwhile
        if fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False


def _quoted(path: Path) -> str:
    return "'" + str(path).replace("'", "'\\''") + "'"


class NotPrinted(AssertionError):
    """The doc elides a value that no earlier command printed."""


_PRINTED = re.compile(r"<printed [^<>\n]+>")
_ELIDED_ASSIGNMENT = re.compile(r"(?<![\w$])(?P<name>[A-Z][A-Z0-9_]*)=(?P<prefix>[^\s'\"]*?)\.\.\.(?=\s|$)")


def fill_in(text: str, printed: str) -> str:
    """The command with what the doc elides taken from what earlier commands printed:

    - `<printed token>` (any `<printed ...>`): the doc shows a command that a program printed, with
      a part elided. The command, the placeholders as wildcards, must match a line printed so far
      (the last that does); the placeholders take what stands there.
    - `NAME=prefix...` (as in `export STRIPE_WEBHOOK_SECRET=whsec_...`): the value of the last
      `NAME=value` printed so far (`export NAME=value` or `NAME: value` too), which must start
      with `prefix`.

    Anything else is left as written. Nothing matching: NotPrinted, naming what was looked for."""
    first, newline, rest = text.partition("\n")
    if _PRINTED.search(first):
        command = re.sub(r"\s+#\s.*$", "", first).strip()
        parts = re.split(f"({_PRINTED.pattern})", command)
        pattern = "".join("(\\S+?)" if _PRINTED.fullmatch(part) else re.escape(part) for part in parts)
        matches = list(re.finditer(pattern + r"(?=\s|$)", printed, re.M))
        if not matches:
            raise NotPrinted(f"no line printed so far matches {command!r}:\n{printed}")
        values = iter(matches[-1].groups())
        first = _PRINTED.sub(lambda _: next(values), first)

    def value(assignment: re.Match[str]) -> str:
        name, prefix = assignment["name"], assignment["prefix"]
        found = re.findall(rf"(?:^|\s){re.escape(name)}(?:=|: )(\S+)", printed, re.M)
        if not found:
            raise NotPrinted(f"{name}=...: no command printed a value for {name}:\n{printed}")
        if not found[-1].startswith(prefix):
            raise NotPrinted(f"{name}={prefix}...: the printed value {found[-1]!r} does not start with {prefix!r}")
        return f"{name}={found[-1]}"

    first = _ELIDED_ASSIGNMENT.sub(value, first)
    return first + newline + rest
