"""GPTQ export: an independent unpacker written plainly (`export/gptq_reference.py`, none of
the writer's code) rebuilds every weight from the files, following the `dynamic` rules the way
GPTQModel and vLLM match them (`re.match`, first rule wins, "-:" skips), and the rebuilt model
must give the in-memory model's logits."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from mixbits.export.gptq import refit_zero_groups, write_gptq
from mixbits.export.gptq_reference import layer_config, load_gptq_reference
from mixbits.export.rules import ExportError
from mixbits.model.apply import fake_quantize_model
from mixbits.plan import Plan
from mixbits.quant.affine import dequantize, minmax_qparams, quantize
from mixbits.quant.spec import QuantSpec
from tests.conftest import tiny_llama

L = "model.layers."


def mixed_plan() -> Plan:
    """Four specs over the tiny Llama (hidden 64, MLP 128); layer 1's o_proj stays in fp16."""
    labels = {}
    for i, (qkv, o, gate_up, down) in enumerate([("w3g32", "w4g64s", "w2g32", "w8g128"),
                                                  ("w4g32", None, "w4g32", "w4pc")]):
        labels.update({f"{L}{i}.self_attn.{p}": qkv for p in ("q_proj", "k_proj", "v_proj")})
        labels.update({f"{L}{i}.mlp.{p}": gate_up for p in ("gate_proj", "up_proj")})
        labels[f"{L}{i}.mlp.down_proj"] = down
        if o is not None:
            labels[f"{L}{i}.self_attn.o_proj"] = o
    return Plan({name: QuantSpec.parse(label) for name, label in labels.items()})


def test_rebuilt_weights_give_the_in_memory_logits(tmp_path):
    model, plan = tiny_llama(), mixed_plan()
    write_gptq(model, plan, tmp_path / "gptq")
    rebuilt, qcfg = load_gptq_reference(tmp_path / "gptq")
    expected = fake_quantize_model(model, plan)
    for name, spec in plan.specs.items():
        got = layer_config(qcfg, name)
        assert (got["bits"], got["group_size"], got["sym"]) == (spec.bits, spec.group_size or -1, spec.symmetric)
        assert torch.equal(rebuilt.get_submodule(name).weight, expected.get_submodule(name).weight), name
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(ids).logits, expected(ids).logits, rtol=0, atol=1e-5)


def test_config_is_the_common_spec_plus_dynamic_rules(tmp_path):
    write_gptq(tiny_llama(), mixed_plan(), tmp_path / "gptq")
    cfg = json.loads((tmp_path / "gptq" / "config.json").read_text())["quantization_config"]
    assert (cfg["bits"], cfg["group_size"], cfg["sym"], cfg["checkpoint_format"]) == (4, 32, False, "gptq")
    assert json.loads((tmp_path / "gptq" / "quantize_config.json").read_text()) == cfg
    assert layer_config(cfg, f"{L}1.self_attn.o_proj") is None  # kept in fp16: skipped by "-:"
    # vLLM matches its fused modules by their fused names
    assert layer_config(cfg, f"{L}0.self_attn.qkv_proj")["bits"] == 3
    assert layer_config(cfg, f"{L}0.mlp.gate_up_proj")["bits"] == 2
    assert layer_config(cfg, f"{L}1.self_attn.qkv_proj")["bits"] == 4
    tensors = load_file(str(tmp_path / "gptq" / "model.safetensors"))
    assert tensors[f"{L}1.self_attn.o_proj.weight"].dtype == torch.float16
    assert tensors[f"{L}0.self_attn.q_proj.qweight"].shape == (64 * 3 // 32, 64)  # 3 bits span words
    assert tensors[f"{L}0.self_attn.q_proj.g_idx"].tolist() == [i // 32 for i in range(64)]


def test_zero_point_zero_is_refit_in_v1_and_kept_in_v2(tmp_path):
    torch.manual_seed(1)
    w = torch.randn(32, 64)
    w[:, :32] = w[:, :32].abs() + 0.01  # first group of every row all positive: min-max zero-point 0
    spec = QuantSpec(4, 32)
    qp = minmax_qparams(w, spec)
    assert bool((qp.zero[:, 0] == 0).all())
    refit, count = refit_zero_groups(w, qp, spec)
    assert count == 32 and bool((refit.zero >= 1).all())
    assert torch.equal(refit.scale[:, 1], qp.scale[:, 1]) and torch.equal(refit.zero[:, 1], qp.zero[:, 1])
    err = (dequantize(quantize(w, refit, spec), refit, spec) - w).abs()
    assert bool((err[:, :32] <= refit.scale[:, :1] / 2 + 1e-6).all())

    model = tiny_llama()
    name = f"{L}0.mlp.down_proj"
    with torch.no_grad():
        model.get_submodule(name).weight[:, :32] = model.get_submodule(name).weight[:, :32].abs() + 0.01
    plan = Plan({name: spec})
    for fmt, exact in (("gptq", False), ("gptq_v2", True)):
        write_gptq(model, plan, tmp_path / fmt, checkpoint_format=fmt)
        rebuilt, _ = load_gptq_reference(tmp_path / fmt)
        expected = fake_quantize_model(model, plan).get_submodule(name).weight
        same = torch.equal(rebuilt.get_submodule(name).weight, expected)
        assert same == exact
    meta = json.loads((tmp_path / "gptq" / "mixbits-export.json").read_text())
    assert meta["refitted_zero_groups"] == {name: 64}


def test_plans_gptq_cannot_store_are_refused_before_writing(tmp_path):
    specs = dict(mixed_plan().specs)
    specs[f"{L}0.mlp.down_proj"] = QuantSpec.parse("w5g128")
    specs[f"{L}1.mlp.down_proj"] = QuantSpec.parse("w6g32")
    with pytest.raises(ExportError) as err:
        write_gptq(tiny_llama(), Plan(specs), tmp_path / "out")
    message = str(err.value)
    assert f"{L}0.mlp.down_proj w5g128" in message and "nearest: w8g128" in message
    assert f"{L}1.mlp.down_proj w6g32" in message and "nearest: w8g32" in message
    assert list(tmp_path.iterdir()) == []


def test_fused_layers_must_share_a_spec(tmp_path):
    specs = dict(mixed_plan().specs)
    specs[f"{L}0.self_attn.k_proj"] = QuantSpec.parse("w4g32")
    with pytest.raises(ExportError, match="fused layers"):
        write_gptq(tiny_llama(), Plan(specs), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
