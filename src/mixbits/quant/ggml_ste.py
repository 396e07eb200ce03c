"""Trainable fake quantization on a ggml grid: what Block-AP learns for a layer planned as a ggml type.

A ggml type stores w_hat = (d * sc) * q - (dmin * mn) (`quant.kquant`; IQ4_NL: d * levels[q]). Block-AP
learns, besides the latent weight W [out, in], one float scale s and one float min m per sub-block
[out, in / sub_block] (the same quantities an affine group's step size and offset are, so the same
learning rate fits them), and every forward pass sees only grids the type can store:

    K-quants (sub-block scale codes)   s_hat = d * clamp(round(s / d), sc range)     d fixed, fp16
                                       m_hat = dmin * clamp(round(m / dmin), mn range)  dmin fixed
    one scale per block (Q4_0 .. Q8_0, IQ4_NL)   s_hat = s   (rounded to fp16 when finalized)
    an fp16 offset per block (Q4_1, Q5_1)        m_hat = m   (likewise)
    symmetric types                              m_hat = 0   (not learned)

    w_hat = s_hat * clamp(round((W + m_hat) / s_hat), qmin, qmax) - m_hat     (uniform codes)
    w_hat = s_hat * levels[nearest((W + m_hat) / s_hat)] - m_hat            (IQ4_NL)

where round, nearest and the rounding of s / d pass gradients straight through (STE; the level STE
is clamped to the grid's ends as the uniform clamp is), so W, s and m all learn. The super-block
scales d and dmin stay those of the start grid: a step on them would move every sub-block of the
block at once, and their values (~1e-4) are far below what the sub-block scales' learning rate
moves per step. A block whose d (or dmin) is 0 keeps its codes (its weights are all 0, or its
mins are). Sub-blocks whose s_hat is 0 give w_hat = -m_hat (code 0), as `kquant.quantize` does.

`finalize_grid` projects (s, m) onto the storable `GGMLParams` by the same rounding, so the state
training scores and the state that is stored differ only by the fp16 rounding of the one-scale
types' s and m (as affine training rounds its scales). `start_grid` is the inverse: the (s, m) of
a `GGMLParams`, which finalize back to exactly those params.

Pure tensor code in float32; gradients flow through `fake_quantize_ggml_ste` only.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mixbits.quant import iq4nl
from mixbits.quant.affine import round_ste
from mixbits.quant.kquant import GGMLParams

__all__ = ["fake_quantize_ggml_ste", "finalize_grid", "start_grid"]

_FP16_MAX = torch.finfo(torch.float16).max


def start_grid(params: GGMLParams) -> tuple[Tensor, Tensor]:
    """(s, m) float32 [out, in / sub_block]: the grid's per sub-block scale and min (`GGMLParams.grid`)."""
    return params.grid()


def _coded(x: Tensor, sup: Tensor, keep: Tensor, lo: int, hi: int, ste: bool) -> Tensor:
    """Codes clamp(round(x / sup), lo, hi) (STE when `ste`) per sub-block, sup [out, nb] per block;
    the start's codes `keep` where sup is 0 (the block's values are 0 whatever its codes)."""
    sup = sup.repeat_interleave(keep.shape[1] // sup.shape[1], dim=1)
    zero = sup == 0
    ratio = x / torch.where(zero, torch.ones_like(sup), sup)
    codes = torch.clamp(round_ste(ratio) if ste else torch.round(ratio), lo, hi)
    return torch.where(zero, keep.to(codes.dtype), codes)


def _projected(scale: Tensor, mins: Tensor, params: GGMLParams) -> tuple[Tensor, Tensor]:
    """(s_hat, m_hat) per sub-block [out, in / sub_block]: the storable grid nearest to (s, m), rounded with STE."""
    spec, subs = params.spec, params.spec.subs
    if spec.scale_bits:
        s_hat = params.d.repeat_interleave(subs, dim=1) * _coded(scale, params.d, params.sc, *spec.sc_range, ste=True)
    else:
        s_hat = scale
    if spec.symmetric:
        m_hat = torch.zeros_like(s_hat)
    elif spec.min_bits == 16:
        m_hat = mins
    else:
        mn = _coded(mins, params.dmin, params.mn, 0, (1 << spec.min_bits) - 1, ste=True)
        m_hat = params.dmin.repeat_interleave(subs, dim=1) * mn
    return s_hat, m_hat


def fake_quantize_ggml_ste(w: Tensor, scale: Tensor, mins: Tensor, params: GGMLParams) -> Tensor:
    """Differentiable w_hat [out, in] float32 of latent `w` with per sub-block `scale`, `mins` on the grid
    of `params`' type (its d, dmin fixed); see the module docstring."""
    spec = params.spec
    s_hat, m_hat = _projected(scale.float(), mins.float(), params)
    s = s_hat.repeat_interleave(spec.sub_block, dim=1)
    m = m_hat.repeat_interleave(spec.sub_block, dim=1)
    zero = s == 0
    t = (w.float() + m) / torch.where(zero, torch.ones_like(s), s)
    if spec.levels:
        levels = iq4nl.levels_tensor(spec.levels, t)
        lo, hi = spec.levels[0], spec.levels[-1]
        inside = torch.clamp(t, lo, hi)
        values = inside + (torch.take(levels, iq4nl.nearest_level(t.detach(), levels)) - inside).detach()
    else:
        values = torch.clamp(round_ste(t), spec.qmin, spec.qmax)
    return s * torch.where(zero, torch.zeros_like(values), values) - m


def _fp16(t: Tensor) -> Tensor:
    return t.clamp(-_FP16_MAX, _FP16_MAX).half().float()


def finalize_grid(scale: Tensor, mins: Tensor, params: GGMLParams) -> GGMLParams:
    """The storable `GGMLParams` nearest to (scale, mins) on the grid of `params` (its d, dmin kept for
    the K-quants); CPU or not, as the inputs are."""
    spec, scale, mins = params.spec, scale.detach().float(), mins.detach().float()
    d, dmin, sc, mn = params.d, params.dmin, params.sc, params.mn
    if spec.scale_bits:
        sc = _coded(scale, params.d, params.sc, *spec.sc_range, ste=False).to(torch.int32)
    else:
        d = _fp16(scale)
    if spec.min_bits == 16:
        dmin = _fp16(mins)
    elif not spec.symmetric:
        mn = _coded(mins, params.dmin, params.mn, 0, (1 << spec.min_bits) - 1, ste=False).to(torch.int32)
    return GGMLParams(spec, d.to(scale.device), dmin.to(scale.device), sc.to(scale.device), mn.to(scale.device))
