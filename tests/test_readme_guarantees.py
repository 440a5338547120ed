"""The README's Guarantees table names, for each row, the tests that fail when the row breaks:
every one of them exists (a renamed or removed test would leave the row unproven)."""

from __future__ import annotations

import ast
import re

from tests.support.processes import ROOT


def guarantee_rows() -> dict[str, list[tuple[str, str]]]:
    """Row (what happens) -> the (file, test) pairs of its last column."""
    text = (ROOT / "README.md").read_text()
    table = text.split("## Guarantees", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, list[tuple[str, str]]] = {}
    for line in table.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) != 4 or cells[0] in ("what happens", "---"):
            continue
        named: list[tuple[str, str]] = []
        current = ""
        for path, test in re.findall(r"`([\w/]+\.py)?::(\w+)(?:\[[\w-]+\])?`", cells[3]):
            current = path or current  # `::name` is another test of the file named before it
            named.append((current, test))
        rows[cells[0]] = named
    return rows


def test_every_guarantee_names_tests_that_exist() -> None:
    rows = guarantee_rows()
    assert len(rows) >= 13, rows.keys()
    for row, named in rows.items():
        assert named, f"the row {row!r} names no test"
        for path, test in named:
            source = (ROOT / "tests" / path).read_text()
            defined = {
                node.name
                for node in ast.walk(ast.parse(source))
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            }
            assert test in defined, f"{row!r}: tests/{path} has no {test}"
