"""`mixbits run --candidates gguf|both --target-size-mb X` plans for the GGUF file, end to end through the CLI:
a tiny random Llama 256 wide (rows of 256 and 512) with its tokenizer, run, then `mixbits export --format
gguf` from the run folder. The file has exactly the bytes the plan predicted, at or below the target and
within 0.5 % of it, every layer in its planned type (none moved), and its tensors decode
(`gguf.quants.dequantize`) to exactly the weights of the run's native model (`load_native`). Refusals:
a target below the smallest file, a model whose rows allow no ggml type."""

from __future__ import annotations

import json

import pytest
import torch
from gguf import GGMLQuantizationType as Q
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

from mixbits.cli import app
from mixbits.config import AllocationConfig
from mixbits.export.ggml_blocks import block_type
from mixbits.export.gguf_size import gguf_size, gguf_weight_bytes
from mixbits.export.native import load_native
from mixbits.model.apply import layer_shapes
from mixbits.plan import Plan
from mixbits.quant.ggml_linear import GGMLLinear
from mixbits.quant.spec import GGMLSpec, ggml_types_for_row
from tests.conftest import make_text, make_tokenizer
from tests.export.test_gguf_kquant import gguf_name, read_tensors

runner = CliRunner()


def save_llama(folder, tokenizer, hidden: int, intermediate: int, heads: int = 4) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=2, num_attention_heads=heads, num_key_value_heads=2,
                      max_position_embeddings=128, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(model folder, text file, smallest and largest GGUF file over the ggml types, in bytes)."""
    root = tmp_path_factory.mktemp("run_gguf")
    text = make_text()
    (root / "text.txt").write_text(text)
    model = save_llama(root / "model", make_tokenizer(text), 256, 512)
    size = gguf_size(model, AutoTokenizer.from_pretrained(root / "model"))
    configs = AllocationConfig(target_bpw=5.0, candidates="gguf").configs()[:-1]
    sizes = [[gguf_weight_bytes(s, c) for c in configs] for s in layer_shapes(model).values()]
    return root / "model", root / "text.txt", size.fixed + sum(map(min, sizes)), size.fixed + sum(map(max, sizes))


def run(setup, out, *args):
    folder, text, *_ = setup
    return runner.invoke(app, ["run", "--no-verbose", "--model", str(folder), "--dataset", str(text), "--seqlen", "32",
                               "--calib-windows", "4", "--eval-windows", "4", "--device", "cpu", "--no-report",
                               "--output-dir", str(out), *map(str, args)])


def export_gguf(out):
    r = runner.invoke(app, ["export", "--no-verbose", "--format", "gguf", "--run-dir", str(out)])
    assert r.exit_code == 0, r.output + repr(r.exception)
    return out / "export-gguf" / "model.gguf"


def check_file(out, target: int) -> Plan:
    """The exported file against the run's plan and native model; returns the plan."""
    plan = Plan.load(out / "plan.json")
    predicted = plan.meta["gguf"]["file_bytes"]
    assert plan.meta["gguf"]["target_bytes"] == target
    path = export_gguf(out)
    assert path.stat().st_size == predicted  # the bytes the plan predicted
    assert predicted <= target and (target - predicted) / target < 0.005  # within 0.5 % under the target
    tensors, native = read_tensors(path), load_native(out / "model")
    for name, spec in plan.quantized().items():
        kind, _, weight = tensors[gguf_name(name)]
        assert kind == (Q[spec.name] if isinstance(spec, GGMLSpec) else block_type(spec)), name  # no layer moved
        layer = native.get_submodule(name)
        if isinstance(spec, GGMLSpec):
            assert isinstance(layer, GGMLLinear)
            assert torch.equal(weight, layer.dequantized_weight()), name  # exactly the run's weights
    types = sorted({s.label for s in plan.quantized().values()})
    print(f"\n{out.name}: target {target} bytes, file {predicted} bytes ({100 * (target - predicted) / target:.3f} % "
          f"below), types {', '.join(types)}")  # the figures docs/gguf.md quotes (pytest -s)
    return plan


def test_run_for_a_gguf_target_exports_the_planned_file(setup, tmp_path):
    *_, smallest, largest = setup
    target = int(smallest + 0.3 * (largest - smallest))
    r = run(setup, tmp_path / "run", "--candidates", "gguf", "--target-size-mb", target / 1e6, "--quantizer", "rtn")
    assert r.exit_code == 0, r.output + repr(r.exception)
    plan = check_file(tmp_path / "run", target)
    assert all(isinstance(s, GGMLSpec) for s in plan.quantized().values())
    assert len({s.name for s in plan.quantized().values()}) >= 3  # a mixed plan, not one type
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    baselines = [n for n in results["models"] if n.startswith("uniform")]
    assert baselines and all(GGMLSpec.parse(n.split()[1].upper()) for n in baselines)  # ggml types
    assert results["models"]["mixed"]["kl"] > 0


def test_run_over_both_candidate_sets_exports_the_planned_file(setup, tmp_path):
    *_, smallest, largest = setup
    target = int(smallest + 0.15 * (largest - smallest))
    r = run(setup, tmp_path / "run", "--candidates", "both", "--target-size-mb", target / 1e6, "--quantizer", "clip",
            "--bits", "4,8", "--group-sizes", "32,128")
    assert r.exit_code == 0, r.output + repr(r.exception)
    check_file(tmp_path / "run", target)


def test_block_ap_over_ggml_candidates_exports_the_trained_file(setup, tmp_path):
    """--qat trains the ggml grids (Block-AP on each type's grid): the file holds the trained weights exactly,
    at the planned bytes; E2E-QP, which trains affine step sizes only, is refused before any work."""
    *_, smallest, largest = setup
    target = int(smallest + 0.3 * (largest - smallest))
    r = run(setup, tmp_path / "run", "--candidates", "gguf", "--target-size-mb", target / 1e6, "--quantizer", "rtn",
            "--qat", "--qat-train-size", "4", "--qat-val-size", "2", "--qat-seqlen", "32", "--qat-epochs", "1")
    assert r.exit_code == 0, r.output + repr(r.exception)
    check_file(tmp_path / "run", target)  # the file decodes to exactly the native model's (trained) weights
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["training"]["mixed"]["blocks"] and results["models"]["mixed"]["kl"] > 0
    r = run(setup, tmp_path / "e2e", "--candidates", "gguf", "--target-size-mb", target / 1e6, "--qat", "--e2e")
    assert r.exit_code == 2 and "E2E-QP" in r.output and "affine" in r.output and not (tmp_path / "e2e").exists()


def test_a_target_below_the_smallest_file_is_refused_naming_it(setup, tmp_path):
    *_, smallest, _ = setup
    r = run(setup, tmp_path / "run", "--candidates", "gguf", "--target-size-mb", (smallest - 1000) / 1e6)
    assert r.exit_code != 0 and "cannot be met" in r.output and f"smallest GGUF file is {smallest} bytes" in r.output


def test_a_model_whose_rows_allow_no_ggml_type_is_refused(tmp_path):
    text = make_text()
    (tmp_path / "text.txt").write_text(text)
    save_llama(tmp_path / "odd", make_tokenizer(text), 40, 72)  # rows of 40 and 72: not multiples of 32
    r = run((tmp_path / "odd", tmp_path / "text.txt"), tmp_path / "run", "--candidates", "gguf", "--target-bpw", 4)
    assert r.exit_code != 0 and "no block linear" in r.output and "candidates affine" in r.output.replace("\n", " ")


def test_nearest_gguf_export_of_an_affine_plan_moves_only_rows_without_a_type_at_their_bits(tmp_path):
    """The demo's case in small: an affine plan at 3.25 bpw over 2-8 bits on a Llama with rows of 256 and 576,
    exported with --nearest. A layer keeps its code bits (w3 -> Q3_K, w4 -> Q4_0/Q4_1 blocks, ...) unless its
    row allows no GGUF type at those bits (576-wide rows at 2, 3 or 6 bits: bits rounded up), and the file has
    exactly the bytes `gguf_size` predicts for the exported plan."""
    text = make_text()
    (tmp_path / "text.txt").write_text(text)
    model = save_llama(tmp_path / "m", make_tokenizer(text), 256, 576)
    out = tmp_path / "run"
    r = run((tmp_path / "m", tmp_path / "text.txt"), out, "--target-bpw", 3.25, "--quantizer", "rtn",
            "--group-sizes", "64,128", "--no-baselines")
    assert r.exit_code == 0, r.output + repr(r.exception)
    r = runner.invoke(app, ["export", "--no-verbose", "--format", "gguf", "--run-dir", str(out), "--nearest"])
    assert r.exit_code == 0, r.output + repr(r.exception)
    path = out / "export-gguf" / "model.gguf"
    planned, written = Plan.load(out / "plan.json"), Plan.load(path.with_suffix(".plan.json"))
    shapes = layer_shapes(model)
    moved = {n for n, s in planned.quantized().items() if written.specs[n].bits != s.bits}
    print(f"\n--nearest: {len(moved)} of {len(planned.quantized())} planned layers moved; file {path.stat().st_size} "
          "bytes")
    no_type = {n for n, s in planned.quantized().items()
               if s.bits not in (4, 5, 8) and not any(t.code_bits == s.bits for t in ggml_types_for_row(shapes[n][1]))}
    assert moved == no_type and moved  # the 576-wide rows below 4 bits (or at 6), and only they
    assert all(written.specs[n].bits > planned.specs[n].bits for n in moved)
    size = gguf_size(model, AutoTokenizer.from_pretrained(tmp_path / "m"))
    assert path.stat().st_size == size.file_bytes(written)
