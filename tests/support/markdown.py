"""The shell commands of the project's Markdown, in the order written, for the tests that check the
docs against the code: every command runs (tests/test_doc_commands.py), what the commands create
is ignored by git (tests/test_repository.py), the install commands install (tests/test_dist.py).

A command is one logical line of a fenced `sh`/`bash`/`shell`/`console` block: backslash
continuations joined, a here-document kept with the line that opens it, blank and comment-only
lines skipped, a `$ ` prompt removed.

A block that tests/test_doc_commands.py must not run says so in an HTML comment on the line
before its opening fence (blank lines between are allowed; the rendered page shows nothing):

    <!-- not run: needs Stripe -->          a reason: an outside service, or the test suite itself
    <!-- run by tests/test_dist.py -->      another test runs these commands (and reads this doc)

A comment there that mentions running but is neither of these is an error, not silently ignored."""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

SHELL_LANGUAGES = frozenset({"sh", "bash", "shell", "console"})
_HEREDOC = re.compile(r"<<-?\s*(?P<quote>['\"]?)(?P<word>\w+)(?P=quote)")
# A placeholder the reader replaces: `<printed token>`, `<webhook pid>` (not a redirection).
_PLACEHOLDER = re.compile(r"<[A-Za-z][^<>\n]*>")
_FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`\s]*)")


class BadMarker(ValueError):
    """An HTML comment before a shell block that looks like a run marker but is not one."""


@dataclass(frozen=True)
class Marker:
    """What the comment before a block says about running it: `not_run` (the reason) or `run_by`
    (the test file that runs it)."""

    not_run: str | None = None
    run_by: str | None = None


@dataclass(frozen=True)
class Command:
    doc: Path
    line: int  # where it starts in the doc, 1-based
    text: str  # as written (continuations joined), comments included
    marker: Marker | None = None  # the block's: not run here, and why

    @property
    def words(self) -> list[str]:
        """The command split as a POSIX shell would, without its comment."""
        return shlex.split(_PLACEHOLDER.sub("PLACEHOLDER", self.text.split("\n", 1)[0]), comments=True)

    def __str__(self) -> str:
        return f"{self.doc}:{self.line}: {self.text}"


@dataclass(frozen=True)
class Block:
    doc: Path
    line: int  # the line after the opening fence, 1-based
    language: str
    text: str
    marker: Marker | None = None


_COMMENT = re.compile(r"^\s*<!--\s*(?P<body>.*?)\s*-->\s*$")
_NOT_RUN = re.compile(r"not run:\s*(?P<reason>\S.*)")
_RUN_BY = re.compile(r"run by (?P<test>tests/[\w/]+\.py)")


def _marker(doc: Path, lines: list[str], fence: int) -> Marker | None:
    """The run marker in the HTML comment on the last non-blank line before line `fence` (0-based)."""
    i = fence - 1
    while i >= 0 and not lines[i].strip():
        i -= 1
    comment = _COMMENT.match(lines[i]) if i >= 0 else None
    if comment is None:
        return None
    body = comment["body"]
    if not_run := _NOT_RUN.fullmatch(body):
        return Marker(not_run=not_run["reason"])
    if run_by := _RUN_BY.fullmatch(body):
        return Marker(run_by=run_by["test"])
    if re.search(r"\brun\b", body, re.IGNORECASE):
        raise BadMarker(
            f"{doc}:{i + 1}: {lines[i].strip()!r} is not a run marker: "
            "<!-- not run: REASON --> or <!-- run by tests/FILE.py -->"
        )
    return None


def blocks(doc: Path) -> Iterator[Block]:
    """The fenced code blocks of a Markdown file (in list items too), with their info string's
    first word."""
    lines = doc.read_text().splitlines()
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        fence, indent = opening["fence"], len(opening["indent"])
        body: list[str] = []
        j = i + 1
        while j < len(lines) and lines[j].strip() != fence:
            line = lines[j]
            body.append(line[min(indent, len(line) - len(line.lstrip(" "))) :])
            j += 1
        yield Block(doc, i + 2, opening["info"].lower(), "\n".join(body), _marker(doc, lines, i))
        i = j + 1


def commands(doc: Path) -> Iterator[Command]:
    """The commands of the shell blocks of `doc`, in order; a here-document is part of the
    command that opens it."""
    for block in blocks(doc):
        if block.language not in SHELL_LANGUAGES:
            continue
        lines = [line.removeprefix("$ ") if block.language == "console" else line for line in block.text.splitlines()]
        i = 0
        while i < len(lines):
            if not lines[i].strip() or lines[i].lstrip().startswith("#"):
                i += 1
                continue
            start, pending = i, []
            while lines[i].rstrip().endswith("\\") and i + 1 < len(lines):
                pending.append(lines[i].rstrip()[:-1].strip())
                i += 1
            pending.append(lines[i].strip())
            text = " ".join(pending)
            if heredoc := _HEREDOC.search(text):
                end = i + 1
                while end < len(lines) and lines[end].strip() != heredoc["word"]:
                    end += 1
                text = "\n".join([text, *lines[i + 1 : end + 1]])
                i = end
            yield Command(doc, block.line + start, text, block.marker)
            i += 1


def redirect_targets(command: Command) -> list[str]:
    """The files a command writes with `>` or `>>`."""
    first_line = _PLACEHOLDER.sub("PLACEHOLDER", command.text.split("\n", 1)[0])
    words = shlex.shlex(_HEREDOC.sub("", first_line), posix=True, punctuation_chars=True)
    words.whitespace_split = True
    words.commenters = "#"
    tokens = list(words)
    return [tokens[i + 1] for i, t in enumerate(tokens[:-1]) if t in (">", ">>")]
