"""`mixbits allocate` on a table written by `mixbits run` on a tiny model."""

import json

import pytest
from typer.testing import CliRunner

from mixbits.cli import app
from mixbits.plan import Plan
from tests.test_pipeline import finished_run  # noqa: F401  (module fixture)


def test_allocate_writes_a_plan_within_budget(finished_run, tmp_path):  # noqa: F811
    cfg, _ = finished_run
    out = tmp_path / "plan.json"
    r = CliRunner().invoke(app, ["allocate", str(cfg.output_dir / "sensitivity.json"), "--strategy", "optimal,greedy,conservative",
                                 "--target-bpw", "3.0", "--output", str(out)])
    assert r.exit_code == 0, r.output
    assert "optimal" in r.output and "greedy" in r.output
    plan = Plan.load(out)
    shapes = {l["name"]: tuple(l["shape"]) for l in json.loads((cfg.output_dir / "layer_statistics.json").read_text())["layers"]}
    assert plan.bits_per_weight(shapes) <= 3.0 + 1e-9
    assert plan.specs["model.layers.1.mlp.gate_proj"] == plan.specs["model.layers.1.mlp.up_proj"]


def test_allocate_refuses_an_impossible_budget(finished_run):  # noqa: F811
    cfg, _ = finished_run
    r = CliRunner().invoke(app, ["allocate", str(cfg.output_dir / "sensitivity.json"), "--target-bpw", "1.0"])
    assert r.exit_code == 2 and "cheapest" in r.output


@pytest.mark.parametrize("args, words", [
    (["--strategy", "nope", "--target-bpw", "3"], ("error: unknown strategy 'nope'", "optimal")),
    (["--bits", "7", "--target-bpw", "3"], ("error: --bits/--group-sizes leave no quantizing config", "w4g64")),
])
def test_allocate_bad_input(finished_run, args, words):  # noqa: F811
    cfg, _ = finished_run
    r = CliRunner().invoke(app, ["allocate", str(cfg.output_dir / "sensitivity.json"), *args])
    assert r.exit_code == 2 and all(w in r.output for w in words), r.output
    assert "Traceback" not in r.output
