"""Uniform affine quantization of a weight [out, in], group-wise along the input dimension.

Each group of `group_size` consecutive input columns of a row shares a scale s and a
zero-point z (one integer code); with maxq = 2**bits - 1 a weight becomes the code

    q = clamp(round(w / s) + z, 0, maxq)          and is read back as   w_hat = (q - z) * s.

Min-max parameters follow GPTQ. Asymmetric: the group's range is widened to contain 0
(min <= 0 <= max, so a zero weight is exactly representable), s = (max - min) / maxq,
z = clamp(round(-min / s), 0, maxq). Symmetric: s = 2 * max(|min|, |max|) / maxq and the
fixed z = 2**(bits-1), so no zero-point needs storing, at the price of one unused half-step.

Scales are rounded to float16 *before* z is computed, because float16 is how they are stored
(`QuantLinear`): fake quantization and the packed layer then give bit-identical weights. The
scale is clamped to [smallest normal fp16, largest fp16] so it is never 0, subnormal or inf
in storage; an all-zero group therefore gets a tiny scale and dequantizes to exact zeros.
All arithmetic is float32 whatever the input dtype (fp32, fp16, bf16); round() is
round-half-to-even, as torch.round.

`fake_quantize_ste` is the differentiable form for quantization-aware training: round() passes
gradients straight through (STE), so gradients reach w, the scales (LSQ-style) and, through
clamped weights, the zero-points.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mixbits.quant.groups import expand_groups, group_view, num_groups
from mixbits.quant.spec import QuantSpec

__all__ = [
    "QParams",
    "dequantize",
    "expand_groups",
    "fake_quantize",
    "fake_quantize_ste",
    "group_view",
    "minmax_qparams",
    "num_groups",
    "quantize",
    "round_ste",
]

FP16_TINY = torch.finfo(torch.float16).tiny  # smallest positive normal, 2**-14
FP16_MAX = torch.finfo(torch.float16).max


@dataclass(frozen=True, eq=False)
class QParams:
    """Per-group parameters of one weight.

    scale: float32 [out, G], every value exactly representable in float16 (> 0).
    zero:  float32 [out, G], integer values in [0, maxq].
    """

    scale: Tensor
    zero: Tensor

    def __post_init__(self) -> None:
        if self.scale.dim() != 2 or self.scale.shape != self.zero.shape:
            raise ValueError(
                f"scale {tuple(self.scale.shape)} and zero {tuple(self.zero.shape)} must both be [out, G]"
            )


def _require_quantized(spec: QuantSpec) -> None:
    if spec.keep:
        raise ValueError(f"spec {spec.label!r} keeps the layer in 16 bits; there is nothing to quantize")


def _require_weight(w: Tensor) -> None:
    if w.dim() != 2 or w.numel() == 0:
        raise ValueError(f"expected a non-empty 2-D weight [out, in], got shape {tuple(w.shape)}")
    if not w.is_floating_point():
        raise ValueError(f"expected a floating-point weight, got dtype {w.dtype}")


def _check_qparams(qp: QParams, spec: QuantSpec, out_features: int, in_features: int) -> None:
    groups = num_groups(in_features, spec.group_size)
    if tuple(qp.scale.shape) != (out_features, groups):
        raise ValueError(
            f"qparams have shape {tuple(qp.scale.shape)}; spec {spec.label} on a [{out_features}, {in_features}] "
            f"weight needs [{out_features}, {groups}]"
        )


def _columns(qp: QParams, in_features: int, spec: QuantSpec, device: torch.device) -> tuple[Tensor, Tensor]:
    """Per-column float32 scale and zero [out, in] on `device`."""
    scale = qp.scale.to(device=device, dtype=torch.float32)
    zero = qp.zero.to(device=device, dtype=torch.float32)
    return expand_groups(scale, in_features, spec.group_size), expand_groups(zero, in_features, spec.group_size)


def _fp16_scale(scale: Tensor) -> Tensor:
    """Clamp into fp16's normal range and round to the nearest fp16 value, kept as float32."""
    return scale.clamp(FP16_TINY, FP16_MAX).half().float()


def minmax_qparams(w: Tensor, spec: QuantSpec) -> QParams:
    """GPTQ-style min-max scale and zero-point of each group of `w` [out, in] (any float dtype)."""
    _require_quantized(spec)
    _require_weight(w)
    g = group_view(w.detach().float(), spec.group_size)
    wmin = g.amin(dim=-1).clamp(max=0.0)
    wmax = g.amax(dim=-1).clamp(min=0.0)
    # Divide by a tensor, not a Python number: CUDA turns division by a scalar into a multiply
    # by its reciprocal, which rounds differently and would break CPU/CUDA bit-equality.
    maxq = torch.full_like(wmax, float(spec.maxq))
    if spec.symmetric:
        xmax = torch.maximum(-wmin, wmax)
        scale = _fp16_scale(2.0 * xmax / maxq)
        zero = torch.full_like(scale, float(1 << (spec.bits - 1)))
    else:
        scale = _fp16_scale((wmax - wmin) / maxq)
        zero = torch.clamp(torch.round(-wmin / scale), 0, spec.maxq)
    return QParams(scale=scale, zero=zero)


def quantize(w: Tensor, qp: QParams, spec: QuantSpec) -> Tensor:
    """Integer codes uint8 [out, in]: clamp(round(w / s) + z, 0, maxq)."""
    _require_quantized(spec)
    _require_weight(w)
    out_features, in_features = w.shape
    _check_qparams(qp, spec, out_features, in_features)
    scale, zero = _columns(qp, in_features, spec, w.device)
    q = torch.clamp(torch.round(w.detach().float() / scale) + zero, 0, spec.maxq)
    return q.to(torch.uint8)


def dequantize(codes: Tensor, qp: QParams, spec: QuantSpec, dtype: torch.dtype = torch.float32) -> Tensor:
    """Weights [out, in] from codes: (q - z) * s, computed in float32 and returned in `dtype`."""
    _require_quantized(spec)
    if codes.dim() != 2:
        raise ValueError(f"expected 2-D codes [out, in], got shape {tuple(codes.shape)}")
    out_features, in_features = codes.shape
    _check_qparams(qp, spec, out_features, in_features)
    scale, zero = _columns(qp, in_features, spec, codes.device)
    return ((codes.float() - zero) * scale).to(dtype)


def fake_quantize(w: Tensor, spec: QuantSpec, qp: QParams | None = None) -> Tensor:
    """dequantize(quantize(w)): same shape and dtype as `w`; a copy of `w` when `spec.keep`."""
    if spec.keep:
        return w.clone()
    if qp is None:
        qp = minmax_qparams(w, spec)
    _require_weight(w)
    _check_qparams(qp, spec, *w.shape)
    scale, zero = _columns(qp, w.shape[1], spec, w.device)
    # quantize's then dequantize's arithmetic without the uint8 round trip (codes are exact in float32)
    q = torch.clamp(torch.round(w.detach().float() / scale) + zero, 0, spec.maxq)
    return ((q - zero) * scale).to(w.dtype)


def round_ste(x: Tensor) -> Tensor:
    """round(x) in the forward pass, identity gradient in the backward pass (exact: r - x is exact)."""
    return x + (torch.round(x) - x).detach()


def fake_quantize_ste(w: Tensor, scale: Tensor, zero: Tensor, spec: QuantSpec) -> Tensor:
    """Differentiable fake quantization of `w` [out, in] with per-group `scale`, `zero` [out, G].

    Forward equals `fake_quantize(w, spec, QParams(scale, round(zero)))` for fp16-representable
    scales. Gradients: w and scale through round_ste; zero is rounded with STE and clamped to
    [0, maxq], so it gets gradient from weights that fall outside the clamp range. For a
    symmetric spec pass the fixed zero 2**(bits-1) (it is not stored, so should not be learned).
    Computed in float32, returned in w's dtype.
    """
    _require_quantized(spec)
    _require_weight(w)
    out_features, in_features = w.shape
    _check_qparams(QParams(scale, zero), spec, out_features, in_features)
    s = expand_groups(scale.float(), in_features, spec.group_size)
    z = expand_groups(torch.clamp(round_ste(zero.float()), 0, spec.maxq), in_features, spec.group_size)
    q = torch.clamp(round_ste(w.float() / s) + z, 0, spec.maxq)
    return ((q - z) * s).to(w.dtype)
