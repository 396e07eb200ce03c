"""GPTQ: quantize a linear layer column by column, pushing each column's error onto the rest.

For a weight W [out, in] and calibration inputs X [tokens, in], GPTQ (Frantar et al., 2022,
"GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers") minimises
the output error ||X W^T - X Q^T||^2 = tr((W - Q) H (W - Q)^T) with H = X^T X. It quantizes
the columns in order; after column i is rounded to q_i the optimal (OBS) update of the columns
not yet quantized is

    err = (w_i - q_i) / U_ii,        W[:, i+1:] -= err (outer) U[i, i+1:],

where U is the upper Cholesky factor of H^-1 (H^-1 = U^T U): row i of U holds the inverse
Hessian of the remaining columns, already reduced by the eliminated ones. The update touches
only the remaining columns, so it can be deferred: columns are processed in blocks of
`block_size` with the rank-1 updates applied inside the block and the block's accumulated
errors applied to all later columns in one matrix product ("lazy batch"). That is the same
sum in another order, so it matches the column-by-column form up to float rounding.

Details, following the reference implementation:
  * dead inputs (H_ii = 0, never active) get H_ii = 1 and W[:, i] = 0;
  * dampening H += lambda I with lambda = damp * mean(diag H), raised 10x on Cholesky failure;
  * act-order: columns processed by descending H_ii, so the most active inputs are rounded
    first, while many columns are still free to absorb their error;
  * group parameters (min-max, or the clip search of `quant.clip` weighted by diag H when
    `clip`) are computed when a group's first column is reached, from the weights as updated by
    every column quantized so far. Unlike the reference, which reads weights that miss the
    pending in-block updates when group_size < block_size, the pending part is added here, so
    the result does not depend on block_size;
  * with act-order, groups are runs of consecutive *processed* columns (GPTQ's default), so an
    input column j belongs to group g_idx[j] = position of j in the order // group_size; with
    `static_groups` the parameters are computed up front on the original order instead.

Same inputs, same codes at any thread count (CPU). MKL's Cholesky factorisation and inverse
give results that differ in the last bits with the number of threads (U by ~2e-6 at 576
inputs), and GPTQ turns such noise into other rounding decisions: with 1 and 2 threads, 27 of
the first 28 SmolLM2-135M layers got different scales, and a demo plan's perplexity moved by
1 % (27.415 at 1 thread, 27.693 at 2). The column loop, the lazy-batch products and the clip
search were measured bit-identical across thread counts; XᵀX is too, once accumulated in
slices of `GRAM_ROWS` tokens (the block forwards that feed it need `mixbits.reproducible`). So `inverse_cholesky` runs single-threaded on CPU
(`inverse_cholesky`); then all 14 layers of two SmolLM2 blocks (GPTQ + clip) came out bit-identical
at 1 and 2 threads. Cost, one thread on this project's 2-core CPU: 7 ms at 576 inputs (~6 % of
that layer's GPTQ), 0.13-0.25 s at 1536, 1.7 s at 4096, ~30 s at 11008 by n^3 scaling; a
many-core CPU loses the parallel speed-up of that step only; GPU runs are unchanged.

Trade-off: O(in^3) for the inverse plus O(out * in^2) for the updates, and a Python loop over
columns; far better output error than round-to-nearest at 2-4 bits, but it fits the
calibration inputs (bias toward their distribution). H may be a sum or a mean over tokens:
scaling H changes neither the updates nor (damp being relative) the dampening.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor

from mixbits.quant.affine import QParams, dequantize, fake_quantize, minmax_qparams
from mixbits.quant.clip import search_qparams
from mixbits.quant.gram import output_error
from mixbits.quant.groups import effective_group_size, expand_groups
from mixbits.quant.spec import QuantSpec
from mixbits.quant.workers import one_intraop_thread

__all__ = ["GPTQConfig", "GPTQFactor", "GPTQResult", "gptq_factor", "gptq_quantize", "gptq_sweep", "inverse_cholesky"]

logger = logging.getLogger(__name__)

_DAMP_RETRIES = 4  # damp, 10 damp, ..., 10**4 damp


@dataclass(frozen=True)
class GPTQConfig:
    """damp: fraction of mean(diag H) added to the diagonal. block_size: columns per lazy batch.
    act_order: process columns by descending diag H. clip: clip-search group parameters.
    static_groups: compute all group parameters before any update, on the original order."""

    damp: float = 0.01
    block_size: int = 128
    act_order: bool = False
    clip: bool = False
    static_groups: bool = False

    def __post_init__(self) -> None:
        if not self.damp >= 0.0:
            raise ValueError(f"damp={self.damp!r} must be >= 0 (a fraction of mean(diag H), typically 0.01)")
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"block_size={self.block_size!r} must be a positive integer (typically 128)")


@dataclass(frozen=True, eq=False)
class GPTQResult:
    """weight: float32 [out, in], the dequantized result. qparams: [out, G]. codes: uint8 [out, in].
    perm: int64 [in] processing order (act-order) or None. g_idx: int32 [in], group of each
    original input column. error / rtn_error: tr((W - Q) H (W - Q)^T) for GPTQ / min-max RTN."""

    weight: Tensor
    qparams: QParams
    codes: Tensor
    perm: Tensor | None
    g_idx: Tensor
    error: float
    rtn_error: float


def _check_inputs(w: Tensor, H: Tensor, spec: QuantSpec) -> None:
    if spec.keep:
        raise ValueError(f"spec {spec.label!r} keeps the layer in 16 bits; there is nothing to quantize")
    if w.dim() != 2 or w.numel() == 0 or not w.is_floating_point():
        raise ValueError(f"expected a non-empty floating-point 2-D weight [out, in], got {tuple(w.shape)} {w.dtype}")
    n = w.shape[1]
    if tuple(H.shape) != (n, n):
        raise ValueError(f"H has shape {tuple(H.shape)}; a weight with in_features={n} needs H [{n}, {n}] = X^T X")
    if not bool(torch.isfinite(H).all()):
        raise ValueError("H holds inf or nan; check the calibration inputs")


def inverse_cholesky(H: Tensor, damp: float) -> Tensor:
    """Upper U with U^T U = (H + lambda I)^-1, lambda = damp * mean(diag H), raised 10x on failure.

    Single-threaded on CPU (`quant.workers.one_intraop_thread`): MKL's LAPACK (potrf, potri) splits
    its work by thread count and the rounding follows the split, so one thread makes U, and every code
    GPTQ derives from it, a function of H alone, the same at any thread count."""
    with one_intraop_thread() if H.device.type == "cpu" else nullcontext():
        return _inverse_cholesky_once(H, damp)


def _inverse_cholesky_once(H: Tensor, damp: float) -> Tensor:
    mean_diag = torch.diagonal(H).mean()
    eye = torch.eye(H.shape[0], device=H.device, dtype=H.dtype)
    for attempt in range(_DAMP_RETRIES + 1):
        frac = damp * 10**attempt if damp > 0 else (0.0 if attempt == 0 else 0.01 * 10 ** (attempt - 1))
        L, info = torch.linalg.cholesky_ex(H + frac * mean_diag * eye)
        if int(info) == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if int(info) == 0 and bool(torch.isfinite(U).all()):
                if attempt:
                    logger.warning("GPTQ: H was not positive definite at damp=%g; used damp=%g", damp, frac)
                return U
        logger.info("GPTQ: Cholesky failed at damp=%g, retrying with more dampening", frac)
    raise ValueError(
        f"H + damp * mean(diag H) * I is not positive definite even at damp={frac:g}; H must be X^T X of finite "
        "inputs; raise GPTQConfig.damp or collect more calibration tokens"
    )


def _group_params(wg: Tensor, parts: tuple[tuple[QuantSpec, int], ...], importance: Tensor,
                  clip: bool) -> tuple[Tensor, Tensor]:
    """Scale and zero [rows] of one group's current weights wg [rows, k] (a per-channel spec on wg),
    each run of rows (`parts`: (spec, count), in order) with its own spec."""
    if clip and len(parts) > 1 and not parts[0][0].symmetric:  # one clip search, each row on its own range
        maxq = torch.cat([wg.new_full((count, 1), float(spec.maxq)) for spec, count in parts])
        qp = search_qparams(wg, QuantSpec(parts[0][0].bits, None), importance=importance, rows_maxq=maxq)
        return qp.scale[:, 0], qp.zero[:, 0]
    scales, zeros, start = [], [], 0
    for spec, count in parts:
        one, rows = QuantSpec(spec.bits, None, spec.symmetric), wg[start:start + count]
        qp = search_qparams(rows, one, importance=importance) if clip else minmax_qparams(rows, one)
        scales.append(qp.scale[:, 0])
        zeros.append(qp.zero[:, 0])
        start += count
    return (scales[0], zeros[0]) if len(parts) == 1 else (torch.cat(scales), torch.cat(zeros))


def _current(W: Tensor, err: Tensor, U: Tensor, b1: int, b2: int, col: int, end: int) -> Tensor:
    """Columns col:end of W as the column-by-column form would hold them now: block columns are
    up to date, later ones still miss the deferred updates of block columns b1:col."""
    inside = W[:, col : min(end, b2)]
    if end <= b2:
        return inside
    pending = err[:, : col - b1] @ U[b1:col, b2:end]
    return torch.cat([inside, W[:, b2:end] - pending], dim=1)


def _solve(W: Tensor, U: Tensor, parts: tuple[tuple[QuantSpec, int], ...], cfg: GPTQConfig, imp: Tensor, S: Tensor,
           Z: Tensor):
    """The blocked GPTQ loop over the columns of W [rows, n] (processing order; updated in place).

    parts: (spec, count) of consecutive runs of rows, each quantized on its own spec (one group
    size and one symmetry for all). S, Z [rows, n]: per-column scale and zero, filled here at each group start
    unless static. Returns codes (W's dtype) [rows, n] and the per-group (scale, zero) in
    processing order.
    """
    out, n = W.shape
    gs = effective_group_size(n, parts[0][0].group_size)
    maxq = (parts[0][0].maxq if len(parts) == 1 else
            torch.cat([W.new_full((count,), float(spec.maxq)) for spec, count in parts]))
    codes = torch.empty_like(W)
    groups = []
    for b1 in range(0, n, cfg.block_size):
        b2 = min(b1 + cfg.block_size, n)
        W1 = W[:, b1:b2]  # a view: the in-block updates land in W
        err = W.new_zeros(out, b2 - b1)
        for i in range(b2 - b1):
            col = b1 + i
            if not cfg.static_groups and col % gs == 0:
                end = min(col + gs, n)
                s, z = _group_params(_current(W, err, U, b1, b2, col, end), parts, imp[col:end], cfg.clip)
                S[:, col:end], Z[:, col:end] = s.unsqueeze(1), z.unsqueeze(1)
                groups.append((s, z))
            w, s, z = W1[:, i], S[:, col], Z[:, col]
            c = torch.round(w / s) + z  # affine.quantize's arithmetic; clamp to [0, maxq] exactly as well
            c = torch.clamp(c, 0, maxq) if len(parts) == 1 else torch.clamp(c, min=0).minimum(maxq)
            codes[:, col] = c
            e = (w - (c - z) * s) / U[col, col]
            W1[:, i:] -= e.unsqueeze(1) * U[col, col:b2].unsqueeze(0)
            err[:, i] = e
        W[:, b2:] -= err @ U[b1:b2, b2:]
    return codes, groups


def _group_index(n: int, spec: QuantSpec, perm: Tensor | None, static: bool, device) -> Tensor:
    """g_idx [n] int32: the group of each original input column."""
    pos = torch.arange(n, device=device)
    if perm is None or static:
        return (pos // effective_group_size(n, spec.group_size)).to(torch.int32)
    g_idx = torch.empty(n, dtype=torch.int32, device=device)
    g_idx[perm] = (pos // effective_group_size(n, spec.group_size)).to(torch.int32)
    return g_idx


@dataclass(frozen=True, eq=False)
class GPTQFactor:
    """What GPTQ derives from H alone, shared by every weight and config quantized on that H.

    dead: bool [in], inputs never active (H_ii = 0). perm: int64 [in] processing order
    (act-order) or None. diag: [in] diag H (dead set to 1) in processing order, the clip
    importance. U: [in, in] upper Cholesky factor of (H + lambda I)^-1 in processing order. H:
    the original H [in, in], for the output errors. All in one dtype on one device. Neither the
    bit-width nor the group size enters, so one factor serves a whole candidate sweep; the
    in^3 factorisation then runs once per layer instead of once per config."""

    dead: Tensor
    perm: Tensor | None
    diag: Tensor
    U: Tensor
    H: Tensor


def gptq_factor(H: Tensor, cfg: GPTQConfig = GPTQConfig(), *, dtype: torch.dtype = torch.float32,
                device: torch.device | str | None = None) -> GPTQFactor:
    """The `GPTQFactor` of H [in, in] under cfg (damp, act_order), in `dtype` on `device` (H's by default)."""
    if H.dim() != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"H has shape {tuple(H.shape)}; expected a square [in, in] = X^T X")
    if not bool(torch.isfinite(H).all()):
        raise ValueError("H holds inf or nan; check the calibration inputs")
    H0 = H.detach().to(device=H.device if device is None else device, dtype=dtype)
    Hd = H0.clone()
    dead = torch.diagonal(Hd) == 0
    Hd[dead, dead] = 1.0
    diag = torch.diagonal(Hd).clone()
    perm = torch.argsort(diag, descending=True, stable=True) if cfg.act_order else None
    if perm is not None:
        Hd, diag = Hd[perm][:, perm], diag[perm]
    return GPTQFactor(dead=dead, perm=perm, diag=diag, U=inverse_cholesky(Hd, cfg.damp), H=H0)


def gptq_quantize(w: Tensor, H: Tensor, spec: QuantSpec, cfg: GPTQConfig = GPTQConfig(),
                  factor: GPTQFactor | None = None) -> GPTQResult:
    """GPTQ-quantize w [out, in] given H [in, in] = X^T X (see the module docstring).

    Computes on w's device in float32 (float64 when w is float64: slower, but the float
    rounding that can tip a rounding or fp16-scale decision is then negligible; used by the
    tests to compare orderings). Group parameters are always float32. w and H are not modified.
    factor: `gptq_factor(H, cfg)` computed beforehand (same dtype and device as the computation),
    to share the factorisation across configs; the result is the same bit for bit.

    Rows are independent given H: each row's codes, scales and error depend on that row and H
    only, so quantizing w[rows] gives exactly the rows `rows` of quantizing w (what
    `sensitivity.quantizer_damage` samples).
    """
    return gptq_sweep(w, H, (spec,), cfg, factor)[0]


def gptq_sweep(w: Tensor, H: Tensor, specs: Sequence[QuantSpec], cfg: GPTQConfig = GPTQConfig(),
               factor: GPTQFactor | None = None, errors: bool = True) -> list[GPTQResult]:
    """`gptq_quantize(w, H, spec, cfg)` for every spec, the same results bit for bit, at less cost.

    Rows are independent given H, so the specs of one group size (and symmetry) are run as one stacked weight
    [len(specs) * out, in] whose runs of rows each round to their own bit-width: the Python loop
    over columns runs once per group size, not once per spec, and H is factored once. Peak: about
    four float tensors of the stacked size (weight, codes, scales, zeros); stack few specs of a
    wide layer (`sensitivity.quantizer_damage` bounds the stacked rows). errors=False leaves
    error and rtn_error NaN (a caller that splits w's rows computes them per part)."""
    specs = tuple(specs)
    for spec in specs[1:]:
        if spec.keep:
            raise ValueError(f"spec {spec.label!r} keeps the layer in 16 bits; there is nothing to quantize")
    if specs:
        _check_inputs(w, H, specs[0])  # the weight and H once (H's finiteness is an in^2 pass)
    by_group: dict[tuple, list[int]] = {}
    for j, spec in enumerate(specs):
        by_group.setdefault((spec.group_size, spec.symmetric), []).append(j)
    if len(by_group) > 1:
        results: list = [None] * len(specs)
        for js in by_group.values():
            for j, res in zip(js, gptq_sweep(w, H, [specs[j] for j in js], cfg, factor, errors)):
                results[j] = res
        return results
    n, out = w.shape[1], w.shape[0]
    dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
    if factor is None:
        factor = gptq_factor(H, cfg, dtype=dtype, device=w.device)
    elif factor.U.dtype != dtype or factor.U.device != w.device or factor.U.shape[0] != n:
        raise ValueError(f"factor is {tuple(factor.U.shape)} {factor.U.dtype} on {factor.U.device}; this weight "
                         f"needs [{n}, {n}] {dtype} on {w.device} (gptq_factor(H, cfg, dtype=..., device=...))")
    W0 = w.detach().to(dtype).clone()
    W0[:, factor.dead] = 0.0
    perm, diag = factor.perm, factor.diag
    W = W0 if len(specs) == 1 else W0.repeat(len(specs), 1)

    static_qp = None
    S = torch.empty_like(W)
    Z = torch.empty_like(W)
    if cfg.static_groups:
        importance = diag if perm is None else diag[torch.argsort(perm)]
        static_qp = [search_qparams(W0, spec, importance=importance) if cfg.clip else minmax_qparams(W0, spec)
                     for spec in specs]
        S = torch.cat([expand_groups(qp.scale, n, spec.group_size) for qp, spec in zip(static_qp, specs)]).to(dtype)
        Z = torch.cat([expand_groups(qp.zero, n, spec.group_size) for qp, spec in zip(static_qp, specs)]).to(dtype)
    if perm is not None:
        W, S, Z = W[:, perm], S[:, perm], Z[:, perm]

    codes, groups = _solve(W, factor.U, tuple((spec, out) for spec in specs), cfg, diag, S, Z)
    if perm is not None:
        inv = torch.argsort(perm)
        codes, S, Z = codes[:, inv], S[:, inv], Z[:, inv]
    results = []
    for j, spec in enumerate(specs):
        rows = slice(j * out, (j + 1) * out)
        if static_qp is not None:
            qp = static_qp[j]
        else:
            qp = QParams(torch.stack([s[rows] for s, _ in groups], 1), torch.stack([z[rows] for _, z in groups], 1))
        c = codes[rows].to(torch.uint8)
        # Same arithmetic as affine.dequantize, with each column's own group (g_idx) parameters.
        weight = dequantize(c, qp, spec) if perm is None else ((c.to(dtype) - Z[rows]) * S[rows]).float()
        results.append(GPTQResult(
            weight=weight,
            qparams=qp,
            codes=c,
            perm=perm,
            g_idx=_group_index(n, spec, perm, cfg.static_groups, w.device),
            error=output_error(w, weight, factor.H) if errors else float("nan"),
            rtn_error=output_error(w, fake_quantize(w.detach().float(), spec), factor.H) if errors else float("nan"),
        ))
    return results

