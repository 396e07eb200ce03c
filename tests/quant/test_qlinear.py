"""QuantLinear: bit-exact with fake quantization, exact rebuild from saved tensors, any input dtype."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from mixbits.quant.affine import QParams, fake_quantize, minmax_qparams
from mixbits.quant.cost import layer_storage_bytes
from mixbits.quant.qlinear import QuantLinear
from mixbits.quant.spec import KEEP, QUANT_BITS, VALID_GROUP_SIZES, QuantSpec

SPECS = [QuantSpec(b, g, s) for b in QUANT_BITS for g in VALID_GROUP_SIZES for s in (False, True)]


def layer_data(out_features=6, in_features=200, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(out_features, in_features, generator=gen) * 0.1, torch.randn(out_features, generator=gen)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.label)
def test_dequantized_weight_is_fake_quantize_exactly(spec):
    w, b = layer_data(seed=spec.bits)
    layer = QuantLinear.from_weight(w, b, spec)
    assert torch.equal(layer.dequantized_weight(), fake_quantize(w, spec))
    assert torch.equal(layer.dequantized_weight(torch.float16), fake_quantize(w, spec).half())
    assert layer.storage_bytes() == layer_storage_bytes(6, 200, spec)
    assert layer.scales.dtype == layer.bias.dtype == torch.float16


@pytest.mark.parametrize("spec", (QuantSpec(3, 64), QuantSpec(4, None, True), QuantSpec(5, 32)), ids=lambda s: s.label)
def test_forward_equals_linear_with_fake_quantized_weight(spec):
    w, b = layer_data(seed=1)
    layer = QuantLinear.from_weight(w, b, spec)
    x = torch.randn(2, 3, 200, generator=torch.Generator().manual_seed(2))
    expected = F.linear(x, fake_quantize(w, spec), b.half().float())
    assert torch.equal(layer(x), expected)
    assert torch.equal(layer(x), expected)  # second call, from the cached weight


def test_given_qparams_are_used_exactly():
    spec = QuantSpec(4, 64)
    w, b = layer_data(seed=3)
    qp = minmax_qparams(w, spec)
    qp = QParams((qp.scale * 0.8).half().float(), torch.clamp(qp.zero + 1, 0, spec.maxq))
    layer = QuantLinear.from_weight(w, None, spec, qp)
    assert torch.equal(layer.dequantized_weight(), fake_quantize(w, spec, qp))
    assert torch.equal(layer.qparams().scale, qp.scale) and torch.equal(layer.qparams().zero, qp.zero)


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_low_precision_inputs(dtype):
    spec = QuantSpec(3, 128)
    w, b = layer_data(seed=4)
    layer = QuantLinear.from_weight(w.to(dtype), b.to(dtype), spec)
    x = torch.randn(4, 200, generator=torch.Generator().manual_seed(5)).to(dtype)
    y = layer(x)
    assert y.dtype == dtype
    expected = F.linear(x, fake_quantize(w.to(dtype), spec), b.to(dtype).half().to(dtype))
    assert torch.equal(y, expected)
    # In float32 the same stored layer computes the unrounded dequantized weight.
    exact = fake_quantize(w.to(dtype).float(), spec)
    assert torch.equal(layer(x.float()), F.linear(x.float(), exact, layer.bias.float()))


@pytest.mark.parametrize("spec", (QuantSpec(3, 64), QuantSpec(6, 32, True), QuantSpec(2, None)), ids=lambda s: s.label)
@pytest.mark.parametrize("with_bias", (True, False))
def test_rebuild_from_saved_tensors(spec, with_bias, tmp_path):
    w, b = layer_data(out_features=7, in_features=333, seed=6)
    layer = QuantLinear.from_weight(w, b if with_bias else None, spec)
    x = torch.randn(3, 333, generator=torch.Generator().manual_seed(7))
    state = layer.state_dict()
    assert set(state) == {"qweight", "scales", "qzeros"} | ({"bias"} if with_bias else set())
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "layer.safetensors"))
    for tensors in (state, load_file(str(tmp_path / "layer.safetensors"))):
        rebuilt = QuantLinear.from_state(tensors, spec, in_features=333, out_features=7)
        assert torch.equal(rebuilt(x), layer(x))
        assert torch.equal(rebuilt.dequantized_weight(), layer.dequantized_weight())


def test_symmetric_state_may_omit_qzeros():
    spec = QuantSpec(4, 64, symmetric=True)
    w, _ = layer_data(seed=8)
    layer = QuantLinear.from_weight(w, None, spec)
    rebuilt = QuantLinear.from_state({"qweight": layer.qweight, "scales": layer.scales}, spec, 200, 6)
    assert torch.equal(rebuilt.dequantized_weight(), layer.dequantized_weight())


def test_cast_keeps_fp16_storage_and_load_state_dict_refreshes_cache():
    spec = QuantSpec(3, 64)
    w, b = layer_data(seed=9)
    layer = QuantLinear.from_weight(w, b, spec)
    x = torch.randn(2, 200, generator=torch.Generator().manual_seed(10))
    before = layer(x)
    layer.to(torch.bfloat16)
    assert layer.scales.dtype == layer.bias.dtype == torch.float16 and layer.qweight.dtype == torch.uint8
    assert torch.equal(layer(x), before)
    other = QuantLinear.from_weight(w * 2, b, spec)
    layer.load_state_dict(other.state_dict())
    assert torch.equal(layer(x), other(x))


def test_inference_mode_weight_is_not_reused_for_autograd():
    layer = QuantLinear.from_weight(*layer_data(seed=11), QuantSpec(4, 128))
    x = torch.randn(2, 200, requires_grad=True)
    with torch.inference_mode():
        layer(x.detach())
    layer(x).sum().backward()
    assert x.grad is not None


def test_rejects_what_storage_would_change():
    w, b = layer_data(seed=12)
    spec = QuantSpec(4, 64)
    qp = minmax_qparams(w, spec)
    with pytest.raises(ValueError, match="float16"):
        QuantLinear.from_weight(w, b, spec, QParams(qp.scale * (1 + 1e-6), qp.zero))
    with pytest.raises(ValueError, match=r"integers in \[0, 15\]"):
        QuantLinear.from_weight(w, b, spec, QParams(qp.scale, qp.zero + 0.5))
    sym = QuantSpec(4, 64, symmetric=True)
    with pytest.raises(ValueError, match="must all be 8"):
        QuantLinear.from_weight(w, b, sym, QParams(qp.scale, qp.zero))
    with pytest.raises(ValueError, match="keeps the layer in 16 bits"):
        QuantLinear.from_weight(w, b, KEEP)
    layer = QuantLinear.from_weight(w, b, spec)
    with pytest.raises(ValueError, match="needs 'qzeros'"):
        QuantLinear.from_state({"qweight": layer.qweight, "scales": layer.scales}, spec, 200, 6)
    with pytest.raises(ValueError, match=r"qweight has shape \(600,\)"):
        QuantLinear.from_state(layer.state_dict(), QuantSpec(3, 64), 200, 6)
    with pytest.raises(ValueError, match="unknown keys"):
        QuantLinear.from_state({**layer.state_dict(), "weight": w}, spec, 200, 6)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("spec", (QuantSpec(3, 64), QuantSpec(5, None, True), QuantSpec(8, 32)), ids=lambda s: s.label)
def test_cuda_matches_cpu_bit_for_bit(spec):
    w, b = layer_data(out_features=9, in_features=333, seed=13)
    cpu = QuantLinear.from_weight(w, b, spec)
    gpu = QuantLinear.from_weight(w.cuda(), b.cuda(), spec)
    assert gpu.qweight.is_cuda and gpu.scales.is_cuda
    for key, value in cpu.state_dict().items():
        assert torch.equal(gpu.state_dict()[key].cpu(), value), key
    assert torch.equal(gpu.dequantized_weight().cpu(), cpu.dequantized_weight())
    moved = cpu.to("cuda")
    x = torch.randn(4, 333, device="cuda", dtype=torch.float16)
    assert torch.equal(moved(x), gpu(x))
