"""Affine quantization against a plain loop-over-groups reference, plus STE gradients."""

from __future__ import annotations

import pytest
import torch

from mixbits.quant.affine import (
    QParams,
    dequantize,
    expand_groups,
    fake_quantize,
    fake_quantize_ste,
    minmax_qparams,
    quantize,
    round_ste,
)
from mixbits.quant.groups import group_view
from mixbits.quant.spec import KEEP, QUANT_BITS, VALID_GROUP_SIZES, QuantSpec

FP16_TINY = 2.0**-14
SHAPES = ((5, 200), (3, 300))  # neither 200 nor 300 is a multiple of 32, 64, 128 or 256


def naive_fake_quant(w: torch.Tensor, spec: QuantSpec):
    """One row, one group at a time, written out plainly (float32 scalars, GPTQ conventions)."""
    out_features, in_features = w.shape
    gs = in_features if spec.group_size is None else spec.group_size
    starts = list(range(0, in_features, gs))
    scale = torch.zeros(out_features, len(starts))
    zero = torch.zeros(out_features, len(starts))
    codes = torch.zeros(out_features, in_features, dtype=torch.uint8)
    deq = torch.zeros(out_features, in_features)
    for r in range(out_features):
        for g, start in enumerate(starts):
            seg = w[r, start : start + gs].float()
            lo = torch.clamp(seg.min(), max=0.0)
            hi = torch.clamp(seg.max(), min=0.0)
            if spec.symmetric:
                s = 2 * torch.maximum(-lo, hi) / spec.maxq
            else:
                s = (hi - lo) / spec.maxq
            s = torch.clamp(s, FP16_TINY, 65504.0).half().float()
            if spec.symmetric:
                z = torch.tensor(2.0 ** (spec.bits - 1))
            else:
                z = torch.clamp(torch.round(-lo / s), 0, spec.maxq)
            q = torch.clamp(torch.round(seg / s) + z, 0, spec.maxq)
            scale[r, g], zero[r, g] = s, z
            codes[r, start : start + gs] = q.to(torch.uint8)
            deq[r, start : start + gs] = (q - z) * s
    return scale, zero, codes, deq


def make_weight(shape, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen) * 0.05
    w[0, :17] = w[0, :17].abs() + 0.01  # a group (at gs=32) with no negative value
    w[-1, -5:] = 0.0  # the short last group partly zero
    return w


@pytest.mark.parametrize("symmetric", (False, True), ids=("asym", "sym"))
@pytest.mark.parametrize("group_size", VALID_GROUP_SIZES, ids=lambda g: f"g{g}")
@pytest.mark.parametrize("bits", QUANT_BITS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_matches_naive_reference(shape, bits, group_size, symmetric):
    spec = QuantSpec(bits, group_size, symmetric)
    w = make_weight(shape, seed=bits)
    scale, zero, codes, deq = naive_fake_quant(w, spec)
    qp = minmax_qparams(w, spec)
    assert qp.scale.dtype == qp.zero.dtype == torch.float32
    assert torch.equal(qp.scale, scale) and torch.equal(qp.zero, zero)
    got = quantize(w, qp, spec)
    assert got.dtype == torch.uint8 and int(got.max()) <= spec.maxq
    assert torch.equal(got, codes)
    assert torch.equal(dequantize(got, qp, spec), deq)
    assert torch.equal(fake_quantize(w, spec), deq)


@pytest.mark.parametrize("group_size", VALID_GROUP_SIZES, ids=lambda g: f"g{g}")
@pytest.mark.parametrize("bits", QUANT_BITS)
def test_error_within_half_step_inside_range(bits, group_size):
    spec = QuantSpec(bits, group_size)
    w = make_weight((5, 200), seed=10 + bits)
    qp = minmax_qparams(w, spec)
    s = expand_groups(qp.scale, 200, group_size)
    z = expand_groups(qp.zero, 200, group_size)
    inside = (w >= -z * s) & (w <= (spec.maxq - z) * s)
    assert inside.float().mean() > 0.9
    err = (fake_quantize(w, spec) - w).abs()
    bound = s / 2 * (1 + 1e-6) + 1e-12
    assert bool((err[inside] <= bound[inside]).all())


def test_scales_are_fp16_values_and_never_zero():
    w = make_weight((4, 256), seed=0)
    w[1] = 0.0  # degenerate rows: all zeros, and tiny values
    w[2] = 1e-9
    for spec in (QuantSpec(3, 64), QuantSpec(4, 32, symmetric=True), QuantSpec(2, None)):
        qp = minmax_qparams(w, spec)
        assert torch.equal(qp.scale, qp.scale.half().float())
        assert bool((qp.scale >= FP16_TINY).all()) and bool(torch.isfinite(qp.scale).all())
        fq = fake_quantize(w, spec)
        assert bool(torch.isfinite(fq).all())
        assert bool((fq[1] == 0).all())
        assert bool((fq[2].abs() <= FP16_TINY).all())


def test_short_last_group_uses_only_real_elements():
    w = torch.zeros(1, 70)
    w[0, 63] = -1.0  # first group of 64
    w[0, 64:] = torch.linspace(0.1, 0.6, 6)  # last, short group: range [0, 0.6]
    qp = minmax_qparams(w, QuantSpec(8, 64))
    assert qp.scale.shape == (1, 2)
    assert qp.scale[0, 1] == torch.tensor(0.6 / 255).half().float()
    assert group_view(w, 64).shape == (1, 2, 64)
    assert torch.equal(group_view(w, 64)[0, 1, 6:], torch.full((58,), w[0, -1].item()))


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16, torch.float32))
def test_low_precision_inputs_compute_in_float32(dtype):
    spec = QuantSpec(3, 64)
    w = make_weight((5, 200), seed=2).to(dtype)
    fq = fake_quantize(w, spec)
    assert fq.dtype == dtype and fq.shape == w.shape
    assert torch.equal(fq, fake_quantize(w.float(), spec).to(dtype))


def test_keep_returns_an_unchanged_copy():
    w = make_weight((3, 40), seed=3).half()
    out = fake_quantize(w, KEEP)
    assert torch.equal(out, w) and out.data_ptr() != w.data_ptr()


def test_expand_groups_broadcasts_per_column():
    t = torch.arange(6.0).view(2, 3)
    e = expand_groups(t, 70, 32)
    assert e.shape == (2, 70)
    assert torch.equal(e[:, 31], t[:, 0]) and torch.equal(e[:, 32], t[:, 1]) and torch.equal(e[:, 69], t[:, 2])
    assert torch.equal(expand_groups(t[:, :1], 70, None), t[:, :1].expand(2, 70))


def test_errors_name_the_bad_value():
    w = make_weight((5, 200), seed=4)
    with pytest.raises(ValueError, match=r"needs \[5, 4\]"):
        quantize(w, QParams(torch.ones(5, 3), torch.zeros(5, 3)), QuantSpec(4, 64))
    with pytest.raises(ValueError, match="fp16"):
        minmax_qparams(w, KEEP)
    with pytest.raises(ValueError, match=r"shape \(200,\)"):
        minmax_qparams(w[0], QuantSpec(4))
    with pytest.raises(ValueError, match=r"expected \[out, 4\]"):
        expand_groups(torch.ones(5, 2), 200, 64)
    with pytest.raises(ValueError, match="must both be"):
        QParams(torch.ones(5, 4), torch.ones(5, 3))


def test_round_ste_rounds_forward_and_passes_gradient():
    x = torch.tensor([-1.5, -0.4, 0.5, 1.49, 2.5, 3.7], requires_grad=True)
    y = round_ste(x)
    assert torch.equal(y, torch.round(x.detach()))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


@pytest.mark.parametrize("spec", (QuantSpec(3, 64), QuantSpec(4, None), QuantSpec(2, 32)), ids=lambda s: s.label)
def test_fake_quantize_ste_forward_and_gradients(spec):
    w0 = make_weight((5, 200), seed=5)
    qp = minmax_qparams(w0, spec)
    # A shrunken step clips some weights, which is what gives the zero-points a gradient.
    scale0 = (qp.scale * 0.7).half().float()
    w = w0.clone().requires_grad_(True)
    scale = scale0.clone().requires_grad_(True)
    zero = (qp.zero + 0.3).requires_grad_(True)
    out = fake_quantize_ste(w, scale, zero, spec)
    assert torch.equal(out.detach(), fake_quantize(w0, spec, QParams(scale0, qp.zero)))
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(0))).sum().backward()
    for grad in (w.grad, scale.grad, zero.grad):
        assert grad is not None and bool(torch.isfinite(grad).all()) and bool((grad != 0).any())


def test_fake_quantize_ste_keeps_input_dtype():
    spec = QuantSpec(4, 64)
    w = make_weight((5, 200), seed=6).bfloat16().requires_grad_(True)
    qp = minmax_qparams(w, spec)
    out = fake_quantize_ste(w, qp.scale.requires_grad_(True), qp.zero, spec)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out.detach(), fake_quantize(w.detach(), spec))
    out.float().sum().backward()
    assert w.grad is not None and w.grad.dtype == torch.bfloat16


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16))
def test_cuda_matches_cpu_bit_for_bit(dtype):
    w = (torch.randn(64, 1000, generator=torch.Generator().manual_seed(0)) * 0.05).to(dtype)
    for spec in (QuantSpec(b, g, s) for b in QUANT_BITS for g in VALID_GROUP_SIZES for s in (False, True)):
        qp, qp_gpu = minmax_qparams(w, spec), minmax_qparams(w.cuda(), spec)
        assert qp_gpu.scale.is_cuda and torch.equal(qp_gpu.scale.cpu(), qp.scale), spec.label
        assert torch.equal(qp_gpu.zero.cpu(), qp.zero), spec.label
        assert torch.equal(fake_quantize(w.cuda(), spec).cpu(), fake_quantize(w, spec)), spec.label
