"""Run folders for the report tests: a real tiny run, a real tiny --qat run (shared by every
report test of the session), and copies with the optional sections added by hand."""

from __future__ import annotations

import json
import shutil

import pytest

from mixbits.config import AllocationConfig, DataConfig, RunConfig
from mixbits.pipeline import run
from mixbits.config import TrainConfig

JSON_FILES = ("results.json", "layer_statistics.json", "plan.json", "sensitivity.json")


def _config(model_dir, text_file, out, **extra) -> RunConfig:
    return RunConfig(
        model=str(model_dir), output_dir=out, device="cpu",
        data=DataConfig(dataset=str(text_file), seqlen=32, calib_windows=4, eval_windows=4),
        allocation=AllocationConfig(target_bpw=3.5, group_sizes=(32, 64)), progress=False, quantizer="rtn", **extra,
    )


@pytest.fixture(scope="session")
def tiny_run(tiny_model_dir, tiny_text_file, tmp_path_factory):
    """The output folder of a real `mixbits run` on the tiny random Llama (rtn, 3.5 bpw)."""
    out = tmp_path_factory.mktemp("report-run")
    run(_config(tiny_model_dir, tiny_text_file, out))
    return out


@pytest.fixture(scope="session")
def tiny_qat_run(tiny_model_dir, tiny_text_file, tmp_path_factory):
    """The same with --qat (Block-AP, 2 epochs, and E2E-QP)."""
    out = tmp_path_factory.mktemp("report-qat")
    train = TrainConfig(dataset=str(tiny_text_file), train_size=4, val_size=2, seqlen=32, epochs=2, e2e=True)
    run(_config(tiny_model_dir, tiny_text_file, out, train=train))
    return out


def copy_run(source, target):
    """The JSON files of a run folder (not its model) copied into `target`."""
    target.mkdir(parents=True, exist_ok=True)
    for name in JSON_FILES:
        if (source / name).is_file():
            shutil.copy(source / name, target / name)
    return target


def edit_results(run_dir, change) -> dict:
    """Apply `change(results)` to run_dir/results.json by hand, as a person would edit it."""
    path = run_dir / "results.json"
    results = json.loads(path.read_text())
    change(results)
    path.write_text(json.dumps(results, indent=2))
    return results


def zeroshot_section() -> dict:
    return {"lm_eval": "0.4.9", "limit": 50, "num_fewshot": 0, "seed": 0, "tasks": {
        "bb_physical_intuition": {"source": "bigbench physical_intuition", "docs": 50, "chance": 0.33, "models": {
            "original": {"acc": 0.52, "acc_stderr": 0.07, "acc_norm": 0.5, "acc_norm_stderr": 0.07},
            "mixed": {"acc": 0.46, "acc_stderr": 0.071, "acc_norm": 0.44, "acc_norm_stderr": 0.07}}},
        "bb_logical_deduction": {"source": "bigbench logical_deduction", "docs": 50, "chance": None, "models": {
            "original": {"acc": 0.3, "acc_stderr": 0.065, "acc_norm": None, "acc_norm_stderr": None},
            "mixed": {"acc": 0.28, "acc_stderr": 0.064, "acc_norm": None, "acc_norm_stderr": None}}}}}


def iterative_section() -> dict:
    steps = [{"step": i, "units": [f"model.layers.{i % 2}.mlp.up_proj", f"model.layers.{i % 2}.mlp.gate_proj"],
              "quantized_units": 2 * i, "bpw": 16 - 1.5 * i, "ppl": 100 * (1 + 0.004 * i), "increase": 0.004 * i,
              "accepted": True} for i in range(1, 4)]
    steps.append({"step": 4, "units": ["model.layers.0.self_attn.q_proj"], "quantized_units": 6, "bpw": 9.5,
                  "ppl": 103.0, "increase": 0.03, "accepted": False})
    return {"spec": "w4g64", "layers_per_iteration": 2, "max_ppl_increase": 0.02, "max_iterations": 10, "windows": 4,
            "order": "predicted damage at w4g64 (fisher), least first", "validation": {"split": "validation",
            "windows": 4, "seqlen": 32}, "original_ppl": 100.0, "steps": steps, "stopped": "threshold",
            "final": {"quantized_units": 6, "bpw": 11.5, "ppl": 101.2}}


@pytest.fixture
def full_run(tiny_qat_run, tmp_path):
    """The --qat run with zero-shot and iterative sections added to results.json."""
    out = copy_run(tiny_qat_run, tmp_path / "full")

    def add(results):
        results["zeroshot"], results["iterative"] = zeroshot_section(), iterative_section()

    edit_results(out, add)
    return out


@pytest.fixture
def plain_run(tiny_run, tmp_path):
    """A copy of the plain run, safe to edit."""
    return copy_run(tiny_run, tmp_path / "plain")
