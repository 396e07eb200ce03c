"""Bad input stops before any compute, with one line that names the fix."""

import json

import pytest
from typer.testing import CliRunner

from mixbits.cli import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, ["run", "--no-verbose", *args])


def test_unknown_dataset(tiny_model_dir, tmp_path):
    r = invoke("--model", str(tiny_model_dir), "--dataset", "nonsense-data", "--output-dir", str(tmp_path))
    assert r.exit_code == 2 and "nonsense-data" in r.output
    assert not (tmp_path / "results.json").exists()


def test_unknown_model(tmp_path, tiny_text_file):
    r = invoke("--model", str(tmp_path / "no-such-model"), "--dataset", str(tiny_text_file), "--output-dir", str(tmp_path))
    assert r.exit_code == 2 and "no-such-model" in r.output


@pytest.mark.parametrize("bpw, words", [("1.0", "cheapest"), ("20", "richest")])
def test_budget_outside_range(tiny_model_dir, tiny_text_file, tmp_path, bpw, words):
    r = invoke("--model", str(tiny_model_dir), "--dataset", str(tiny_text_file), "--target-bpw", bpw, "--output-dir", str(tmp_path),
               "--seqlen", "64")  # within the tiny model's context of 256
    assert r.exit_code == 2 and words in r.output and "choose a budget" in r.output


def test_malformed_plan(tiny_model_dir, tiny_text_file, tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"layers": {"model.layers.0.mlp.up_proj": "w9g128"}}))
    r = invoke("--model", str(tiny_model_dir), "--dataset", str(tiny_text_file), "--plan", str(plan), "--output-dir", str(tmp_path / "out"))
    assert r.exit_code == 2 and "bits=9" in r.output
