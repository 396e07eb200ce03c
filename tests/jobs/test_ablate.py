"""`mixbits ablate` on a tiny random Llama: every section, their guarantees, resume, bad input."""

import json
import shutil

import pytest
from typer.testing import CliRunner

import mixbits.jobs.ablate as ablate_module
from mixbits.allocate.registry import predicted_damage
from mixbits.cli.common import app
from mixbits.plan import Plan
from mixbits.sensitivity.table import DamageTable
from mixbits.config import SCHEDULES
from tests.jobs.conftest import small_options

TRAIN = ["--qat-train-size", "2", "--qat-val-size", "2", "--qat-seqlen", "32", "--qat-epochs", "1"]


def ablate_args(model, out, text_file, *extra) -> list[str]:
    return ["ablate", "--model", str(model), "--output-dir", str(out), "--budgets", "3,4", "--target-bpw", "3.5",
            *TRAIN, *small_options(text_file), *extra]


@pytest.fixture(scope="module")
def ablated(tiny_model_dir, tiny_text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("ablate")
    arms = ",".join((*SCHEDULES, "fixed+e2e"))
    r = CliRunner().invoke(app, ablate_args(tiny_model_dir, out, tiny_text_file, "--qat-schedules", arms))
    assert r.exit_code == 0, r.output
    return out, json.loads((out / "ablation.json").read_text()), r.output


def never(name):
    def fail(*args, **kwargs):
        raise AssertionError(f"{name} should not run")
    return fail


def test_every_section_is_written_printed_and_plotted(ablated):
    out, results, output = ablated
    assert results["format"] == "mixbits.ablation/1"
    assert list(results["sections"]) == ["strategy", "training", "budget"]
    for section in results["sections"].values():
        assert section["rows"] and section["seconds"] > 0
        for row in section["rows"]:
            assert {"arm", "bpw", "mb", "ppl", "kl", "seconds"} <= set(row) and row["ppl"] > 1
    assert "strategy:" in output and "training adaptation" in output and "target bits" in output
    assert (out / "ablation.png").stat().st_size > 20_000


def test_strategy_rows_match_their_plans_and_optimal_never_predicts_more_damage(ablated):
    out, results, _ = ablated
    table = DamageTable.load(out / "sensitivity.json")
    shapes = dict(zip(table.units, table.shapes))
    rows = results["sections"]["strategy"]["rows"]
    assert [r["arm"] for r in rows] == ["conservative", "optimal @ conservative", "adaptive", "optimal @ adaptive",
                                        "aggressive", "optimal @ aggressive"]
    for row in rows:
        plan = Plan.load(out / row["plan_file"])
        assert row["bpw"] == pytest.approx(plan.bits_per_weight(shapes), abs=1e-12)
        assert row["predicted_damage"] == pytest.approx(predicted_damage(table, plan.specs))
    for heuristic in (r for r in rows if r["arm"] == r["pair"]):
        optimal = next(r for r in rows if r["arm"] == f"optimal @ {heuristic['arm']}")
        assert optimal["bpw"] <= heuristic["bpw"] + 1e-9
        assert optimal["predicted_damage"] <= heuristic["predicted_damage"] * (1 + 1e-9)
    adaptive = next(r for r in rows if r["arm"] == "adaptive")
    assert adaptive["target"] == "4 bpw" and adaptive["bpw"] <= 4.0 + 1e-9  # the seed's adaptive target


def test_training_arms_share_one_plan_and_equal_total_epochs(ablated):
    _, results, _ = ablated
    rows = results["sections"]["training"]["rows"]
    assert [r["arm"] for r in rows] == ["untrained", *SCHEDULES, "fixed+e2e"]
    assert len({(r["bpw"], r["plan_file"]) for r in rows}) == 1 and rows[0]["bpw"] <= 3.5 + 1e-9
    trained = rows[1:]
    assert all(r["blocks"] == 2 for r in trained)
    assert all(r["total_epochs"] == pytest.approx(2.0) for r in trained)  # 1 base epoch x 2 blocks, rescaled
    assert all(r["init"] == "rtn" for r in rows)
    assert rows[-1]["resumed_blocks"] == 2 and rows[1]["resumed_blocks"] == 0  # +e2e replays fixed's Block-AP


def test_budget_rows_meet_their_budget_and_optimal_predicts_no_more_damage(ablated):
    _, results, _ = ablated
    rows = results["sections"]["budget"]["rows"]
    for b in (3.0, 4.0):
        at = {r["arm"].split()[0]: r for r in rows if r["target_bpw"] == b}
        assert set(at) == {"optimal", "uniform"}
        assert at["optimal"]["bpw"] <= b + 1e-9 and at["uniform"]["bpw"] <= b + 1e-9
        assert at["optimal"]["predicted_damage"] <= at["uniform"]["predicted_damage"] * (1 + 1e-9)


def test_resume_keeps_finished_sections_and_reruns_only_changed_ones(ablated, tiny_model_dir, tiny_text_file, tmp_path,
                                                                      monkeypatch):
    src, results, _ = ablated
    out = shutil.copytree(src, tmp_path / "copy")
    arms = ",".join((*SCHEDULES, "fixed+e2e"))
    monkeypatch.setattr(ablate_module, "prepare", never("loading the model"))
    r = CliRunner().invoke(app, ablate_args(tiny_model_dir, out, tiny_text_file, "--resume", "--qat-schedules", arms))
    assert r.exit_code == 0, r.output
    assert json.loads((out / "ablation.json").read_text())["sections"] == results["sections"]
    monkeypatch.undo()
    monkeypatch.setattr(ablate_module, "strategy_section", never("the strategy section"))
    monkeypatch.setattr(ablate_module, "training_section", never("the training section"))
    r = CliRunner().invoke(app, ablate_args(tiny_model_dir, out, tiny_text_file, "--resume", "--budgets", "3.5",
                                            "--qat-schedules", arms))
    assert r.exit_code == 0, r.output
    again = json.loads((out / "ablation.json").read_text())["sections"]
    assert again["strategy"] == results["sections"]["strategy"] and again["training"] == results["sections"]["training"]
    assert {r["target_bpw"] for r in again["budget"]["rows"]} == {3.5}


@pytest.mark.parametrize("flag, value, message", [
    ("--sections", "strategy,speed", "choose one or more of strategy,training,budget"),
    ("--sections", "budget,budget", "lists 'budget' twice"),
    ("--strategies", "optimal", "not a heuristic strategy"),
    ("--strategies", "clever", "not a heuristic strategy"),
    ("--qat-schedules", "fixed,fast", "fast: unknown"),
    ("--budgets", "3,-1", "must be a positive number"),
    ("--budgets", "three", "'three' is not a number"),
])
def test_bad_options_are_refused_before_the_model_loads(flag, value, message, tiny_model_dir, tiny_text_file, tmp_path,
                                                        monkeypatch):
    monkeypatch.setattr(ablate_module, "prepare", never("loading the model"))
    out = tmp_path / "never"
    r = CliRunner().invoke(app, ablate_args(tiny_model_dir, out, tiny_text_file, flag, value))
    assert r.exit_code == 2 and message in r.output, r.output
    assert not out.exists()


def test_an_unreachable_budget_is_refused_before_calibration(tiny_model_dir, tiny_text_file, tmp_path, monkeypatch):
    monkeypatch.setattr(ablate_module, "calibrate", never("calibration"))
    out = tmp_path / "never"
    r = CliRunner().invoke(app, ablate_args(tiny_model_dir, out, tiny_text_file, "--budgets", "1.5,3"))
    assert r.exit_code == 2 and "--budgets 1.5 bpw cannot be met" in r.output, r.output
    assert not out.exists()


def test_a_fresh_rerun_starts_training_over(ablated, tiny_model_dir, tiny_text_file, tmp_path):
    src, results, _ = ablated
    out = shutil.copytree(src, tmp_path / "copy")  # holds the finished checkpoints of every arm
    r = CliRunner().invoke(app, ablate_args(tiny_model_dir, out, tiny_text_file, "--sections", "training",
                                            "--qat-schedules", "fixed,sqrt", "--overwrite"))  # no --resume
    assert r.exit_code == 0, r.output
    rows = json.loads((out / "ablation.json").read_text())["sections"]["training"]["rows"]
    assert [r["resumed_blocks"] for r in rows[1:]] == [0, 0]  # trained again, not replayed
    before = {r["arm"]: r["ppl"] for r in results["sections"]["training"]["rows"]}
    assert all(r["ppl"] == pytest.approx(before[r["arm"]]) for r in rows)  # same seeds, same numbers


def test_library_config_checks():
    from mixbits.config import DataConfig, RunConfig
    from mixbits.jobs.experiment_config import AblateConfig

    with pytest.raises(ValueError, match="the ablation uses one text"):
        AblateConfig(run=RunConfig(data=DataConfig(dataset="canterbury")))
    with pytest.raises(ValueError, match="--qat-schedules is empty"):
        AblateConfig(run=RunConfig(), schedules=())
