"""The ggml grid search as it was before it was vectorized over candidates (kept verbatim as the slow
reference): `choose_params` here must give bit for bit the grid that `mixbits.quant.kquant` gives
(tests/quant/test_kquant_reference.py; bench/kquant_speed.py times both)."""

from __future__ import annotations

import torch
from torch import Tensor

from mixbits.quant.kquant import GGMLParams
from mixbits.quant.spec import GGMLSpec

_STEPS = (-0.5, 0.0, 0.5)
_CLIPS = (0.0, 0.1, 0.2, 0.3, 0.4)
_ROUNDS = 2
_CHUNK = 1 << 21
_FP16_MAX = torch.finfo(torch.float16).max


def _fp16(t: Tensor) -> Tensor:
    """Nearest fp16 value (subnormals kept, as ggml stores them), as float32."""
    return t.clamp(-_FP16_MAX, _FP16_MAX).half().float()


def _nearest(x: Tensor, scale: Tensor, mins: Tensor, lo: int, hi: int) -> Tensor:
    """Codes q in [lo, hi] nearest to x on the grid scale * q - mins (0 where scale is 0)."""
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.clamp(torch.round((x + mins) / safe), lo, hi)
    return torch.where(scale == 0, torch.zeros_like(q), q)


def _wsum(a: Tensor, t: Tensor) -> Tensor:
    return (a * t).sum(-1, keepdim=True)


def _ls_scale(v: Tensor, a: Tensor, q: Tensor) -> Tensor:
    """Weighted least-squares s of v ~ s q over the last dim (0 where every code is 0)."""
    den = _wsum(a, q * q)
    return torch.where(den > 0, _wsum(a, v * q) / torch.where(den > 0, den, 1.0), torch.zeros_like(den))


def _fit_scale(v: Tensor, a: Tensor, lo: int, hi: int, fp16: bool) -> tuple[Tensor, Tensor]:
    """Scale s [..., 1] and codes in [lo, hi] minimising sum a (v - s q)^2 over the last dim.

    Candidates map the largest |v| to an end of the range, moved by half a code and shrunk by
    up to 40 % (clipping the largest values; both ends when lo < 0, so a negative scale can use
    the longer side); each is refined by alternating least-squares s and nearest codes."""
    vm = v.gather(-1, v.abs().argmax(-1, keepdim=True)) if lo < 0 else v.amax(-1, keepdim=True)
    inv = torch.where(vm == 0, torch.zeros_like(vm), 1.0 / torch.where(vm == 0, 1.0, vm))
    zero = torch.zeros_like(vm)
    best_s, best_e = zero, _wsum(a, v * v)
    for end in [(e + t) / (1 - f) for e in ((hi, lo) if lo < 0 else (hi,)) for t in _STEPS for f in _CLIPS]:
        q = torch.clamp(torch.round(v * (end * inv)), lo, hi)
        for _ in range(_ROUNDS):
            s = _ls_scale(v, a, q)
            s = _fp16(s) if fp16 else s
            q = _nearest(v, s, zero, lo, hi)
        e = _wsum(a, (v - s * q) ** 2)
        better = e < best_e
        best_s, best_e = torch.where(better, s, best_s), torch.where(better, e, best_e)
    return best_s, _nearest(v, best_s, zero, lo, hi)


def _ls_affine(x: Tensor, a: Tensor, q: Tensor, min_le_zero: bool) -> tuple[Tensor, Tensor]:
    """Weighted least squares x ~ s q + b for fixed codes q; b <= 0 when `min_le_zero` (then s refit)."""
    sw, sx, sq, sq2, sxq = _wsum(a, torch.ones_like(x)), _wsum(a, x), _wsum(a, q), _wsum(a, q * q), _wsum(a, x * q)
    det = sw * sq2 - sq * sq
    ok = det > 0
    det = torch.where(ok, det, torch.ones_like(det))
    s = torch.where(ok, (sw * sxq - sx * sq) / det, torch.zeros_like(det))
    b = torch.where(ok, (sq2 * sx - sq * sxq) / det, sx / sw)
    if min_le_zero:
        pos = b > 0
        s = torch.where(pos, sxq / torch.where(sq2 > 0, sq2, 1.0), s)
        b = torch.where(pos, torch.zeros_like(b), b)
    return s.clamp(min=0), b


def _fit_affine(x: Tensor, a: Tensor, nmax: int, min_le_zero: bool) -> tuple[Tensor, Tensor]:
    """Scale s >= 0 and offset b [..., 1] minimising sum a (x - s q - b)^2, q in [0, nmax].

    Candidates clip the range [min, max] at either end by up to 30 % (an outlier of little
    importance should not stretch the grid) and move its top by half a code; each is refined
    by alternating least-squares (s, b) and nearest codes."""
    lo = x.amin(-1, keepdim=True)
    lo = lo.clamp(max=0) if min_le_zero else lo
    span = x.amax(-1, keepdim=True) - lo
    inv = torch.where(span > 0, 1.0 / torch.where(span > 0, span, 1.0), torch.zeros_like(span))
    best_s, best_b = span / nmax, lo
    best_e = _wsum(a, (x - best_s * _nearest(x, best_s, -best_b, 0, nmax) - best_b) ** 2)
    for f_lo in _CLIPS[:4]:
        for f_hi in _CLIPS[:4]:
            for t in _STEPS:
                iscale = (nmax + t) * inv / (1 - f_lo - f_hi)
                q = torch.clamp(torch.round((x - lo - f_lo * span) * iscale), 0, nmax)
                for _ in range(_ROUNDS):
                    s, b = _ls_affine(x, a, q, min_le_zero)
                    q = _nearest(x, s, -b, 0, nmax)
                e = _wsum(a, (x - s * q - b) ** 2)
                better = e < best_e
                best_s, best_b, best_e = (torch.where(better, s, best_s), torch.where(better, b, best_b),
                                          torch.where(better, e, best_e))
    return best_s, best_b


def _super(v: Tensor, weight: Tensor, lo: int, hi: int) -> tuple[Tensor, Tensor]:
    """Sub-block values v [R, nb, subs] as fp16 d [R, nb] times integer codes [R, nb, subs]."""
    d, codes = _fit_scale(v, weight, lo, hi, fp16=True)
    return d[..., 0], codes.to(torch.int32)


def _first_grid(x: Tensor, a: Tensor, spec: GGMLSpec) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Steps 1-2 on x [R, nb, subs, k]: d, dmin [R, nb] and sc, mn [R, nb, subs]."""
    R, nb, subs, _ = x.shape
    ones = torch.ones(R, nb, subs, dtype=torch.int32, device=x.device)
    if spec.symmetric:
        s, q = _fit_scale(x, a, spec.qmin, spec.qmax, fp16=spec.scale_bits == 0)
        b = torch.zeros_like(s)
    else:
        s, b = _fit_affine(x, a, spec.qmax, min_le_zero=spec.min_bits < 16)
        q = _nearest(x, s, -b, 0, spec.qmax)
    s, b = s[..., 0], b[..., 0]
    if spec.scale_bits == 0:  # legacy: the block's own fp16 scale (and offset)
        dmin = -_fp16(b[..., 0]) if spec.min_bits == 16 else torch.zeros_like(s[..., 0])
        return _fp16(s[..., 0]), dmin, ones, ones if spec.min_bits == 16 else ones * 0
    lo, hi = spec.sc_range
    d, sc = _super(s, _wsum(a, q * q)[..., 0], lo, hi)
    if spec.symmetric:
        return d, torch.zeros_like(d), sc, ones * 0
    dmin, mn = _super(-b, a.expand_as(x).sum(-1), 0, (1 << spec.min_bits) - 1)
    return d, dmin, sc, mn


def _grid_of(d, dmin, sc, mn) -> tuple[Tensor, Tensor]:
    """Per sub-block scale and min [R, nb, subs, 1] as ggml computes them."""
    return (d[..., None] * sc.float())[..., None], (dmin[..., None] * mn.float())[..., None]


def _error(x: Tensor, a: Tensor, spec: GGMLSpec, grid) -> Tensor:
    """E per sub-block [R, nb, subs] of x on the grid (d, dmin, sc, mn) with nearest codes."""
    scale, mins = _grid_of(*grid)
    q = _nearest(x, scale, mins, spec.qmin, spec.qmax)
    return _wsum(a, (x - (scale * q - mins)) ** 2)[..., 0]


def _proposals(x: Tensor, a: Tensor, spec: GGMLSpec, d, dmin, sc, mn) -> list[tuple]:
    """Grids to try per sub-block: the codes of the least-squares (s, b) for the current codes, and
    each sub-block scale / min code one step up and down (legacy: the block's fp16 scale and offset)."""
    scale, mins = _grid_of(d, dmin, sc, mn)
    q = _nearest(x, scale, mins, spec.qmin, spec.qmax)
    if spec.symmetric:
        s, b = _ls_scale(x, a, q), torch.zeros_like(scale)
    else:
        s, b = _ls_affine(x, a, q, min_le_zero=spec.min_bits < 16)
    s, b = s[..., 0], b[..., 0]
    if spec.scale_bits == 0:
        dmin2 = -_fp16(b[..., 0]) if spec.min_bits == 16 else dmin
        return [(_fp16(s[..., 0]), dmin2, sc, mn)]
    lo, hi = spec.sc_range
    sc_ls = torch.clamp(torch.round(s / torch.where(d == 0, 1.0, d)[..., None]), lo, hi).to(torch.int32)
    out = [(d, dmin, sc_ls, mn)] + [(d, dmin, (sc + k).clamp(lo, hi), mn) for k in (-1, 1)]
    if not spec.symmetric:
        top = (1 << spec.min_bits) - 1
        mn_ls = torch.clamp(torch.round(-b / torch.where(dmin == 0, 1.0, dmin)[..., None]), 0, top).to(torch.int32)
        out += [(d, dmin, sc_ls, mn_ls)] + [(d, dmin, sc, (mn + k).clamp(0, top)) for k in (-1, 1)]
    return out


def _refit(x: Tensor, a: Tensor, spec: GGMLSpec, d, dmin, sc, mn):
    """Step 3: per sub-block, the proposal with the lowest E (kept as is where none is lower)."""
    best = _error(x, a, spec, (d, dmin, sc, mn))
    for d2, dmin2, sc2, mn2 in _proposals(x, a, spec, d, dmin, sc, mn):
        e = _error(x, a, spec, (d2, dmin2, sc2, mn2))
        better = e < best
        best = torch.where(better, e, best)
        if spec.scale_bits == 0:  # one sub-block per block: the block's own scale changes
            d, dmin = torch.where(better[..., 0], d2, d), torch.where(better[..., 0], dmin2, dmin)
        else:
            sc, mn = torch.where(better, sc2, sc), torch.where(better, mn2, mn)
    return d, dmin, sc, mn


def _choose_rows(w: Tensor, a: Tensor, spec: GGMLSpec) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    out, n = w.shape
    x = w.reshape(out, n // spec.block, spec.subs, spec.sub_block)
    d, dmin, sc, mn = _first_grid(x, a, spec)
    for _ in range(2):
        d, dmin, sc, mn = _refit(x, a, spec, d, dmin, sc, mn)
    return d, dmin, sc.reshape(out, -1), mn.reshape(out, -1)


def choose_params(w: Tensor, spec: GGMLSpec, importance: Tensor | None = None) -> GGMLParams:
    """The grid of `w` [out, in] on `spec` minimising the importance-weighted error (module docstring).

    importance: [in] non-negative, typically diag(X^T X); None weighs every weight alike. A
    tiny floor keeps sub-blocks of dead inputs well defined. Float32 on w's device."""
    out, n = w.shape
    x = w.detach().float()
    a = torch.ones(n, device=x.device) if importance is None else importance.detach().to(x.device, torch.float32)
    a = a + 1e-6 * a.mean() + 1e-30
    a = a.reshape(1, n // spec.block, spec.subs, spec.sub_block)
    rows = max(1, _CHUNK // n)
    parts = [_choose_rows(x[r : r + rows], a, spec) for r in range(0, out, rows)]
    d, dmin, sc, mn = (torch.cat(p, dim=0) for p in zip(*parts))
    return GGMLParams(spec, d, dmin, sc, mn)
