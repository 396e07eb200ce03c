"""The format registry: what each format can express, the nearest plan it can, one `export`
entry, no partial file on failure, and exports from a run's native folder that keep a
quantizer's own codes."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from mixbits.export import formats, shard_file
from mixbits.export.formats import FORMATS, ExportError, expressible, export, fused_groups, nearest_plan
from mixbits.export.from_native import load_for_export, with_plan
from mixbits.export.gptq_reference import load_gptq_reference
from mixbits.export.native import load_native, save_native
from mixbits.model.apply import layer_shapes
from mixbits.model.quantize import quantize_model
from mixbits.plan import Plan
from mixbits.quant.spec import QuantSpec
from tests.conftest import make_text, make_tokenizer, tiny_llama

L = "model.layers."


def plan_of(labels: dict[str, str]) -> Plan:
    return Plan({name: QuantSpec.parse(label) for name, label in labels.items()})


def wide_plan() -> Plan:
    """Every bit-width mixbits has, fused groups agreeing."""
    labels = {}
    rows = [("w2g32", "w3g64", "w4g32s", "w5g128"), ("w6g32", "w8pc", "w4g64", "w3g32")]
    for i, (qkv, o, gate_up, down) in enumerate(rows):
        labels.update({f"{L}{i}.self_attn.{p}": qkv for p in ("q_proj", "k_proj", "v_proj")})
        labels.update({f"{L}{i}.mlp.{p}": gate_up for p in ("gate_proj", "up_proj")})
        labels.update({f"{L}{i}.self_attn.o_proj": o, f"{L}{i}.mlp.down_proj": down})
    return plan_of(labels)


def test_each_format_names_what_it_cannot_store():
    model, plan = tiny_llama(), wide_plan()
    shapes, fused = layer_shapes(model), fused_groups(model)
    bad = {fmt: {name for p in expressible(fmt, plan, shapes, fused) for name in p.layers} for fmt in FORMATS}
    assert bad["native"] == set()
    assert all(f.rules.name == name for name, f in FORMATS.items())  # messages name the format as passed
    bits = {name: spec.bits for name, spec in plan.specs.items()}
    assert bad["gptq"] == {n for n, b in bits.items() if b in (5, 6)}
    assert bad["compressed"] == {n for n, b in bits.items() if b not in (4, 8)}
    assert bad["gguf"] == {n for n, b in bits.items() if b in (2, 3, 6)}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_nearest_plan_is_expressible_and_keeps_quality(fmt):
    model, plan = tiny_llama(), wide_plan()
    shapes, fused = layer_shapes(model), fused_groups(model)
    near = nearest_plan(fmt, plan, shapes, fused)
    assert expressible(fmt, near, shapes, fused) == []
    for name, spec in plan.specs.items():
        assert near.specs[name].bits >= spec.bits  # rounded up, never down (every format has 8 bits)
        if not expressible(fmt, Plan({name: spec}), shapes):
            assert near.specs[name] == spec


def test_nearest_plan_unifies_fused_layers_to_the_most_precise():
    model = tiny_llama()
    labels = {f"{L}0.self_attn.q_proj": "w4g64", f"{L}0.self_attn.k_proj": "w8g64", f"{L}0.self_attn.v_proj": "w4g32"}
    near = nearest_plan("gptq", plan_of(labels), layer_shapes(model), fused_groups(model))
    assert {near.specs[n].label for n in labels} == {"w8g64"}


def test_unknown_format_is_refused():
    with pytest.raises(ExportError, match="choose one of native, gptq, compressed, gguf"):
        export(tiny_llama(), Plan({}), "unused", "awq")


def test_export_writes_each_format_where_asked(tmp_path):
    model = tiny_llama()
    plan = plan_of({f"{L}0.mlp.down_proj": "w4g32s", f"{L}1.mlp.down_proj": "w8g64s"})
    assert export(model, plan, tmp_path / "g", "gguf") == tmp_path / "g" / "model.gguf"
    assert export(model, plan, tmp_path / "x.gguf", "gguf") == tmp_path / "x.gguf"
    for fmt in ("gptq", "compressed"):
        assert (export(model, plan, tmp_path / fmt, fmt) / "model.safetensors").is_file()
    assert (export(model, plan, tmp_path / "native", "native") / "model.safetensors.index.json").is_file()
    reloaded = load_native(tmp_path / "native")
    assert type(reloaded.get_submodule(f"{L}0.mlp.down_proj")).__name__ == "QuantLinear"


def test_a_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    model, plan = tiny_llama(), plan_of({f"{L}0.mlp.down_proj": "w4g32s"})

    real_write = shard_file.ShardWriter.write

    def half_written(self, name, tensor):  # the header and one tensor are on disk, then the disk fills
        real_write(self, name, tensor)
        raise OSError("disk full")

    monkeypatch.setattr(shard_file.ShardWriter, "write", half_written)
    for fmt in ("gptq", "compressed"):
        with pytest.raises(OSError, match="disk full"):
            export(model, plan, tmp_path / fmt, fmt)
    monkeypatch.setattr(formats.gguf.gguf.GGUFWriter, "write_tensor_data", lambda self, *a, **kw: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        export(model, plan, tmp_path / "m.gguf", "gguf")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_rewrite_keeps_the_previous_export(tmp_path, monkeypatch):
    model, plan = tiny_llama(), plan_of({f"{L}0.mlp.down_proj": "w4g32s"})
    export(model, plan, tmp_path / "gptq", "gptq")
    before = (tmp_path / "gptq" / "model.safetensors").read_bytes()
    monkeypatch.setattr(shard_file.ShardWriter, "write", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        export(model, plan, tmp_path / "gptq", "gptq")
    assert (tmp_path / "gptq" / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["gptq"]


@pytest.fixture(scope="module")
def clipped_run(tmp_path_factory):
    """A native folder written from clip-search qparams (not min-max), as `mixbits run` writes it."""
    tokenizer = make_tokenizer(make_text())
    model = tiny_llama(vocab=len(tokenizer))
    labels = {}
    for i, spec in enumerate(("w4g32s", "w8g64s")):
        labels.update({f"{L}{i}.self_attn.{p}": spec for p in ("q_proj", "k_proj", "v_proj", "o_proj")})
        labels.update({f"{L}{i}.mlp.{p}": spec for p in ("gate_proj", "up_proj", "down_proj")})
    plan = plan_of(labels)
    quantized, report = quantize_model(model, plan, quantizer="clip", device="cpu", progress=False)
    folder = tmp_path_factory.mktemp("run") / "model"
    save_native(quantized, plan, folder, tokenizer, qparams=report.qparams)
    return folder, plan, model


def test_exports_from_the_native_folder_keep_the_quantizer_codes(clipped_run, tmp_path):
    folder, plan, _ = clipped_run
    source = load_for_export(folder)
    assert source.plan.to_dict()["layers"] == plan.to_dict()["layers"] and source.tokenizer is not None
    native = load_native(folder)
    export(source.model, source.plan, tmp_path / "gptq", "gptq", source.tokenizer, source.qparams)
    rebuilt, _ = load_gptq_reference(tmp_path / "gptq")
    for name in plan.specs:
        assert torch.equal(rebuilt.get_submodule(name).weight, native.get_submodule(name).dequantized_weight()), name
    pytest.importorskip("compressed_tensors")
    export(source.model, source.plan, tmp_path / "ct", "compressed", source.tokenizer, source.qparams)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32)
    ids = torch.randint(0, 200, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, native(ids).logits, rtol=0, atol=1e-5)


def test_another_plan_keeps_unchanged_codes_and_requantizes_the_rest(clipped_run):
    folder, plan, original = clipped_run
    source = load_for_export(folder)
    changed = f"{L}0.mlp.down_proj"
    target = Plan({**plan.specs, changed: QuantSpec.parse("w8g32s")})
    moved = with_plan(source, original, target)
    assert set(moved.qparams) == set(plan.specs) - {changed}
    assert torch.equal(moved.model.get_submodule(changed).weight, original.get_submodule(changed).weight)
    kept = f"{L}1.mlp.up_proj"
    assert torch.equal(moved.model.get_submodule(kept).weight, source.model.get_submodule(kept).weight)
