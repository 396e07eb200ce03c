"""docs/reliability.md is the catalogue of issue 18: every row names a test that exists, and the README's
reliability line gives the catalogue's counts (so neither can drift from the tests)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CATALOGUE = ROOT / "docs" / "reliability.md"
TEST_REF = re.compile(r"(tests/[\w/]+\.py)::(\w+)")


def rows(section: str) -> list[str]:
    """The data rows of the table under `## {section}`."""
    text = CATALOGUE.read_text()
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    lines = [ln for ln in body.splitlines() if ln.startswith("|")]
    return [ln for ln in lines[2:]]  # header and separator first


def test_every_row_names_tests_that_exist():
    for section in ("Inputs", "Output folders"):
        found = rows(section)
        assert found, f"docs/reliability.md has no table under '## {section}'"
        for row in found:
            refs = TEST_REF.findall(row)
            assert refs, f"docs/reliability.md row names no test: {row[:100]}"
            for path, name in refs:
                tree = ast.parse((ROOT / path).read_text())
                names = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
                assert name in names, f"docs/reliability.md names {path}::{name}, which does not exist"


def test_readme_gives_the_catalogues_counts():
    inputs, outputs = len(rows("Inputs")), len(rows("Output folders"))
    line = next((ln for ln in (ROOT / "README.md").read_text().splitlines() if ln.startswith("Reliability:")), "")
    want = f"Reliability: {inputs + outputs} bad inputs and faults ({inputs} inputs, {outputs} output-folder cases)"
    assert line.startswith(want), f"README's reliability line should start with {want!r}, not {line!r}"
