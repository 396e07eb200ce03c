"""Shared helpers of the reliability suite: copies of the tiny model folder, and a guard that fails the
test if a model is loaded (for checks that must run on the input alone, before any compute)."""

from __future__ import annotations

import shutil

import pytest
from typer.testing import CliRunner

from mixbits.cli import app

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [*args])


def one_line_error(result, *words: str) -> None:
    """Exit 2, a single `error:` line naming every word, and no traceback."""
    text = result.output
    assert result.exit_code == 2, (result.exit_code, text, result.exception)
    assert "Traceback" not in text
    lines = [line for line in text.splitlines() if line.strip()]
    errors = [line[line.index("error:"):] for line in lines if "error:" in line]  # after any progress bar
    assert len(errors) == 1, text
    for word in words:
        assert word in errors[0], (word, errors[0])


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path):
    """A private copy of the tiny model folder that a test may damage."""
    return shutil.copytree(tiny_model_dir, tmp_path / "model")


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if the run pipeline loads a model (or reads its config)."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded although the input alone shows the error")

    import mixbits.pipeline

    monkeypatch.setattr(mixbits.pipeline, "load_model", refuse)
    return refuse
