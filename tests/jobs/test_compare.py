"""`mixbits compare` on a tiny random Llama and a tiny random GPT-2, saved as local HF folders."""

import json
import shutil
from dataclasses import replace

import pytest
from typer.testing import CliRunner

import mixbits.pipeline
from mixbits.cli.common import app
from mixbits.config import AllocationConfig, DataConfig, RunConfig
from mixbits.jobs.compare import is_finished, model_config
from mixbits.jobs.experiment_config import CompareConfig, safe_name
from mixbits.plan import Plan
from tests.jobs.conftest import small_options


def compare_args(models, out, text_file, *extra) -> list[str]:
    return ["compare", "--models", *map(str, models), "--target-bpw", "3.5", "--output-dir", str(out),
            *small_options(text_file), *extra]


@pytest.fixture(scope="module")
def compared(tiny_model_dir, tiny_gpt2_dir, tiny_text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    models = (str(tiny_model_dir), str(tiny_gpt2_dir))
    r = CliRunner().invoke(app, compare_args(models, out, tiny_text_file))  # `--models a b`: the seed's syntax
    assert r.exit_code == 0, r.output
    return out, models


def counting_run(monkeypatch, fail=()):
    calls, real = [], mixbits.pipeline.run

    def run(cfg):
        calls.append(cfg.model)
        if cfg.model in fail:
            raise RuntimeError("simulated crash")
        return real(cfg)

    monkeypatch.setattr(mixbits.pipeline, "run", run)
    return calls


def test_summary_and_analyses_equal_each_runs_results(compared):
    out, models = compared
    summary = json.loads((out / "comparison_summary.json").read_text())
    assert summary["format"] == "mixbits.comparison/1" and list(summary["models"]) == list(models)
    assert "model" not in summary["config"] and summary["config"]["data"]["seqlen"] == 32
    for name in models:
        entry = summary["models"][name]
        results = json.loads((out / safe_name(name) / "results.json").read_text())
        assert entry["run_dir"] == str(out / safe_name(name)) and results["config"]["model"] == name
        runs = results["models"]
        assert entry["parameters"] == results["model"]["parameters"] > 0
        assert entry["original"] == {"ppl": runs["original"]["ppl"], "bytes_on_disk": runs["original"]["bytes_on_disk"]}
        for key in ("ppl", "kl", "bpw", "bytes_on_disk"):
            assert entry["mixed"][key] == runs["mixed"][key]
        assert entry["mixed"]["bpw"] <= 3.5 + 1e-9
        ratio = runs["original"]["bytes_on_disk"] / runs["mixed"]["bytes_on_disk"]
        assert entry["mixed"]["compression"] == pytest.approx(ratio)
        assert entry["mixed"]["compression"] > 1
        assert {f"uniform {k}" for k in entry["uniform"]} == {k for k in runs if k.startswith("uniform ")}
        for label, u in entry["uniform"].items():
            assert u == {k: runs[f"uniform {label}"][k] for k in ("ppl", "kl", "bpw", "bytes_on_disk", "fits_budget")}
        analysis = json.loads((out / f"{safe_name(name)}_analysis.json").read_text())
        assert analysis["format"] == "mixbits.analysis/1" and analysis["model"] == name
        assert analysis["results"] == runs and analysis["config"] == results["config"]
        assert analysis["timings_s"] == results["timings_s"]
        plan = Plan.load(out / safe_name(name) / "plan.json")
        assert analysis["plan"] == {u: s.label for u, s in plan.specs.items()}
        sens = analysis["sensitivity"]
        assert sens["method"] == "fisher" and set(sens["units"]) == set(plan.specs)
        assert all(len(v) == len(sens["units"]) for v in sens["scores"].values()) and "fisher_trace" in sens["scores"]
    gpt2_units = json.loads((out / f"{safe_name(models[1])}_analysis.json").read_text())["sensitivity"]["units"]
    assert any(u.endswith("attn.c_attn") for u in gpt2_units)  # each model its own layers
    assert (out / "comparison.png").stat().st_size > 10_000
    html = (out / "comparison_report.html").read_text()
    assert all(name in html for name in summary["models"]) and "<img" in html


def test_unknown_model_is_refused_before_any_model_loads(tiny_model_dir, tiny_text_file, tmp_path, monkeypatch):
    calls = counting_run(monkeypatch)
    out = tmp_path / "never"
    r = CliRunner().invoke(app, compare_args([tiny_model_dir, "no such/model here"], out, tiny_text_file))
    assert r.exit_code == 2 and "unknown model 'no such/model here'" in r.output
    assert calls == [] and not out.exists()


@pytest.mark.parametrize("models, message", [
    (["a/b", "a/b"], "lists 'a/b' twice"),
    (["org/x-y", "org_x-y"], "would share the folder"),
    ([], "at least one model"),
])
def test_bad_model_lists_are_refused(models, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        CompareConfig(run=RunConfig(), models=tuple(models), output_dir=tmp_path)


def test_resume_skips_finished_models_and_reruns_missing_ones(compared, tiny_text_file, tmp_path, monkeypatch):
    src, models = compared
    out = shutil.copytree(src, tmp_path / "copy")
    calls = counting_run(monkeypatch)
    r = CliRunner().invoke(app, compare_args(models, out, tiny_text_file, "--resume"))
    assert r.exit_code == 0, r.output
    assert calls == []  # both finished with the same config (wherever the folder now lives)
    (out / safe_name(models[1]) / "results.json").unlink()
    (out / f"{safe_name(models[1])}_analysis.json").unlink()
    r = CliRunner().invoke(app, compare_args(models, out, tiny_text_file, "--resume"))
    assert r.exit_code == 0, r.output
    assert calls == [models[1]]
    assert list(json.loads((out / "comparison_summary.json").read_text())["models"]) == list(models)
    assert (out / f"{safe_name(models[1])}_analysis.json").is_file()


def test_a_changed_config_is_not_finished(compared, tiny_text_file):
    out, models = compared
    run = RunConfig(model=models[0], output_dir=out, device="cpu", quantizer="rtn", use_cache=False,
                    data=DataConfig(dataset=str(tiny_text_file), seqlen=32, calib_windows=2, eval_windows=2),
                    allocation=AllocationConfig(target_bpw=3.5, bits=(2, 3, 4), group_sizes=(32, 64)))
    run_cfg = model_config(CompareConfig(run=run, models=models, output_dir=out), models[0])
    assert is_finished(run_cfg)  # the same options as the CLI call
    assert not is_finished(replace(run_cfg, data=replace(run_cfg.data, eval_windows=3)))
    assert not is_finished(replace(run_cfg, quantizer="clip"))


def test_a_failing_model_loses_nothing_and_the_rest_still_run(compared, tiny_text_file, tmp_path, monkeypatch):
    src, models = compared
    out = shutil.copytree(src, tmp_path / "copy")
    for name in models:
        (out / safe_name(name) / "results.json").unlink()
    (out / "comparison_summary.json").unlink()
    calls = counting_run(monkeypatch, fail={models[0]})
    r = CliRunner().invoke(app, compare_args(models, out, tiny_text_file, "--resume"))
    assert r.exit_code == 1 and "1 model(s) failed" in r.output and "simulated crash" in r.output
    assert calls == list(models)  # the second model ran after the first one failed
    summary = json.loads((out / "comparison_summary.json").read_text())
    assert list(summary["models"]) == [models[1]]
    assert (out / "comparison.png").is_file()
