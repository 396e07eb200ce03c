"""Quantization on ggml's block grids (K-quants Q2_K..Q6_K, the legacy Q4_0..Q8_0, IQ4_NL/XS), weighted by importance.
The non-uniform grids (w = (d * sc) * levels[q]) are `quant.iq4nl`'s; everything below is the uniform grids.

A `GGMLSpec` cuts each row into blocks (256 or 32 weights) and sub-blocks (16 or 32); a weight is

    w_hat = (d * sc) * q - (dmin * mn)        d, dmin: fp16 per block; sc, mn: small integer codes per sub-block

computed in float32 in that order, as ggml's dequantizers do, so `dequantize` equals what
llama.cpp and the `gguf` package read back from the packed blocks (`export.ggml_blocks`), bit for bit.

Everything is chosen to minimise the importance-weighted squared error

    E = sum_i a_i (w_i - w_hat_i)^2,     a = diag(X^T X) of the layer's inputs (llama.cpp's imatrix), else 1,

in three steps, each over all sub-blocks at once:
1. per sub-block a float scale s (and offset b = -min): candidate grids that map the sub-block's
   range onto the codes, clipped at either end by up to 30-40 % (an outlier of little importance
   should not stretch the grid), each refined by alternating weighted least squares for (s, b)
   and nearest codes; the lowest E wins. Symmetric types try both ends of their lopsided range
   ([-4, 3] for Q3_K), i.e. both signs of the scale. On random 16-weight sub-blocks this is
   within 2 % of a dense brute-force search (tests/quant/test_kquant.py).
2. per block, the sub-block scales under one fp16 d: sc_j = round(s_j / d), d chosen the same way
   (candidates, least squares, then rounded to fp16) with weights sum_i a_i q_i^2, which is what
   an error in s_j costs; the mins likewise under dmin with weights sum_i a_i.
3. the codes, nearest on the final grid, then two refit rounds: per sub-block, the scale / min
   codes of the least-squares fit to these codes and the codes one step up and down, kept where
   E drops.
llama.cpp's quantizer (ggml-quants.c, make_qkx2_quants / make_qp_quants) follows the same
outline with heuristic weights (|w|, or imatrix * sqrt(sigma^2 + w^2)); here the weights are the
objective itself. `gptq_ggml` then runs GPTQ's error feedback on the grid of steps 1-3 (scales
fixed), which needs the full H rather than its diagonal.

Trade-off: 48 candidates x 2 rounds per sub-block in step 1 (30 for symmetric types) are the cost,
every pass kept exactly (bit for bit the per-candidate loop in tests/quant/kquant_reference.py);
candidates go on a leading axis a few at a time (`_GROUP` elements, cache-sized), rows in chunks of
`_CHUNK` weights (peak: a few MiB per thread), each chunk on one intra-op thread (`quant.workers`).
Measured speed and why: docs/gguf.md "Speed of the grid search" (bench/kquant_speed.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mixbits.quant import iq4nl
from mixbits.quant.gptq import GPTQConfig
from mixbits.quant.gptq_fixed import gptq_fixed_grid
from mixbits.quant.gram import output_error
from mixbits.quant.spec import GGMLSpec
from mixbits.quant.workers import map_pieces

__all__ = ["GGMLParams", "GGMLResult", "choose_params", "dequantize", "fake_quantize", "gptq_ggml", "quantize"]

_STEPS = (-0.5, 0.0, 0.5)  # moves of the range end, in codes
_CLIPS = (0.0, 0.1, 0.2, 0.3, 0.4)  # fractions of the range clipped
_ROUNDS = 2  # alternations of least squares and nearest codes per candidate
_CHUNK = 1 << 16  # weights per row chunk in `choose_params`
_GROUP = 1 << 17  # elements (candidates x weights) per group of candidates in step 1
_FP16_MAX = torch.finfo(torch.float16).max


@dataclass(frozen=True, eq=False)
class GGMLParams:
    """A weight's grid on a ggml type, everything but the codes.

    d, dmin: float32 [out, in / block], fp16 values (dmin zeros for symmetric types; for the
    legacy _1 types dmin is minus the block's fp16 offset m). sc, mn: int32 [out, in / sub_block]
    codes (sc ones when the type has no sub-block scales; mn ones for an fp16 offset, zeros
    when symmetric)."""

    spec: GGMLSpec
    d: Tensor
    dmin: Tensor
    sc: Tensor
    mn: Tensor

    def grid(self) -> tuple[Tensor, Tensor]:
        """Per sub-block scale d * sc and min dmin * mn, float32 [out, in / sub_block] (exact products)."""
        subs = self.spec.subs
        scale = self.d.repeat_interleave(subs, dim=1) * self.sc.float()
        mins = self.dmin.repeat_interleave(subs, dim=1) * self.mn.float()
        return scale, mins

    def columns(self) -> tuple[Tensor, Tensor]:
        """`grid` repeated per weight: float32 [out, in]."""
        scale, mins = self.grid()
        k = self.spec.sub_block
        return scale.repeat_interleave(k, dim=1), mins.repeat_interleave(k, dim=1)


@dataclass(frozen=True, eq=False)
class GGMLResult:
    """params; codes int32 [out, in] in [qmin, qmax]; weight float32 = dequantize(codes, params);
    error / rtn_error: tr((W - Q) H (W - Q)^T) of GPTQ and of the nearest codes on the same grid."""

    params: GGMLParams
    codes: Tensor
    weight: Tensor
    error: float
    rtn_error: float


def _check(w: Tensor, spec: GGMLSpec, importance: Tensor | None) -> None:
    if w.dim() != 2 or w.numel() == 0 or not w.is_floating_point():
        raise ValueError(f"expected a non-empty floating-point 2-D weight [out, in], got {tuple(w.shape)} {w.dtype}")
    if not spec.fits(w.shape[1]):
        raise ValueError(f"rows of {w.shape[1]} weights do not split into {spec.name} blocks of {spec.block}")
    if importance is not None and (tuple(importance.shape) != (w.shape[1],) or not bool((importance >= 0).all())):
        raise ValueError(f"importance must be [{w.shape[1]}] non-negative (diag of X^T X), "
                         f"got {tuple(importance.shape)}")


def _fp16(t: Tensor) -> Tensor:
    """Nearest fp16 value (subnormals kept, as ggml stores them), as float32."""
    return t.clamp(-_FP16_MAX, _FP16_MAX).half().float()


def _nearest(x: Tensor, scale: Tensor, mins: Tensor, lo: int, hi: int) -> Tensor:
    """Codes q in [lo, hi] nearest to x on the grid scale * q - mins (0 where scale is 0)."""
    zero = scale == 0
    safe = torch.where(zero, torch.ones_like(scale), scale)
    return ((x + mins) / safe).round_().clamp_(lo, hi).masked_fill_(zero, 0.0)


def _wsum(a: Tensor, t: Tensor) -> Tensor:
    return (a * t).sum(-1, keepdim=True)


def _wsum_(a: Tensor, t: Tensor) -> Tensor:
    """`_wsum` that overwrites t: the same products and the same sum (rows of k contiguous, as in
    `_wsum`, so torch adds them in the same order), without a new buffer."""
    return t.mul_(a).sum(-1, keepdim=True)


def _nearest_(out: Tensor, x: Tensor, scale: Tensor, mins: Tensor | None, lo: int, hi: int) -> Tensor:
    """`_nearest` written into `out` [C, ..., k], with scale / mins [C, ..., 1] of candidates and x [..., k]
    (mins None: x is already x + mins)."""
    zero = scale == 0
    any_zero = bool(zero.any())  # else skip the mask: the same codes
    safe = torch.where(zero, torch.ones_like(scale), scale) if any_zero else scale
    q = (torch.div(x, safe, out=out) if mins is None else torch.add(x, mins, out=out).div_(safe))
    q = q.round_().clamp_(lo, hi)
    return q.masked_fill_(zero, 0.0) if any_zero else q


def _ls_scale(v: Tensor, a: Tensor, q: Tensor) -> Tensor:
    """Weighted least-squares s of v ~ s q over the last dim (0 where every code is 0)."""
    den = _wsum(a, q * q)
    return torch.where(den > 0, _wsum(a, v * q) / torch.where(den > 0, den, 1.0), torch.zeros_like(den))


def _select(e0: Tensor, e: Tensor, *pairs: tuple[Tensor, Tensor]) -> list[Tensor]:
    """For each pair (v0, v) the value of the first candidate with the lowest E: v0 [...] with E e0,
    else v[c] of candidates c on dim 0 — what a loop `if e[c] < best: take c` keeps, NaN never
    taken (a NaN e0 keeps v0)."""
    inf = e.new_tensor(float("inf"))
    e = torch.where(torch.isnan(e) | torch.isnan(e0), inf, e)
    idx = torch.cat([torch.where(torch.isnan(e0), inf, e0)[None], e]).argmin(0, keepdim=True)
    return [torch.cat([v0[None], v]).take_along_dim(idx, 0)[0] for v0, v in pairs]


def _candidates(values: list[float], like: Tensor) -> Tensor:
    """float32 [C, 1, ..., 1] of python floats, as torch rounds a python scalar in `tensor * scalar`."""
    return torch.tensor(values, dtype=torch.float32, device=like.device).view(-1, *([1] * like.dim()))


def _groups(candidates: list, x: Tensor) -> list[list]:
    """The candidates in groups of about `_GROUP` / x.numel() each: a group's [C, ...] tensors stay in a
    CPU core's cache (several times faster per element than one pass over all candidates)."""
    size = max(1, _GROUP // x.numel())
    return [candidates[i : i + size] for i in range(0, len(candidates), size)]


def _fit_scale(v: Tensor, a: Tensor, lo: int, hi: int, fp16: bool) -> Tensor:
    """Scale s [..., 1] minimising sum a (v - s q)^2 over the last dim, q the nearest codes in [lo, hi].

    Candidates map the largest |v| to an end of the range, moved by half a code and shrunk by
    up to 40 % (clipping the largest values; both ends when lo < 0, so a negative scale can use
    the longer side); each is refined by alternating least-squares s and nearest codes. All
    candidates at once on a leading axis [C, ...] (the caller bounds C * v.numel())."""
    vm = v.gather(-1, v.abs().argmax(-1, keepdim=True)) if lo < 0 else v.amax(-1, keepdim=True)
    inv = torch.where(vm == 0, torch.zeros_like(vm), 1.0 / torch.where(vm == 0, 1.0, vm))
    zero = torch.zeros_like(vm)
    ends = [(e + t) / (1 - f) for e in ((hi, lo) if lo < 0 else (hi,)) for t in _STEPS for f in _CLIPS]
    v0 = v + zero  # _nearest's x + mins, the same for every candidate (it turns -0.0 into 0.0)
    es, ss = [], []
    groups = _groups(ends, v)
    q_buf, t_buf = torch.empty(2, len(groups[0]), *v.shape, device=v.device)
    for part in groups:
        q, t = q_buf[: len(part)], t_buf[: len(part)]  # t: the products a * q * q, a * v * q, a * (v - s q)^2
        torch.mul(v, _candidates(part, v) * inv, out=q).round_().clamp_(lo, hi)
        for _ in range(_ROUNDS):
            den = _wsum_(a, torch.mul(q, q, out=t))
            ok = den > 0
            s = torch.where(ok, _wsum_(a, torch.mul(v, q, out=t)) / torch.where(ok, den, 1.0), torch.zeros_like(den))
            s = _fp16(s) if fp16 else s
            q = _nearest_(q, v0, s, None, lo, hi)
        es.append(_wsum_(a, torch.sub(v, torch.mul(s, q, out=t), out=t).pow_(2)))
        ss.append(s)
    (best_s,) = _select(_wsum_(a, v * v), torch.cat(es), (zero, torch.cat(ss)))
    return best_s


def _ls_affine(x: Tensor, a: Tensor, q: Tensor, min_le_zero: bool, sw_sx: tuple[Tensor, Tensor] | None = None,
               out: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Weighted least squares x ~ s q + b for fixed codes q; b <= 0 when `min_le_zero` (then s refit).
    sw_sx: the code-free sums sum a, sum a x when already known (they are the same for every candidate);
    out: a work buffer shaped like q."""
    sw, sx = sw_sx or (_wsum(a, torch.ones_like(x)), _wsum(a, x))
    t = torch.empty_like(q) if out is None else out
    sq = torch.mul(q, a, out=t).sum(-1, keepdim=True)
    sq2, sxq = _wsum_(a, torch.mul(q, q, out=t)), _wsum_(a, torch.mul(x, q, out=t))
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
    by alternating least-squares (s, b) and nearest codes. All candidates at once on a leading
    axis [C, ...] (the caller bounds C * x.numel())."""
    lo = x.amin(-1, keepdim=True)
    lo = lo.clamp(max=0) if min_le_zero else lo
    span = x.amax(-1, keepdim=True) - lo
    inv = torch.where(span > 0, 1.0 / torch.where(span > 0, span, 1.0), torch.zeros_like(span))
    best_s, best_b = span / nmax, lo
    best_e = _wsum_(a, (x - best_s * _nearest(x, best_s, -best_b, 0, nmax) - best_b) ** 2)
    grid = [(f_lo, f_hi, t) for f_lo in _CLIPS[:4] for f_hi in _CLIPS[:4] for t in _STEPS]
    sw_sx, x_lo = (_wsum(a, torch.ones_like(x)), _wsum(a, x)), x - lo
    es, ss, bs = [], [], []
    groups = _groups(grid, x)
    q_buf, t_buf = torch.empty(2, len(groups[0]), *x.shape, device=x.device)
    for part in groups:
        q, t = q_buf[: len(part)], t_buf[: len(part)]
        top = _candidates([nmax + step for _, _, step in part], x)
        iscale = top * inv / _candidates([1 - f - g for f, g, _ in part], x)
        torch.sub(x_lo, _candidates([f for f, _, _ in part], x) * span, out=q).mul_(iscale).round_().clamp_(0, nmax)
        for _ in range(_ROUNDS):
            s, b = _ls_affine(x, a, q, min_le_zero, sw_sx, out=t)
            q = _nearest_(q, x, s, -b, 0, nmax)
        es.append(_wsum_(a, torch.sub(x, torch.mul(s, q, out=t), out=t).sub_(b).pow_(2)))
        ss.append(s)
        bs.append(b)
    return tuple(_select(best_e, torch.cat(es), (best_s, torch.cat(ss)), (best_b, torch.cat(bs))))


def _super(v: Tensor, weight: Tensor, lo: int, hi: int) -> tuple[Tensor, Tensor]:
    """Sub-block values v [R, nb, subs] as fp16 d [R, nb] times integer codes [R, nb, subs]."""
    d = _fit_scale(v, weight, lo, hi, fp16=True)
    return d[..., 0], _nearest(v, d, torch.zeros_like(d), lo, hi).to(torch.int32)


def _first_grid(x: Tensor, a: Tensor, spec: GGMLSpec) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Steps 1-2 on x [R, nb, subs, k]: d, dmin [R, nb] and sc, mn [R, nb, subs]."""
    R, nb, subs, _ = x.shape
    ones = torch.ones(R, nb, subs, dtype=torch.int32, device=x.device)
    if spec.symmetric:
        s = _fit_scale(x, a, spec.qmin, spec.qmax, fp16=spec.scale_bits == 0)
        b = torch.zeros_like(s)
    else:
        s, b = _fit_affine(x, a, spec.qmax, min_le_zero=spec.min_bits < 16)
    q = _nearest(x, s, torch.zeros_like(s) if spec.symmetric else -b, spec.qmin, spec.qmax)
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
    _check(w, spec, importance)
    out, n = w.shape
    x = w.detach().float()
    a = torch.ones(n, device=x.device) if importance is None else importance.detach().to(x.device, torch.float32)
    a = a + 1e-6 * a.mean() + 1e-30
    a = a.reshape(1, n // spec.block, spec.subs, spec.sub_block)
    if spec.levels:  # a non-uniform grid (IQ4_NL, IQ4_XS): chosen in quant.iq4nl, IQ4_XS's sc by step 2 here
        d, sc = iq4nl.choose_grid(x, importance, spec, _super)
        return GGMLParams(spec, d, torch.zeros_like(d), sc, sc * 0)
    rows = max(1, _CHUNK // n)  # chunks on one intra-op thread each, spread over the CPU's threads (quant.workers)
    parts = map_pieces(lambda r: _choose_rows(x[r : r + rows], a, spec), range(0, out, rows), x.device)
    d, dmin, sc, mn = (torch.cat(p, dim=0) for p in zip(*parts))
    return GGMLParams(spec, d, dmin, sc, mn)


def quantize(w: Tensor, params: GGMLParams) -> Tensor:
    """Codes int32 [out, in] in [qmin, qmax]: the nearest grid point to each weight."""
    _check(w, params.spec, None)
    scale, mins = params.columns()
    if params.spec.levels:
        return iq4nl.codes(w.detach().float(), scale, mins, params.spec.levels)
    return _nearest(w.detach().float(), scale, mins, params.spec.qmin, params.spec.qmax).to(torch.int32)


def dequantize(codes: Tensor, params: GGMLParams) -> Tensor:
    """float32 [out, in] = (d * sc) * q - (dmin * mn), ggml's arithmetic and order (a non-uniform
    type: d * levels[q])."""
    scale, mins = params.columns()
    if tuple(codes.shape) != tuple(scale.shape):
        raise ValueError(f"codes {tuple(codes.shape)} do not match the grid {tuple(scale.shape)}")
    values = iq4nl.levels_tensor(params.spec.levels, scale)[codes.long()] if params.spec.levels else codes.float()
    return scale * values - mins


def fake_quantize(w: Tensor, spec: GGMLSpec, importance: Tensor | None = None) -> Tensor:
    """dequantize(quantize(w)) on the chosen grid, in w's dtype."""
    params = choose_params(w, spec, importance)
    return dequantize(quantize(w, params), params).to(w.dtype)


def gptq_ggml(w: Tensor, H: Tensor, spec: GGMLSpec, cfg: GPTQConfig = GPTQConfig()) -> GGMLResult:
    """GPTQ on a ggml grid: the grid chosen with importance diag(H), then error feedback with it fixed."""
    params = choose_params(w, spec, importance=torch.diagonal(H).clamp(min=0))
    scale, mins = params.columns()
    codes = gptq_fixed_grid(w, H, scale, mins, spec.qmin, spec.qmax, cfg, spec.levels).to(torch.int32)
    weight = dequantize(codes, params)
    rtn = dequantize(quantize(w, params), params)
    return GGMLResult(params, codes, weight, output_error(w, weight, H), output_error(w, rtn, H))
