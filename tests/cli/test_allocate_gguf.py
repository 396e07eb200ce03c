"""`mixbits allocate --candidates gguf --target-size-mb`: the budget counts the GGUF file. A tiny random
Llama (rows of 256 and 576: K-quants only on the 256-rows) saved with its tokenizer, a damage table over
the ggml types naming it; the plan the CLI writes, quantized and written by `write_gguf`, is a file at or
below the target and within 0.5 % of it, with every layer in its planned type and exactly the bytes the
plan predicted. A target below the smallest storable file is refused, naming that size."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

from mixbits.cli import app
from mixbits.config import AllocationConfig
from mixbits.export.gguf import write_gguf
from mixbits.export.gguf_size import gguf_size, gguf_weight_bytes
from mixbits.model.apply import layer_shapes
from mixbits.model.arch import find_linears, tied_groups
from mixbits.model.quantize import quantize_model
from mixbits.plan import Plan
from mixbits.quant.spec import KEEP
from mixbits.sensitivity.table import DamageTable
from mixbits.sensitivity.units import to_block_table
from tests.conftest import make_text, make_tokenizer
from tests.export.test_gguf_kquant import gguf_name

runner = CliRunner()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(model folder, sensitivity.json, model, shapes, smallest and largest file bytes)."""
    root = tmp_path_factory.mktemp("gguf_budget")
    tokenizer = make_tokenizer(make_text())
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=576, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    folder = root / "model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    linears, shapes = find_linears(model), layer_shapes(model)
    configs = AllocationConfig(target_bpw=5.0, candidates="gguf").configs()
    rng = np.random.default_rng(0)
    weight = rng.lognormal(sigma=2.0, size=len(linears))  # damage ~ numel * weight * 4^-bpw: falls with every bit
    bpw = np.array([16.0 if c.keep else c.bits_per_weight for c in configs])
    damage = np.array([[0.0 if c.keep else o * i * w * 4.0 ** -b if c.fits(i) else np.nan  # NaN: as Fisher writes
                        for c, b in zip(configs, bpw)] for (o, i), w in zip(shapes.values(), weight)])
    table = DamageTable(tuple(linears), tuple(shapes.values()), configs, damage, "fisher",
                        meta={"model": str(folder), "tied": [list(g) for g in tied_groups(model, linears)]})
    table.save(root / "sensitivity.json")
    to_block_table(table, linears).save(root / "blocks.json")
    size = gguf_size(model, AutoTokenizer.from_pretrained(folder))
    cheapest = {n: min(b for c in configs if (b := gguf_weight_bytes(s, c)) is not None) for n, s in shapes.items()}
    smallest = size.fixed + sum(cheapest.values())
    largest = size.file_bytes(Plan.uniform(shapes, KEEP))
    return folder, root / "sensitivity.json", model, shapes, smallest, largest


def allocate(*args):
    return runner.invoke(app, ["allocate", *map(str, args)])


def test_plan_for_a_gguf_target_writes_a_file_at_or_just_below_it(setup, tmp_path):
    folder, table, model, shapes, smallest, largest = setup
    target = smallest + 0.15 * (largest - smallest)
    out = tmp_path / "plan.json"
    r = allocate(table, "--candidates", "gguf", "--target-size-mb", target / 1e6, "--output", out)
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert "GGUF bytes" in r.output
    plan = Plan.load(out)
    assert {type(s).__name__ for s in plan.quantized().values()} == {"GGMLSpec"}
    assert len({s.name for s in plan.quantized().values()}) >= 3  # a mixed plan, not one type

    tokenizer = AutoTokenizer.from_pretrained(folder)
    quantized, report = quantize_model(model, plan, quantizer="rtn", device="cpu", progress=False)
    path = write_gguf(quantized, plan, tmp_path / "model.gguf", tokenizer=tokenizer, qparams=report.qparams)
    written = path.stat().st_size
    assert written == plan.meta["gguf"]["file_bytes"]  # predicted exactly
    assert written <= math.floor(target) and written >= 0.995 * target
    stored = {t.name: t.tensor_type for t in GGUFReader(path).tensors}
    for name, spec in plan.specs.items():  # no layer moved at export
        assert stored[gguf_name(name)] == (Q.F16 if spec.keep else Q[spec.name]), name
    kquants = [n for n, s in plan.quantized().items() if s.block == 256]
    assert kquants and all(shapes[n][1] == 256 for n in kquants)


def test_block_table_plan_is_expanded_and_sized_exactly(setup, tmp_path):
    folder, table, model, shapes, smallest, largest = setup
    target = smallest + 0.3 * (largest - smallest)
    out = tmp_path / "plan.json"
    r = allocate(table.with_name("blocks.json"), "--target-size-mb", target / 1e6, "--output", out)  # gguf: the table's
    assert r.exit_code == 0, r.output + repr(r.exception)
    plan = Plan.load(out)
    assert set(plan.specs) == set(shapes)  # one spec per linear, shared within a block
    assert len({plan.specs[n] for n in shapes if n.startswith("model.layers.0.")}) == 1
    path = write_gguf(model, plan, tmp_path / "model.gguf", tokenizer=AutoTokenizer.from_pretrained(folder))
    assert path.stat().st_size == plan.meta["gguf"]["file_bytes"] <= math.floor(target)


def test_target_below_the_smallest_file_is_refused_naming_it(setup):
    _, table, _, _, smallest, _ = setup
    r = allocate(table, "--candidates", "gguf", "--target-size-mb", (smallest - 1000) / 1e6)
    assert r.exit_code == 2, r.output
    assert "cannot be met" in r.output and f"smallest GGUF file is {smallest} bytes" in r.output, r.output
    assert "Traceback" not in r.output


@pytest.mark.parametrize("args, words", [
    (["--fixed-bytes", "1000"], ("--fixed-bytes is for the native model", "drop --fixed-bytes")),
    (["--model", "/nonexistent/model"], ("/nonexistent/model",)),
    (["--candidates", "ggml"], ("--candidates 'ggml' is not known", "gguf")),
])
def test_bad_gguf_budget_input_is_refused(setup, args, words):
    _, table, _, _, smallest, _ = setup
    r = allocate(table, "--candidates", "gguf", "--target-size-mb", 2 * smallest / 1e6, *args)
    if args[0] == "--candidates":
        r = allocate(table, *args, "--target-size-mb", 2 * smallest / 1e6)
    assert r.exit_code == 2 and all(w in r.output for w in words), r.output
    assert "Traceback" not in r.output


def test_pins_take_ggml_types_and_a_pin_rows_cannot_store_is_refused_naming_the_layers(setup, tmp_path):
    _, table, _, shapes, smallest, largest = setup
    target = (smallest + 0.3 * (largest - smallest)) / 1e6
    out = tmp_path / "plan.json"
    r = allocate(table, "--candidates", "gguf", "--target-size-mb", target, "--pin", "o_proj=q6_k", "--output", out)
    assert r.exit_code == 0, r.output + repr(r.exception)
    plan = Plan.load(out)
    pinned = [n for n in shapes if n.endswith("o_proj")]
    assert pinned and all(plan.specs[n].name == "Q6_K" for n in pinned)  # rows of 256: a K-quant fits
    r = allocate(table, "--candidates", "gguf", "--target-size-mb", target, "--pin", "down_proj=q6_k")  # rows of 576
    assert r.exit_code == 2, r.output
    assert "down_proj=q6_k" in r.output and "cannot store q6_k" in r.output, r.output
    assert "model.layers.0.mlp.down_proj" in r.output and "q4_0" in r.output and "Traceback" not in r.output
