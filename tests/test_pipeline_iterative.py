"""`mixbits run --iterative` on a tiny random Llama: the path, the stop rule, and a saved model that
is exactly the one the last kept step measured."""

import json
from dataclasses import replace

import pytest
from typer.testing import CliRunner

from mixbits.cli import app
from mixbits.config import AllocationConfig, DataConfig, RunConfig
from mixbits.data.text import load_text
from mixbits.data.windows import eval_windows
from mixbits.eval.perplexity import evaluate_models
from mixbits.export.native import load_native
from mixbits.config import IterativeConfig
from mixbits.model.load import load_model
from mixbits.pipeline import run
from mixbits.plan import Plan
from mixbits.quant.spec import QuantSpec


def _cfg(model_dir, text_file, out, **it) -> RunConfig:
    return RunConfig(
        model=str(model_dir), output_dir=out, device="cpu", quantizer="rtn", progress=False, report=False,
        data=DataConfig(dataset=str(text_file), seqlen=32, calib_windows=4, eval_windows=4),
        allocation=AllocationConfig(target_bpw=4.0, group_sizes=(32,), bits=(2, 3, 4)),
        iterative=IterativeConfig(spec=QuantSpec(2, 32), **it),
    )


@pytest.fixture(scope="module")
def stopped_run(tiny_model_dir, tiny_text_file, tmp_path_factory):
    # 2-bit on a random model: a large increase per step, so the limit stops the walk early
    cfg = _cfg(tiny_model_dir, tiny_text_file, tmp_path_factory.mktemp("it"), layers_per_iteration=1,
               max_ppl_increase=0.002, windows=2)
    return cfg, run(cfg)


def test_path_is_recorded_and_stops_at_the_limit(stopped_run):
    cfg, results = stopped_run
    it = json.loads((cfg.output_dir / "results.json").read_text())["iterative"]
    steps = it["steps"]
    assert it["stopped"] in ("threshold", "max_iterations", "all_quantized") and steps
    kept = [s for s in steps if s["accepted"]]
    assert all(s["increase"] <= 0.002 for s in kept)
    if it["stopped"] == "threshold":
        assert not steps[-1]["accepted"] and steps[-1]["increase"] > 0.002
        assert all(s["accepted"] for s in steps[:-1])
    plan = Plan.load(cfg.output_dir / "plan.json")
    assert set(plan.quantized()) == {n for s in kept for n in s["units"]}
    assert it["final"]["quantized_units"] == sum(len(s["units"]) for s in kept)
    assert results["models"]["mixed"]["bpw"] == pytest.approx(it["final"]["bpw"])
    assert "uniform w2g32" in results["models"] and results["budget"]["plan_source"] == "iterative mode"


def test_saved_model_gives_the_last_kept_steps_validation_ppl(stopped_run, tiny_model_dir, tiny_text_file):
    cfg, _ = stopped_run
    it = json.loads((cfg.output_dir / "results.json").read_text())["iterative"]
    _, tok = load_model(str(tiny_model_dir))
    val = eval_windows(tok, load_text(str(tiny_text_file), "validation"), 32, 2)
    saved = load_native(cfg.output_dir / "model")
    ppl = evaluate_models({"m": saved}, val, device="cpu", progress=False)["m"].ppl
    assert ppl == pytest.approx(it["final"]["ppl"], rel=1e-4)


def test_generous_limit_quantizes_everything(tiny_model_dir, tiny_text_file, tmp_path):
    cfg = _cfg(tiny_model_dir, tiny_text_file, tmp_path, layers_per_iteration=4, max_ppl_increase=1e9, windows=1)
    results = run(cfg)
    it = results["iterative"]
    assert it["stopped"] == "all_quantized" and all(s["accepted"] for s in it["steps"])
    assert results["models"]["mixed"]["ppl"] == pytest.approx(results["models"]["uniform w2g32"]["ppl"], rel=1e-6)


def test_bad_iterative_options_are_refused(tiny_model_dir, tiny_text_file, tmp_path):
    with pytest.raises(ValueError, match="not among the candidate configs"):
        replace(_cfg(tiny_model_dir, tiny_text_file, tmp_path), iterative=IterativeConfig(spec=QuantSpec(5, 32)))
    r = CliRunner().invoke(app, ["run", "--model", str(tiny_model_dir), "--max-ppl-increase", "0.2"])
    assert r.exit_code == 2 and "need --iterative" in " ".join(r.output.split())
