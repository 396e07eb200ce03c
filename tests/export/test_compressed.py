"""compressed-tensors export: transformers loads a symmetric mixed plan on CPU and gives the
in-memory model's logits; compressed-tensors' own decompressor (an implementation independent
of ours) rebuilds every layer of an asymmetric plan exactly."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, CompressedTensorsConfig

from mixbits.export.compressed import write_compressed
from mixbits.export.rules import ExportError
from mixbits.model.apply import fake_quantize_model
from mixbits.plan import Plan
from mixbits.quant.spec import QuantSpec
from tests.conftest import tiny_llama

compressed_tensors = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors import BaseCompressor  # noqa: E402
from compressed_tensors.quantization import QuantizationConfig  # noqa: E402

L = "model.layers."


def mixed_plan(symmetric: bool) -> Plan:
    s = "s" if symmetric else ""
    labels = {}
    rows = [("w8g64", "w4g32", "w4pc", "w8g128"), ("w4g32", None, "w4g64", "w4pc")]
    for i, (qkv, o, gate_up, down) in enumerate(rows):
        labels.update({f"{L}{i}.self_attn.{p}": qkv + s for p in ("q_proj", "k_proj", "v_proj")})
        labels.update({f"{L}{i}.mlp.{p}": gate_up + s for p in ("gate_proj", "up_proj")})
        labels[f"{L}{i}.mlp.down_proj"] = down + s
        if o is not None:
            labels[f"{L}{i}.self_attn.o_proj"] = o + s
    return Plan({name: QuantSpec.parse(label) for name, label in labels.items()})


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_transformers_loads_a_symmetric_mixed_plan(tmp_path):
    model, plan = tiny_llama(), mixed_plan(symmetric=True)
    write_compressed(model, plan, tmp_path / "ct")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32)
    expected = fake_quantize_model(model, plan)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits(loaded, ids), logits(expected, ids), rtol=0, atol=1e-5)


def test_config_has_one_group_per_spec_and_validates(tmp_path):
    plan = mixed_plan(symmetric=False)
    write_compressed(tiny_llama(), plan, tmp_path / "ct")
    full = json.loads((tmp_path / "ct" / "config.json").read_text())
    cfg = full["quantization_config"]
    parsed = QuantizationConfig.model_validate(cfg)
    assert parsed.format == "pack-quantized" and len(parsed.config_groups) == 5
    targets = {t: g for g in parsed.config_groups.values() for t in g.targets}
    assert set(targets) == set(plan.quantized())
    for name, spec in plan.quantized().items():
        w = targets[name].weights
        assert (w.num_bits, w.group_size, w.symmetric) == (spec.bits, spec.group_size, spec.symmetric)
    assert full["dtype"] == "float16"


def test_compressed_tensors_decompresses_every_asymmetric_layer_exactly(tmp_path):
    model, plan = tiny_llama(), mixed_plan(symmetric=False)
    write_compressed(model, plan, tmp_path / "ct")
    cfg = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    groups = QuantizationConfig.model_validate(cfg).config_groups.values()
    scheme_of = {t: g for g in groups for t in g.targets}
    tensors = load_file(str(tmp_path / "ct" / "model.safetensors"))
    expected = fake_quantize_model(model, plan)
    for name in plan.quantized():
        own = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
        assert own["weight_packed"].dtype == torch.int32 and "weight_zero_point" in own
        compressor = BaseCompressor.get_value_from_registry("pack-quantized")
        weight = compressor.decompress({**own, "weight_scale": own["weight_scale"].float()}, scheme_of[name])["weight"]
        torch.testing.assert_close(weight.float(), expected.get_submodule(name).weight, rtol=0, atol=1e-7)


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`")
def test_single_group_asymmetric_plan_loads_with_dequantize(tmp_path):
    model = tiny_llama()
    plan = Plan({name: QuantSpec(4, 32) for name in mixed_plan(True).specs})
    write_compressed(model, plan, tmp_path / "ct")
    loaded = AutoModelForCausalLM.from_pretrained(
        tmp_path / "ct", dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True))
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(1))
    # this route dequantizes in float16, hence the looser tolerance
    torch.testing.assert_close(logits(loaded, ids), logits(fake_quantize_model(model, plan), ids), rtol=0, atol=2e-3)


def test_bits_other_than_4_and_8_are_refused_before_writing(tmp_path):
    specs = dict(mixed_plan(True).specs)
    specs[f"{L}0.mlp.down_proj"] = QuantSpec.parse("w3g128")
    specs[f"{L}1.mlp.down_proj"] = QuantSpec.parse("w6g64s")
    with pytest.raises(ExportError) as err:
        write_compressed(tiny_llama(), Plan(specs), tmp_path / "ct")
    message = str(err.value)
    assert f"{L}0.mlp.down_proj w3g128" in message and "nearest: w4g128" in message
    assert f"{L}1.mlp.down_proj w6g64s" in message and "nearest: w8g64s" in message
    assert list(tmp_path.iterdir()) == []
