"""Clipping search: per group, the shrunken range whose fake-quantized weights err least.

Min-max parameters spend the whole code range on the group's extremes; one outlier stretches
the step s for every other weight. Clipping shrinks the range [lo, hi] = r * [min, max]
(r < 1), which saturates the few extreme weights but rounds the rest more finely. Per group
we pick the candidate that minimises the importance-weighted squared error

    E(lo, hi) = sum_j  a_j * (w_j - w_hat_j(lo, hi))^2,

where a_j is the importance of input column j: the diagonal of X^T X over calibration tokens
(llama.cpp's "imatrix"), so E approximates the output error ||X (w - w_hat)||^2 when the
columns of X are uncorrelated. With no importance a_j = 1 (plain weight MSE).

Candidates: every ratio r in linspace(1, 1 - max_shrink, grid) shrinks both ends together
(symmetric: xmax = r * max(|min|, |max|)). For an asymmetric spec, `refine=True` then adds two
sweeps of coordinate descent on the same grid: the lower end alone (upper end held at its best),
then the upper end alone, so lopsided groups can clip one tail only; it costs 3 * grid trials
instead of the grid^2 of a full 2-D search. For each candidate the scale and zero-point are
computed exactly as `affine.minmax_qparams` would for the clipped range (scale rounded to fp16
first, integer zero), so the winner is stored by `QuantLinear` unchanged. r = 1 is tried
first and replaced only on a strict improvement: the result is never worse than min-max on
E, and equals min-max when grid = 1.

Cost: each trial quantizes the whole weight once, vectorised over rows and groups, so the
search is about 3 * grid fake-quantizations. Source: llama.cpp's `make_qx_quants` scale
search and AWQ's `auto_clip` (Lin et al., 2023), here with GPTQ's integer zero-points.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mixbits.quant.affine import QParams, _fp16_scale, fake_quantize
from mixbits.quant.groups import effective_group_size, group_view, num_groups
from mixbits.quant.spec import QuantSpec

__all__ = ["clip_fake_quantize", "search_qparams"]


def _range_qparams(lo: Tensor, hi: Tensor, spec: QuantSpec, rows_maxq: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Scale and zero [out, G] for the ranges lo <= 0 <= hi, as `minmax_qparams` computes them."""
    if rows_maxq is not None:  # asymmetric, one code range per row: the same arithmetic, row by row
        scale = _fp16_scale((hi - lo) / rows_maxq.expand_as(hi))
        return scale, torch.clamp(torch.round(-lo / scale), min=0).minimum(rows_maxq)
    maxq = torch.full_like(hi, float(spec.maxq))  # a tensor divisor: same rounding on CPU and CUDA
    if spec.symmetric:
        scale = _fp16_scale(2.0 * torch.maximum(-lo, hi) / maxq)
        return scale, torch.full_like(scale, float(1 << (spec.bits - 1)))
    scale = _fp16_scale((hi - lo) / maxq)
    return scale, torch.clamp(torch.round(-lo / scale), 0, spec.maxq)


def _weighted_error(g: Tensor, imp: Tensor, scale: Tensor, zero: Tensor, maxq: int | Tensor) -> Tensor:
    """E per group [out, G] of groups g [out, G, gs] with importance imp [G, gs]; maxq an int or [out, 1]."""
    s, z = scale.unsqueeze(-1), zero.unsqueeze(-1)
    q = torch.round(g / s) + z  # the arithmetic of affine.quantize
    q = torch.clamp(q, 0, maxq) if isinstance(maxq, int) else torch.clamp(q, min=0).minimum(maxq.unsqueeze(-1))
    d = g - (q - z) * s
    return (d * d * imp).sum(dim=-1)


def _importance_view(importance: Tensor | None, in_features: int, group_size: int | None, device) -> Tensor:
    """Importance [G, gs] on `device`, 0 on the padding that `group_view` adds to a short group."""
    gs = effective_group_size(in_features, group_size)
    groups = num_groups(in_features, gs)
    if importance is None:
        imp = torch.ones(in_features, device=device)
    else:
        if importance.shape != (in_features,):
            raise ValueError(
                f"importance has shape {tuple(importance.shape)}; expected [{in_features}], one value per input column"
            )
        imp = importance.detach().to(device=device, dtype=torch.float32)
        if not bool(torch.isfinite(imp).all()) or bool((imp < 0).any()):
            raise ValueError("importance must be finite and >= 0 (e.g. the diagonal of X^T X)")
    padded = torch.zeros(groups * gs, device=device)
    padded[:in_features] = imp
    return padded.view(groups, gs)


def _ratios(grid: int, max_shrink: float) -> list[float]:
    if not isinstance(grid, int) or grid < 1:
        raise ValueError(f"grid={grid!r} must be a positive integer (1 means min-max only)")
    if not 0.0 <= max_shrink < 1.0:
        raise ValueError(f"max_shrink={max_shrink!r} must be in [0, 1): the smallest ratio 1 - max_shrink must be > 0")
    if grid == 1:
        return [1.0]
    return [1.0 - max_shrink * k / (grid - 1) for k in range(grid)]


def search_qparams(
    w: Tensor,
    spec: QuantSpec,
    *,
    importance: Tensor | None = None,
    grid: int = 20,
    max_shrink: float = 0.8,
    refine: bool = True,
    rows_maxq: Tensor | None = None,
) -> QParams:
    """Per-group clipped scale and zero of `w` [out, in] minimising E (see the module docstring).

    importance: [in] non-negative weights a_j (None: all 1). grid: number of shrink ratios in
    linspace(1, 1 - max_shrink, grid). refine: for asymmetric specs, also shrink each end alone
    (coordinate descent, 2 * grid more trials). Returns float32 QParams [out, G] on w's device.
    rows_maxq: float [out, 1], each row's largest code in place of spec.maxq (asymmetric specs),
    so rows bound for several bit-widths are searched in one pass, each as with its own spec.
    """
    if spec.keep:
        raise ValueError(f"spec {spec.label!r} keeps the layer in 16 bits; there is nothing to quantize")
    if w.dim() != 2 or w.numel() == 0 or not w.is_floating_point():
        raise ValueError(f"expected a non-empty floating-point 2-D weight [out, in], got {tuple(w.shape)} {w.dtype}")
    ratios = _ratios(grid, max_shrink)
    g = group_view(w.detach().float(), spec.group_size)
    imp = _importance_view(importance, w.shape[1], spec.group_size, w.device)
    wmin = g.amin(dim=-1).clamp(max=0.0)
    wmax = g.amax(dim=-1).clamp(min=0.0)

    if rows_maxq is not None and (spec.symmetric or tuple(rows_maxq.shape) != (w.shape[0], 1)):
        raise ValueError(f"rows_maxq must be [{w.shape[0]}, 1] and the spec asymmetric; got "
                         f"{tuple(rows_maxq.shape)} with {spec.label}")
    maxq = spec.maxq if rows_maxq is None else rows_maxq
    lo, hi = wmin, wmax
    scale, zero = _range_qparams(lo, hi, spec, rows_maxq)
    best = _weighted_error(g, imp, scale, zero, maxq)

    def trial(new_lo: Tensor, new_hi: Tensor) -> None:
        nonlocal lo, hi, scale, zero, best
        s, z = _range_qparams(new_lo, new_hi, spec, rows_maxq)
        err = _weighted_error(g, imp, s, z, maxq)
        better = err < best  # strict: ties keep the earlier (wider) candidate
        lo, hi = torch.where(better, new_lo, lo), torch.where(better, new_hi, hi)
        scale, zero = torch.where(better, s, scale), torch.where(better, z, zero)
        best = torch.where(better, err, best)

    for r in ratios[1:]:
        trial(wmin * r, wmax * r)
    if refine and not spec.symmetric and len(ratios) > 1:
        for r in ratios:
            trial(wmin * r, hi)
        for r in ratios:
            trial(lo, wmax * r)
    return QParams(scale=scale, zero=zero)


def clip_fake_quantize(
    w: Tensor,
    spec: QuantSpec,
    importance: Tensor | None = None,
    *,
    grid: int = 20,
    max_shrink: float = 0.8,
    refine: bool = True,
) -> Tensor:
    """fake_quantize(w) with clip-searched qparams; same shape and dtype as `w` (a copy when keep)."""
    if spec.keep:
        return w.clone()
    qp = search_qparams(w, spec, importance=importance, grid=grid, max_shrink=max_shrink, refine=refine)
    return fake_quantize(w, spec, qp)
