"""IQ4_NL: blocks of 32 weights on a fixed non-uniform 16-level grid under one fp16 scale.

A weight is w = d * LEVELS[q], q a 4-bit index, d the block's fp16 scale: llama.cpp's IQ4_NL
(`kvalues_iq4nl`, 18 bytes per 32 weights = 4.5 bits per weight, Q4_0's size). The levels are
denser near zero than a uniform grid, as trained weights are, so at Q4_0's size the error is
lower (on the embedded model's linears 0.75x Q4_0's squared error, `quant.kquant` grids for both;
docs/gguf.md "IQ4_NL").

The scale minimises the importance-weighted squared error E = sum_i a_i (w_i - d L_q_i)^2 of a
block (a = diag(X^T X), llama.cpp's imatrix, else 1). Candidates map the block's largest |w| to
either end of the grid (-127 or 113), moved by `STEPS` level units (every other unit up to 7 each
way: 16 candidates; every unit, 30, lowers the error by at most 1e-6 relative at 1.5x the time,
`bench/ggml_error.py --iq4nl-steps 1,2,3`); each is
refined by weighted least squares d = sum a w L / sum a L^2 on its nearest levels, rounded to
fp16, and its codes taken again; the lowest E wins (a zero scale when nothing beats an all-zero
block), then `POLISH` more rounds of least squares on the winner's own levels, each kept where E
drops (3 rounds: 0.937x the error with a real imatrix on the embedded model's down_proj, 0.997x
uniform, at 1.5x the time; `bench/ggml_error.py --iq4nl-polish 0,1,2,3,5`). llama.cpp's own search
(ggml-quants.c, quantize_row_iq4_nl_impl) tries 15 scales at one end with heuristic weights and one
least-squares step each; this one tries both ends and weighs by the objective itself.

IQ4_XS (llama.cpp's 4.25-bpw type: 136 bytes per 256 weights) puts the same levels under a signed
6-bit scale code per 32 weights and one fp16 d per 256: w = (d * sc) * LEVELS[q], sc in [-32, 31].
`choose_grid` finds it in three steps, as `quant.kquant` does for the K-quants:
1. each sub-block's own best scale s_j, by the search above;
2. s_j as d * sc_j: kquant's step 2 (passed in as `super_codes`, since kquant imports this module)
   weighted by w_j = sum_i a_i L_i^2 over the sub-block's levels, which is what an error in s_j
   costs (E grows by w_j * (ds_j)^2 for fixed levels);
3. two refit rounds per sub-block: the code of the least-squares scale for its levels, and one
   code up and down, kept where E drops (levels taken again each time).
llama.cpp (same function, super-block branch) maps the largest |s_j| to -32 and rounds the rest.

Pure tensor code, float32, on the weight's device. Peak: a few float32 copies of a chunk of
`_CHUNK` weights times the candidates.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from mixbits.quant.spec import IQ4_NL_LEVELS as LEVELS
from mixbits.quant.spec import GGMLSpec
from mixbits.quant.workers import map_pieces

__all__ = ["LEVELS", "STEPS", "choose_grid", "choose_scales", "codes", "levels_tensor", "nearest_level"]

STEPS = tuple(range(-7, 8, 2))  # moves of the end the largest weight maps to, in level units
POLISH = 3  # least-squares rounds on the winning candidate
_CHUNK = 1 << 12  # weights per chunk of rows (x 30 candidates: work buffers that stay in a core's cache)
_FP16_MAX = torch.finfo(torch.float16).max


def levels_tensor(levels: tuple[int, ...], like: Tensor) -> Tensor:
    return torch.tensor(levels, dtype=torch.float32, device=like.device)


def nearest_level(t: Tensor, levels: Tensor) -> Tensor:
    """Index (int64) of the level nearest to each value of t (in level units); a tie takes the lower.

    What `torch.bucketize(t, midpoints)` gives, by a table instead of a binary search (faster):
    integer levels at least 2 apart put at most one midpoint in [k, k + 1), so the index of
    floor(t) plus one comparison with the next midpoint is the answer."""
    lo, hi = int(levels[0]), int(levels[-1])
    mid = torch.cat([(levels[1:] + levels[:-1]) / 2, levels.new_tensor([float("inf")])])
    table = torch.bucketize(torch.arange(lo, hi + 1, dtype=levels.dtype, device=levels.device), mid[:-1])
    t = t.clamp(lo, hi)
    base = torch.take(table, (t.floor() - lo).long())
    return base + (t > torch.take(mid, base)).long()


def codes(w: Tensor, scale: Tensor, mins: Tensor, levels: tuple[int, ...]) -> Tensor:
    """int32 index of the level nearest to (w + mins) / scale per weight (0 where scale is 0); scale and
    mins [out, in] per weight, as `kquant.GGMLParams.columns` gives them."""
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    index = nearest_level((w + mins) / safe, levels_tensor(levels, scale))
    return torch.where(scale == 0, 0, index).to(torch.int32)


def _values(x: Tensor, d: Tensor, levels: Tensor) -> Tensor:
    """The level nearest to x / d for each weight (0 where d is 0), in level units."""
    zero = d == 0
    q = torch.take(levels, nearest_level(x / torch.where(zero, torch.ones_like(d), d), levels))
    return q.masked_fill_(zero.expand_as(q), 0.0)


def _error(x: Tensor, a: Tensor, d: Tensor, levels: Tensor) -> Tensor:
    return (a * (x - d * _values(x, d, levels)) ** 2).sum(-1, keepdim=True)


def _fp16(t: Tensor) -> Tensor:
    return t.clamp(-_FP16_MAX, _FP16_MAX).half().float()


def _least_squares(x: Tensor, a: Tensor, d: Tensor, levels: Tensor) -> Tensor:
    """fp16 d' = sum a x L / sum a L^2 over the levels L nearest to x / d (d where every L is 0)."""
    q = _values(x, d, levels)
    den = (a * q * q).sum(-1, keepdim=True)
    return _fp16(torch.where(den > 0, (a * x * q).sum(-1, keepdim=True) / torch.where(den > 0, den, 1.0), d))


def _scales_of(x: Tensor, a: Tensor, levels: Tensor, steps: tuple[int, ...]) -> Tensor:
    """Best fp16 scale [R, nb, 1] of blocks x [R, nb, k] with importance a [1, nb, k]."""
    mx = x.gather(-1, x.abs().argmax(-1, keepdim=True))  # the signed value of largest magnitude
    ends = [float(e) + s for e in (levels[0].item(), levels[-1].item()) for s in steps]
    cand = torch.tensor(ends, dtype=torch.float32, device=x.device).view(-1, 1, 1, 1)
    d = mx / cand  # [C, R, nb, 1]
    d = torch.where(mx == 0, torch.zeros_like(d), d)
    d = _least_squares(x, a, d, levels)
    e = _error(x, a, d, levels)  # [C, R, nb, 1]
    best = e.argmin(0, keepdim=True)
    d_best, e_best = d.take_along_dim(best, 0)[0], e.take_along_dim(best, 0)[0]
    for _ in range(POLISH):  # the winner's least squares on its own levels, levels taken again: kept where E drops
        d_ls = _least_squares(x, a, d_best, levels)
        e = _error(x, a, d_ls, levels)
        d_best, e_best = torch.where(e < e_best, d_ls, d_best), torch.minimum(e, e_best)
    zero = (a * x * x).sum(-1, keepdim=True)
    return torch.where(e_best < zero, d_best, torch.zeros_like(d_best))


def _floored(importance: Tensor | None, x: Tensor, block: int) -> Tensor:
    """Importance [1, in / block, block], floored so that blocks of dead inputs stay defined."""
    n = x.shape[1]
    a = torch.ones(n, device=x.device) if importance is None else importance.detach().to(x.device, torch.float32)
    return (a + 1e-6 * a.mean() + 1e-30).reshape(1, n // block, block)


def choose_scales(w: Tensor, importance: Tensor | None, levels: tuple[int, ...], block: int,
                  steps: tuple[int, ...] = STEPS) -> Tensor:
    """fp16 scales (as float32) [out, in / block] of w [out, in] on `levels`, minimising the
    importance-weighted error (module docstring). importance: [in] non-negative or None."""
    out, n = w.shape
    x = w.detach().float()
    a = _floored(importance, x, block)
    lv = levels_tensor(levels, x)
    rows = max(1, _CHUNK // n)
    parts = map_pieces(lambda r: _scales_of(x[r : r + rows].reshape(-1, n // block, block), a, lv, steps),  # quant.workers
                       range(0, out, rows), x.device)
    return torch.cat(parts, dim=0)[..., 0]


SuperCodes = Callable[[Tensor, Tensor, int, int], tuple[Tensor, Tensor]]
"""kquant's step 2: values v [R, nb, subs] and weights of their errors -> fp16 d [R, nb], int32 codes [R, nb, subs]
in [lo, hi] minimising sum weight * (v - d * code)^2."""


def _refit(x: Tensor, a: Tensor, levels: Tensor, d: Tensor, sc: Tensor, lo: int, hi: int) -> Tensor:
    """Step 3 once on x [R, nb, subs, k]: per sub-block the code of sc [R, nb, subs] (under d [R, nb]) with the
    lowest E among itself, its least-squares code for its current levels and one step up and down."""
    dd = d[..., None, None]

    def error(c: Tensor) -> Tensor:
        return _error(x, a, dd * c[..., None].float(), levels)[..., 0]

    q = _values(x, dd * sc[..., None].float(), levels)
    den = (a * q * q).sum(-1)
    s_ls = (a * x * q).sum(-1) / torch.where(den > 0, den, 1.0)
    c_ls = torch.round(s_ls / torch.where(d == 0, 1.0, d)[..., None]).clamp(lo, hi).to(torch.int32)
    best = error(sc)
    for c in (c_ls, (sc - 1).clamp(lo, hi), (sc + 1).clamp(lo, hi)):
        e = error(c)
        better = e < best
        best, sc = torch.where(better, e, best), torch.where(better, c, sc)
    return sc


def _grid_rows(x: Tensor, a: Tensor, levels: Tensor, spec: GGMLSpec, super_codes: SuperCodes,
               steps: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """Steps 1-3 (module docstring) on rows x [R, in], a [1, in / sub_block, sub_block]: d [R, nb], sc [R, nb * subs]."""
    R, n = x.shape
    nb, subs, k = n // spec.block, spec.subs, spec.sub_block
    xs = x.reshape(R, nb * subs, k)
    s = _scales_of(xs, a, levels, steps)  # [R, nb * subs, 1]
    cost = (a * _values(xs, s, levels) ** 2).sum(-1)
    d, sc = super_codes(s.reshape(R, nb, subs), cost.reshape(R, nb, subs), *spec.sc_range)
    xb, ab = xs.reshape(R, nb, subs, k), a.reshape(1, nb, subs, k)
    for _ in range(2):
        sc = _refit(xb, ab, levels, d, sc, *spec.sc_range)
    return d, sc.reshape(R, -1)


def choose_grid(w: Tensor, importance: Tensor | None, spec: GGMLSpec, super_codes: SuperCodes,
                steps: tuple[int, ...] = STEPS) -> tuple[Tensor, Tensor]:
    """A non-uniform type's grid of w [out, in]: fp16 d (as float32) [out, in / block] and int32 scale codes sc
    [out, in / sub_block] (ones when the type has none, IQ4_NL). IQ4_XS: steps 1-3 of the module docstring,
    `super_codes` kquant's step 2. importance: [in] non-negative or None."""
    if not spec.scale_bits:
        d = choose_scales(w, importance, spec.levels, spec.block, steps)
        return d, torch.ones(d.shape, dtype=torch.int32, device=d.device)
    out, n = w.shape
    x = w.detach().float()
    a, lv = _floored(importance, x, spec.sub_block), levels_tensor(spec.levels, x)
    rows = max(1, _CHUNK // n)
    parts = map_pieces(lambda r: _grid_rows(x[r : r + rows], a, lv, spec, super_codes, steps),  # quant.workers
                       range(0, out, rows), x.device)
    d, sc = (torch.cat(p, dim=0) for p in zip(*parts))
    return d, sc
