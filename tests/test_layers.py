"""The import layers of pyproject.toml's [tool.importlinter] contract hold (STYLE.md: jobs above
stages; a stage never imports a job, the CLI or the report)."""

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("mixbits.train", "mixbits.allocate", "mixbits.sensitivity", "mixbits.eval", "mixbits.export",
          "mixbits.classify")


def layers() -> list[list[str]]:
    contract = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]
    assert contract["type"] == "layers"
    return [[m.strip() for m in layer.replace(":", "|").split("|")] for layer in contract["layers"]]


def depth(module: str) -> int:
    return next(i for i, layer in enumerate(layers()) if module in layer)


def test_the_contract_says_what_style_md_asks():
    assert layers()[0] == ["mixbits.cli"] and layers()[1] == ["mixbits.commands"]  # the CLI over the commands
    assert depth("mixbits.jobs") == depth("mixbits.pipeline") == 2
    for stage in STAGES:  # below jobs and report; report is above every stage
        assert depth(stage) > depth("mixbits.report") > depth("mixbits.jobs")
    for low in ("mixbits.quant", "mixbits.config", "mixbits.plan", "mixbits.data", "mixbits.io"):
        assert depth(low) > depth("mixbits.model") > max(depth(s) for s in STAGES)


def lint_imports() -> str:
    found = Path(sys.executable).parent / "lint-imports"
    command = str(found) if found.exists() else shutil.which("lint-imports")
    if command is None:
        pytest.fail("lint-imports is not installed; `pip install -e .[test]` (import-linter>=2)")
    return command


def test_import_layers_hold():
    done = subprocess.run([lint_imports(), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout
