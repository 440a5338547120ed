"""Every shell command of the docs a new user follows runs, in the order written, in a clean
directory (a copy of the repository where the doc works from its root, else an empty one), with
the repository's venv on PATH as `make` gives it: so a doc cannot drift from the code again.

A block that needs an outside service (Stripe, Docker, a download from outside the package
registries), or that another test runs, says so in the Markdown (tests/support/markdown.py: `<!--
not run: ... -->`, `<!-- run by tests/... -->`); this file checks that those markers name a reason
or a test that reads the doc. What a doc elides (`<printed token>`, `export NAME=whsec_...`) is
taken from what its earlier commands printed (tests/support/shell_session.py). The docs' port 8000
is a free port here, given to every command as `PORT` (which `make run`, `serve` and `send` take)
and put in place of `127.0.0.1:8000` in the commands' text."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.support.markdown import BadMarker, Command, blocks, commands
from tests.support.processes import ROOT
from tests.support.services import unavailable
from tests.support.shell_session import Ran, ShellSession, fill_in
from tests.support.waiting import free_port, wait_until

DOCS = [
    "README.md",
    "docs/desktop.md",
    "examples/electron/README.md",
    "clients/python/README.md",
    "clients/js/README.md",
]
# Where each doc's commands run: "repository" (its commands work from the repository's root: a
# copy of it, as a fresh clone has it) or "empty" (a new directory, with the venv on PATH).
WHERE = {
    "README.md": "repository",
    "docs/desktop.md": "empty",
    "examples/electron/README.md": "repository",
    "clients/python/README.md": "repository",
    "clients/js/README.md": "empty",
}
DOC_PORT = re.compile(r"\b(127\.0\.0\.1|localhost):8000\b")


def runnable(doc: str) -> list[Command]:
    return [c for c in commands(ROOT / doc) if c.marker is None]


# -- the markers ---------------------------------------------------------------------------------


def test_every_doc_names_its_unrun_blocks_with_a_reason_or_the_test_that_runs_them() -> None:
    seen = 0
    for doc in DOCS:
        for command in commands(ROOT / doc):
            seen += 1
            if command.marker is None:
                continue
            if command.marker.not_run is not None:
                assert len(command.marker.not_run) >= 8, f"{command}: say why it is not run"
                continue
            test = command.marker.run_by
            assert test is not None and (ROOT / test).is_file(), f"{command}: {test} does not exist"
            source = (ROOT / test).read_text()
            # The test reads this very doc's commands (tests/support/markdown.py), by its path.
            named = " / ".join(f'"{part}"' for part in Path(doc).parts)
            assert "tests.support.markdown" in source and (doc in source or named in source), (
                f"{command}: {test} does not read {doc}"
            )
    assert seen >= 15


def test_a_comment_that_looks_like_a_marker_but_is_not_one_is_an_error(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text(
        "<!-- not run: needs Stripe -->\n\n```sh\nstripe listen\n```\n\n<!-- do not run -->\n```sh\nls\n```\n"
    )
    with pytest.raises(BadMarker, match=r"doc.md:7: '<!-- do not run -->' is not a run marker"):
        list(blocks(doc))
    doc.write_text(
        "<!-- not run: needs Stripe -->\n\n```sh\nstripe listen\n```\n<!-- run by tests/test_dist.py -->\n"
        "```sh\nmake dist\n```\n<!-- a note -->\n```sh\nls\n```\n"
    )
    assert [(c.text, c.marker and (c.marker.not_run, c.marker.run_by)) for c in commands(doc)] == [
        ("stripe listen", ("needs Stripe", None)),
        ("make dist", (None, "tests/test_dist.py")),
        ("ls", None),
    ]


# -- what a doc elides, filled in from what was printed --------------------------------------------


def test_a_printed_placeholder_takes_what_the_program_printed_in_its_place() -> None:
    printed = (
        "license-broker is serving on http://127.0.0.1:8123\n"
        "  curl -N -H 'Authorization: Bearer eyJ.a-b.c_d' http://127.0.0.1:8123/api/licenses/lic_demo/events\n"
    )
    command = "curl -N -H 'Authorization: Bearer <printed token>' http://127.0.0.1:8123/api/licenses/lic_demo/events"
    assert fill_in(command, printed) == command.replace("<printed token>", "eyJ.a-b.c_d")
    with pytest.raises(AssertionError, match="no line printed so far matches"):
        fill_in(command.replace("lic_demo", "lic_other"), printed)


def test_an_elided_assignment_takes_the_printed_value_that_starts_the_same() -> None:
    printed = (
        "  export STRIPE_WEBHOOK_SECRET=whsec_development-only_0123\n"
        "  export STREAM_TOKEN_SECRET=development-only-4567\n"
    )
    command = "export STRIPE_WEBHOOK_SECRET=whsec_development-only_... STREAM_TOKEN_SECRET=development-only-..."
    assert fill_in(command, printed) == (
        "export STRIPE_WEBHOOK_SECRET=whsec_development-only_0123 STREAM_TOKEN_SECRET=development-only-4567"
    )
    assert fill_in("export A=x", printed) == "export A=x"
    with pytest.raises(AssertionError, match="does not start with 'whsec_live'"):
        fill_in("export STRIPE_WEBHOOK_SECRET=whsec_live...", printed)
    with pytest.raises(AssertionError, match="no command printed a value for OTHER"):
        fill_in("export OTHER=...", printed)


# -- running them ----------------------------------------------------------------------------------


def long_running(command: Command) -> str | None:
    """What a command that does not end by itself serves: "server" or "stream"; None otherwise.
    The doc runs them in a terminal of their own (or with `&`); here they run in the background."""
    words = command.words
    if words[:2] == ["make", "run"] or (
        len(words) > 1 and Path(words[0]).name == "license-broker" and words[1] in {"serve", "stream", "webhook"}
    ):
        return "server"
    if words[:1] == ["curl"] and "-N" in words:
        return "stream"
    return None


def copy_of_the_repository(to: Path) -> Path:
    """What a fresh clone holds (tracked files and new ones git does not ignore), with a `.venv`
    whose bin/ is the venv running these tests and whose install stamp is fresh, so that `make`
    serves at once instead of installing."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        unavailable("a git checkout", FileNotFoundError(ROOT / ".git"))
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, text=True, timeout=30, check=True,
    ).stdout  # fmt: skip
    for name in filter(None, listed.split("\0")):
        if (ROOT / name).is_file():
            (to / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, to / name)
    (to / ".venv").mkdir()
    (to / ".venv" / "bin").symlink_to(Path(sys.prefix) / "bin")
    (to / ".venv" / ".base").touch()
    return to


@dataclass
class DocRun:
    doc: str
    port: int
    session: ShellSession
    ran: list[tuple[list[str], Ran]]  # each command's words (as the doc writes them) and its run

    def output_of(self, words: Callable[[list[str]], bool]) -> str:
        """The output of the last command run whose words pass `words`."""
        found = [ran for command, ran in self.ran if words(command)]
        assert found, f"{self.doc}: no such command ran"
        return found[-1].output

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


def serving(run: DocRun, ran: Ran, deadline: float = 60) -> None:
    def up() -> bool:
        try:
            return httpx.get(run.url("/healthz"), timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(up, deadline, what=f"the server on port {run.port}")
    except TimeoutError as exc:
        raise AssertionError(f"{run.doc}: {ran.text}: no server answered:\n{ran.output}") from exc


def streaming(run: DocRun, ran: Ran) -> None:
    try:
        wait_until(lambda: "\ndata: " in ran.output, 20, what="the stream's first event")
    except TimeoutError as exc:
        raise AssertionError(f"{run.doc}: {ran.text}: no event:\n{ran.output}") from exc


@pytest.fixture
def run_doc(tmp_path: Path) -> Iterator[Callable[[str], DocRun]]:
    """Runs one doc's commands, in order, in a fresh directory; the session (and every server it
    started) ends with the test."""
    sessions: list[ShellSession] = []

    def run(doc: str) -> DocRun:
        where = tmp_path / "work"
        where.mkdir()
        if WHERE[doc] == "repository":
            copy_of_the_repository(where)
        port = free_port()
        env = {
            "PATH": f"{Path(sys.prefix) / 'bin'}:/usr/local/bin:/usr/bin:/bin",
            "HOME": os.environ.get("HOME", "/root"),
            "LANG": "C.UTF-8",
            "PORT": str(port),
            "npm_config_audit": "false",
            "npm_config_fund": "false",
            "npm_config_update_notifier": "false",
        }
        session = ShellSession(where, env, tmp_path / "logs").__enter__()
        sessions.append(session)
        result = DocRun(doc, port, session, [])
        server = False
        for command in runnable(doc):
            text = DOC_PORT.sub(lambda m: f"{m.group(1)}:{port}", command.text)
            kind = long_running(command)
            if kind is None and not server and DOC_PORT.search(command.text):
                # A doc that talks to 127.0.0.1:8000 without starting a server itself means the
                # one `make run` serves: development mode, SQLite, in this directory.
                started = session.run("BROKER_DEV=1 license-broker serve", background=True)
                serving(result, started)
                server = True
            ran = session.run(fill_in(text, session.printed), background=kind is not None, timeout=300)
            result.ran.append((command.words, ran))
            if kind == "server":
                serving(result, ran)
                server = True
            elif kind == "stream":
                streaming(result, ran)
            else:
                assert ran.status == 0, f"{command}\nexited {ran.status}:\n{ran.output}"
        return result

    yield run
    for session in sessions:
        for ran in session.ran:
            print(f"{ran.seconds:6.2f} s  {ran.text.splitlines()[0][:100]}")  # shown with -s or on failure
        session.__exit__(None, None, None)


def _need_node() -> None:
    if shutil.which("npm") is None or shutil.which("node") is None:
        unavailable("node and npm", FileNotFoundError("npm"))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_readme_runs_as_written(run_doc: Callable[[str], DocRun]) -> None:
    """make run in a fresh copy; the printed curl follows lic_demo ("none"), `send pay` unlocks it."""
    run = run_doc("README.md")
    stream = run.output_of(lambda w: w[:1] == ["curl"] and "-N" in w)
    assert json.loads(re.findall(r"^data: (.*)$", stream, re.M)[0])["status"] == "none"

    def unlocked() -> bool:
        states = [json.loads(d) for d in re.findall(r"^data: (\{.*\})$", run.output_of(lambda w: "-N" in w), re.M)]
        return any(s.get("status") == "active" and s.get("entitled") is True for s in states)

    wait_until(unlocked, 15, what="the followed license to turn active")
    assert "pending" in run.output_of(lambda w: w[1:3] == ["send", "pay"])


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_desktop_guide_runs_as_written(run_doc: Callable[[str], DocRun]) -> None:
    run = run_doc("docs/desktop.md")
    pem = (run.session.cwd / "lease-key.pem").read_text()
    assert "BEGIN PRIVATE KEY" in pem and "BEGIN PUBLIC KEY" in pem
    token = json.loads(run.output_of(lambda w: "/dev/token" in " ".join(w)))["token"]
    assert httpx.get(run.url("/api/licenses/lic_demo"), headers={"authorization": f"Bearer {token}"}).status_code == 200


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_electron_example_runs_as_written_up_to_the_app(run_doc: Callable[[str], DocRun]) -> None:
    """The broker the example's README starts signs with the key it tells the app to pin, and the
    client package it builds is there; the app itself (Electron's binary) is not run."""
    _need_node()
    run = run_doc("examples/electron/README.md")
    pinned = (run.session.cwd / "examples" / "electron" / "public-key.pem").read_text()
    assert "BEGIN PUBLIC KEY" in pinned and "PRIVATE" not in pinned
    served = httpx.get(run.url("/.well-known/jwks.json")).json()["keys"]
    assert [f"# kid {k['kid']}" for k in served][:1] == re.findall(r"^# kid \S+", pinned, re.M)[:1]
    assert (run.session.cwd / "clients" / "js" / "dist" / "esm" / "index.js").is_file()
    # The key it prints activates a machine of the paid license, with a lease signed by the pinned key.
    key = run.output_of(lambda w: w[1:3] == ["key", "lic_demo"]).split()[-1]
    activation = httpx.post(run.url("/api/activations"), json={"key": key, "fingerprint": "ab" * 32})
    assert activation.status_code == 201, activation.text
    lease = activation.json()["lease"]
    header = json.loads(base64.urlsafe_b64decode(lease.split(".")[0] + "=="))
    assert f"# kid {header['kid']}" in pinned


@pytest.mark.parametrize("doc", ["clients/python/README.md", "clients/js/README.md"])
def test_the_client_readmes_commands_are_each_run_by_a_test(doc: str) -> None:
    """Their install lines need `make dist` (minutes), which tests/test_dist.py runs once for all."""
    assert commands(ROOT / doc) and runnable(doc) == []
