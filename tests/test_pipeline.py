"""The whole `mixbits run` on a tiny random Llama built in the test."""

import json

import numpy as np
import pytest
import torch

from mixbits.config import AllocationConfig, DataConfig, RunConfig
from mixbits.export.native import load_native
from mixbits.pipeline import run


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, tiny_text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = RunConfig(
        model=str(tiny_model_dir), output_dir=out, device="cpu",
        data=DataConfig(dataset=str(tiny_text_file), seqlen=32, calib_windows=4, eval_windows=4),
        allocation=AllocationConfig(target_bpw=3.5, group_sizes=(32, 64)), progress=False, quantizer="rtn",
    )
    return cfg, run(cfg)


def test_run_writes_the_three_files_and_honest_results(finished_run):
    cfg, results = finished_run
    out = cfg.output_dir
    for name in ("results.json", "layer_statistics.json", "plan.json", "sensitivity.json"):
        assert (out / name).is_file()
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["models"].keys() == results["models"].keys()
    models = results["models"]
    assert set(models) == {"original", "mixed", "uniform w3g64", "uniform w3g32"}
    assert models["mixed"]["bpw"] <= 3.5 + 1e-9 and models["uniform w3g64"]["bpw"] <= 3.5
    assert models["uniform w3g32"]["bpw"] > 3.5 and not models["uniform w3g32"]["fits_budget"]
    assert models["original"]["bpw"] == 16.0 and models["original"]["kl"] == pytest.approx(0, abs=1e-6)
    assert models["mixed"]["bytes_on_disk"] < models["original"]["bytes_on_disk"]
    assert models["mixed"]["kl"] > 0
    for stage in ("load", "data", "sensitivity", "allocate", "quantize", "evaluate", "save"):
        assert stage in results["timings_s"]
    layers = json.loads((out / "layer_statistics.json").read_text())["layers"]
    assert len(layers) == 14 and all("fisher_trace" in l["scores"] for l in layers)
    run_meta = json.loads((out / "sensitivity.json").read_text())["meta"]["run"]
    assert run_meta["config"]["model"] == cfg.model and run_meta["environment"]["torch"] == torch.__version__
    assert len(run_meta["data"]["calibration"]["sha256"]) == 64 and "mixbits" in run_meta["environment"]
    by_name = {l["name"]: l["spec"] for l in layers}
    assert by_name["model.layers.0.self_attn.q_proj"] == by_name["model.layers.0.self_attn.v_proj"]


def test_saved_model_reloads_with_the_same_logits(finished_run, tiny_model_dir):
    from mixbits.model.apply import fake_quantize_model
    from mixbits.model.load import load_model
    from mixbits.plan import Plan

    cfg, _ = finished_run
    reloaded = load_native(cfg.output_dir / "model")
    original, _ = load_model(str(tiny_model_dir))
    expected = fake_quantize_model(original, Plan.load(cfg.output_dir / "plan.json"))
    ids = torch.randint(0, 200, (1, 24))
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, expected(input_ids=ids).logits, atol=1e-5)


def test_a_given_plan_replaces_allocation(finished_run, tmp_path):
    cfg, _ = finished_run
    again = RunConfig(model=cfg.model, output_dir=tmp_path, device="cpu", data=cfg.data,
                      allocation=cfg.allocation, plan=cfg.output_dir / "plan.json", progress=False)
    results = run(again)
    assert results["budget"]["solver"] is None
    assert not (tmp_path / "sensitivity.json").exists()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_run_on_cuda_matches_the_cpu_plan(finished_run, tmp_path):
    cfg, cpu_results = finished_run
    on_gpu = RunConfig(model=cfg.model, output_dir=tmp_path, device="cuda", data=cfg.data, quantizer="rtn",
                       allocation=cfg.allocation, progress=False)
    results = run(on_gpu)
    assert results["environment"]["device"].startswith("cuda")
    for name, m in cpu_results["models"].items():
        assert results["models"][name]["ppl"] == pytest.approx(m["ppl"], rel=1e-2)


@pytest.mark.parametrize("quantizer", ["clip", "gptq"])
def test_stronger_quantizers_run_end_to_end_and_export_their_own_codes(finished_run, tmp_path, quantizer):
    cfg, rtn = finished_run
    again = RunConfig(model=cfg.model, output_dir=tmp_path, device="cpu", data=cfg.data,
                      allocation=cfg.allocation, plan=cfg.output_dir / "plan.json", quantizer=quantizer, progress=False)
    results = run(again)
    layers = results["quantizer"]["mixed"]["layers"]
    if quantizer == "gptq":  # clip minimises the diag(H)-weighted error, not the full output error
        assert all(l["error"] <= l["rtn_error"] * (1 + 1e-6) for l in layers.values())
    assert all(l["error"] >= 0 for l in layers.values())
    from mixbits.model.load import load_model
    from mixbits.model.quantize import quantize_model
    from mixbits.plan import Plan

    original, _ = load_model(str(cfg.model))
    from mixbits.data.text import load_text
    from mixbits.data.windows import calibration_windows

    _, tok = load_model(str(cfg.model))
    calib = calibration_windows(tok, load_text(cfg.data.dataset, "calibration"), cfg.data.seqlen, cfg.data.calib_windows, cfg.data.seed)
    expected, _ = quantize_model(original, Plan.load(tmp_path / "plan.json"), quantizer=quantizer, windows=calib,
                                 device="cpu", progress=False, gptq=again.gptq)
    reloaded = load_native(tmp_path / "model")
    ids = torch.randint(0, 200, (1, 24))
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, expected(input_ids=ids).logits, atol=1e-5)


def test_gptq_run_allocates_on_the_damage_gptq_leaves(finished_run, tmp_path):
    from mixbits.sensitivity.table import DamageTable

    cfg, _ = finished_run
    fisher = DamageTable.load(cfg.output_dir / "sensitivity.json")
    follow = RunConfig(model=cfg.model, output_dir=tmp_path / "follow", device="cpu", data=cfg.data,
                       allocation=cfg.allocation, quantizer="gptq", progress=False)
    run(follow)
    followed = DamageTable.load(tmp_path / "follow" / "sensitivity.json")
    assert followed.meta["quantizer"] == "gptq" and fisher.meta["quantizer"] == "rtn"
    gain = followed.damage[:, :-1] / fisher.damage[:, :-1]
    assert np.all(gain > 0) and np.all(gain < 1)  # GPTQ leaves less output error than RTN everywhere
    plain = RunConfig(model=cfg.model, output_dir=tmp_path / "plain", device="cpu", data=cfg.data,
                      allocation=cfg.allocation, quantizer="gptq", damage="rtn", progress=False)
    run(plain)
    assert np.array_equal(DamageTable.load(tmp_path / "plain" / "sensitivity.json").damage, fisher.damage)


def test_no_baselines_quantizes_and_scores_only_the_mixed_model(finished_run, tmp_path):
    cfg, full = finished_run
    lean = RunConfig(model=cfg.model, output_dir=tmp_path, device="cpu", data=cfg.data, allocation=cfg.allocation,
                     progress=False, quantizer="rtn", baselines=False)
    results = run(lean)
    assert set(results["models"]) == {"original", "mixed"}
    assert results["models"]["mixed"]["ppl"] == pytest.approx(full["models"]["mixed"]["ppl"], rel=1e-5)
    assert (tmp_path / "report.html").is_file() and (tmp_path / "model").is_dir()


def test_training_the_baselines_needs_them():
    from mixbits.config import TrainConfig

    with pytest.raises(ValueError, match="--no-baselines"):
        RunConfig(quantizer="rtn", train=TrainConfig(init="rtn"), train_baselines=True, baselines=False)
