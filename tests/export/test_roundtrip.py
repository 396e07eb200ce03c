"""Export -> load back through the engine's loader -> perplexity, on a tiny random Llama run
through the native folder exactly as bench/export_table.py runs a real one: the native round
trip is exact, the others match the in-memory model of the plan they store."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from mixbits.export.from_native import load_for_export
from mixbits.export.native import save_native
from mixbits.export.roundtrip import ROUTES, in_memory_model, measure_format, source_for
from mixbits.model.apply import fake_quantize_model
from mixbits.plan import Plan
from mixbits.quant.spec import QuantSpec
from tests.conftest import make_text, make_tokenizer, tiny_llama

L = "model.layers."
ALWAYS = [r for r in ROUTES if r.requires is None]


def run_plan() -> Plan:
    """Bits every format stores (4), and bits only some do (2, 3, 5): gptq, compressed and gguf
    each need the nearest plan for some layers."""
    specs = {}
    for i, (qkv, o, gate_up, down) in enumerate([("w3g32", "w4g64", "w2g32", "w5g128"),
                                                  ("w4g32", "w8pc", "w4g64", "w4g32")]):
        specs.update({f"{L}{i}.self_attn.{p}": QuantSpec.parse(qkv) for p in ("q_proj", "k_proj", "v_proj")})
        specs.update({f"{L}{i}.mlp.{p}": QuantSpec.parse(gate_up) for p in ("gate_proj", "up_proj")})
        specs[f"{L}{i}.self_attn.o_proj"] = QuantSpec.parse(o)
        specs[f"{L}{i}.mlp.down_proj"] = QuantSpec.parse(down)
    return Plan(specs)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(original model, ExportSource read from its native folder, token windows [3, 32])."""
    tokenizer = make_tokenizer(make_text())
    model = tiny_llama(vocab=len(tokenizer))
    folder = tmp_path_factory.mktemp("run") / "model"
    save_native(model, run_plan(), folder, tokenizer=tokenizer)
    ids = tokenizer(make_text(10, seed=3), return_tensors="pt").input_ids[0]
    return model, load_for_export(folder), ids[: 3 * 32].reshape(3, 32)


def test_native_round_trip_is_exact(run, tmp_path):
    original, source, windows = run
    [row] = measure_format("native", source, original, windows, tmp_path, ALWAYS)
    assert row["changed_layers"] == 0 and row["bytes"] == sum(
        f.stat().st_size for f in (tmp_path / "native").glob("model-*.safetensors"))
    assert row["ppl_loaded"] == row["ppl_in_memory"] and row["kl"] == 0 and row["top1"] == 1


@pytest.mark.parametrize("fmt, changed", [("gptq", 1), ("compressed", 6), ("gguf", 5)])
def test_nearest_plan_round_trips_match_the_in_memory_model(run, tmp_path, fmt, changed):
    original, source, windows = run
    rows = measure_format(fmt, source, original, windows, tmp_path, ALWAYS)
    assert [r["route"] for r in rows] == [fmt]
    row = rows[0]
    assert row["changed_layers"] == changed and row["bytes"] > 0
    if fmt == "compressed":  # the run's plan is asymmetric
        assert row["engine"].startswith("compressed-tensors decompressor")
    # gptq v1 refits zero-point-0 groups, gguf rounds Q4_1/Q5_1 offsets to fp16: close, not always equal
    assert row["ppl_loaded"] == pytest.approx(row["ppl_in_memory"], rel=1e-3)
    assert 0 <= row["kl"] < 1e-4 and row["top1"] >= 0.99


def test_in_memory_model_keeps_run_codes_and_requantizes_changed_layers(run):
    original, source, _ = run
    chosen, changed = source_for("compressed", source, original)
    model = in_memory_model(chosen)
    expected = fake_quantize_model(original, chosen.plan)  # the run is round-to-nearest: same codes
    assert changed == 6
    for name in chosen.plan.specs:
        assert torch.equal(model.get_submodule(name).weight, expected.get_submodule(name).weight), name
    assert torch.equal(model.model.embed_tokens.weight, expected.model.embed_tokens.weight)


def test_a_plan_that_needs_the_nearest_one_needs_the_original(run):
    _, source, _ = run
    assert source_for("native", source, None) == (source, 0)
    with pytest.raises(ValueError, match="original model"):
        source_for("gguf", source, None)


def test_symmetric_compressed_plan_loads_in_transformers(tmp_path):
    tokenizer = make_tokenizer(make_text())
    model = tiny_llama(vocab=len(tokenizer))
    plan = Plan({name: QuantSpec.parse("w4g32s") for name in run_plan().specs})
    save_native(model, plan, tmp_path / "run", tokenizer=tokenizer)
    windows = tokenizer(make_text(10, seed=3), return_tensors="pt").input_ids[0][:64].reshape(2, 32)
    [row] = measure_format("compressed", load_for_export(tmp_path / "run"), None, windows, tmp_path / "out", ALWAYS)
    assert row["engine"] == "transformers from_pretrained"
    assert row["ppl_loaded"] == pytest.approx(row["ppl_in_memory"], rel=1e-5) and row["kl"] < 1e-8


@pytest.mark.parametrize("route, fmt", [("llama.cpp", "gguf"), ("gptqmodel", "gptq")])
def test_optional_engines_load_the_export(run, tmp_path, route, fmt):
    chosen = next(r for r in ROUTES if r.name == route)
    pytest.importorskip(chosen.requires)
    original, source, windows = run
    [row] = [r for r in measure_format(fmt, source, original, windows, tmp_path, [chosen]) if r["route"] == route]
    # llama.cpp rounds activations to 8 bits in quantized products, GPTQModel computes in fp16
    assert row["ppl_loaded"] == pytest.approx(row["ppl_in_memory"], rel=1e-2)
    assert row["kl"] < 1e-3 and row["top1"] >= 0.95


def bench_script(name: str, run, run_dir: Path, monkeypatch):
    """The module bench/NAME.py, reading the tiny run (written to `run_dir`) instead of a real one."""
    original, source, _ = run
    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[2] / "bench" / f"{name}.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    save_native(source.model, source.plan, run_dir / "model", source.tokenizer, source.qparams)
    (run_dir / "results.json").write_text(json.dumps({"config": {
        "model": "tiny", "data": {"dataset": "tiny.txt"}, "allocation": {"target_bpw": None}}}))
    monkeypatch.setattr(bench, "load_model", lambda name: (original, source.tokenizer))
    monkeypatch.setattr(bench, "load_text", lambda name, split: make_text(10, seed=3).split("\n\n"))
    return bench


def test_bench_script_writes_the_table(run, tmp_path, monkeypatch):
    """bench/export_table.py end to end on a tiny finished run (so the script cannot rot)."""
    run_dir = tmp_path / "run"
    bench = bench_script("export_table", run, run_dir, monkeypatch)
    monkeypatch.setattr(bench, "available", lambda routes: ALWAYS)
    report = bench.main(["--run-dir", str(run_dir), "--out-dir", str(tmp_path / "out"), "--eval-windows", "2",
                         "--seqlen", "32", "--formats", "native,gguf"])
    assert [r["route"] for r in report["rows"]] == ["native", "gguf"] and report["windows"] == 2
    assert json.loads((tmp_path / "out" / "export_table.json").read_text())["rows"] == report["rows"]
    assert report["plan_bpw"] == pytest.approx(report["rows"][0]["bpw"])
    assert "| native | mixbits load_native |" in bench.table(report)


def test_llamacpp_script_scores_the_gguf_beside_mixbits(run, tmp_path, monkeypatch):
    pytest.importorskip("llama_cpp")
    run_dir = tmp_path / "run"
    bench = bench_script("llamacpp_ppl", run, run_dir, monkeypatch)
    results = bench.main(["--run-dir", str(run_dir), "--eval-windows", "2", "--seqlen", "32"])
    assert (run_dir / "llamacpp" / "gguf" / "model.gguf").is_file()
    memory, llama = results["mixbits in-memory"], results["llama.cpp"]
    assert memory["tokens"] == llama["tokens"] == 2 * 31
    assert llama["ppl"] == pytest.approx(memory["ppl"], rel=1e-2) and llama["kl"] < 1e-3
