"""GPTQ export: an independent unpacker written plainly here rebuilds every weight from the
files, following the `dynamic` rules the way GPTQModel and vLLM match them (`re.match`, first
rule wins, "-:" skips), and the rebuilt model must give the in-memory model's logits."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from mixbits.export.gptq import refit_zero_groups, write_gptq
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


def unpack_columns(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Codes [count, C] from int32 words [W, C]: code i of a column sits at bits i*b .. i*b+b-1
    of the column's words read as one little-endian stream (so a code may span two words)."""
    words = packed.astype(np.int64) & 0xFFFFFFFF
    mask = (1 << bits) - 1
    out = np.zeros((count, packed.shape[1]), dtype=np.int64)
    for i in range(count):
        word, offset = divmod(i * bits, 32)
        value = words[word] >> offset
        if offset + bits > 32:
            value = value | (words[word + 1] << (32 - offset))
        out[i] = value & mask
    return out


def layer_config(qcfg: dict, name: str) -> dict | None:
    """GPTQModel's / vLLM's reading of `dynamic`: None when the module is skipped (fp16)."""
    base = {k: qcfg[k] for k in ("bits", "group_size", "sym")}
    for pattern, override in qcfg["dynamic"].items():
        if pattern.startswith("-:"):
            if re.match(pattern[2:], name):
                return None
        elif re.match(pattern.removeprefix("+:"), name):
            return {**base, **override}
    return base


def rebuild_weight(tensors: dict, name: str, bits: int, zero_offset: int) -> torch.Tensor:
    qweight, qzeros = tensors[f"{name}.qweight"].numpy(), tensors[f"{name}.qzeros"].numpy()
    scales, g_idx = tensors[f"{name}.scales"].float().numpy(), tensors[f"{name}.g_idx"].numpy()
    in_features, out_features = qweight.shape[0] * 32 // bits, qweight.shape[1]
    q = unpack_columns(qweight, bits, in_features)                            # [in, out]
    zeros = unpack_columns(qzeros.T, bits, out_features).T + zero_offset     # [G, out]
    w = (q - zeros[g_idx]).astype(np.float32) * scales[g_idx]
    return torch.from_numpy(w.T.copy())


def load_reference(folder) -> tuple[LlamaForCausalLM, dict]:
    """A plain Llama holding the weights rebuilt from the GPTQ folder."""
    cfg = json.loads((folder / "config.json").read_text())
    qcfg = cfg.pop("quantization_config")
    model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in cfg.items() if k != "architectures"})).eval()
    tensors = load_file(str(folder / "model.safetensors"))
    offset = 1 if qcfg["checkpoint_format"] == "gptq" else 0
    state = {k: v.float() for k, v in tensors.items() if not k.endswith(("qweight", "qzeros", "scales", "g_idx"))}
    for key in [k for k in tensors if k.endswith(".qweight")]:
        name = key.removesuffix(".qweight")
        config = layer_config(qcfg, name)
        assert config is not None, f"{name} has codes but its dynamic rule skips it"
        state[f"{name}.weight"] = rebuild_weight(tensors, name, config["bits"], offset)
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    return model, qcfg


def test_rebuilt_weights_give_the_in_memory_logits(tmp_path):
    model, plan = tiny_llama(), mixed_plan()
    write_gptq(model, plan, tmp_path / "gptq")
    rebuilt, qcfg = load_reference(tmp_path / "gptq")
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
        rebuilt, _ = load_reference(tmp_path / fmt)
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
