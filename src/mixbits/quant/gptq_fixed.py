"""GPTQ's error feedback on a grid chosen beforehand: ggml's block types (K-quants, legacy, IQ4_NL).

`quant.kquant` chooses a weight's ggml grid (per-weight scale and min, or a non-uniform level set)
from the importance diag(H); `gptq_fixed_grid` then rounds the columns in order on that grid and
pushes each column's error onto the columns not yet rounded through the inverse Cholesky factor of
H, exactly as `quant.gptq.gptq_quantize` does with grids it chooses itself. Pure tensor code.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mixbits.quant.gptq import GPTQConfig, inverse_cholesky

__all__ = ["gptq_fixed_grid"]


def _solve_fixed(W: Tensor, U: Tensor, S: Tensor, M: Tensor, lo: int, hi: int, block_size: int,
                 levels: Tensor | None = None) -> Tensor:
    """`_solve` on a grid fixed beforehand: w_hat = S * q - M per weight, q in [lo, hi]; with
    `levels` (a non-uniform grid, ascending) w_hat = S * levels[q] - M, q the nearest level's index."""
    out, n = W.shape
    codes = torch.empty_like(W)
    safe = torch.where(S == 0, torch.ones_like(S), S)
    mid = None if levels is None else (levels[1:] + levels[:-1]) / 2
    for b1 in range(0, n, block_size):
        b2 = min(b1 + block_size, n)
        W1 = W[:, b1:b2]
        err = W.new_zeros(out, b2 - b1)
        for i in range(b2 - b1):
            col = b1 + i
            w, s, m = W1[:, i], S[:, col], M[:, col]
            if mid is None:
                c = torch.where(s == 0, 0.0, torch.clamp(torch.round((w + m) / safe[:, col]), lo, hi))
                value = c
            else:
                c = torch.where(s == 0, 0, torch.bucketize((w + m) / safe[:, col], mid)).to(W.dtype)
                value = levels[c.long()]
            codes[:, col] = c
            e = (w - (s * value - m)) / U[col, col]
            W1[:, i:] -= e.unsqueeze(1) * U[col, col:b2].unsqueeze(0)
            err[:, i] = e
        W[:, b2:] -= err @ U[b1:b2, b2:]
    return codes


def gptq_fixed_grid(
    w: Tensor, H: Tensor, scale: Tensor, mins: Tensor, lo: int, hi: int, cfg: GPTQConfig = GPTQConfig(),
    levels: tuple[int, ...] = (),
) -> Tensor:
    """GPTQ's error feedback on a per-weight grid chosen beforehand (ggml's K-quant blocks).

    Weight w_ij may take the values scale_ij * q - mins_ij, q an integer in [lo, hi] (with
    `levels`, a non-uniform grid such as IQ4_NL's: scale_ij * levels[q] - mins_ij); the grid
    (scale, mins: [out, in]) stays fixed while the columns are rounded in order (act-order
    when cfg.act_order) and each column's error is pushed onto the later ones, as in
    `gptq_quantize`. Returns the codes as float [out, in] in w's compute dtype."""
    if w.dim() != 2 or tuple(scale.shape) != tuple(w.shape) or tuple(mins.shape) != tuple(w.shape):
        raise ValueError(f"w {tuple(w.shape)}, scale {tuple(scale.shape)} and mins {tuple(mins.shape)} "
                         "must all be [out, in]")
    n = w.shape[1]
    if tuple(H.shape) != (n, n) or not bool(torch.isfinite(H).all()):
        raise ValueError(f"H must be a finite [{n}, {n}] = X^T X, got {tuple(H.shape)}")
    dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
    W = w.detach().to(dtype).clone()
    Hd = H.detach().to(device=w.device, dtype=dtype).clone()
    dead = torch.diagonal(Hd) == 0
    Hd[dead, dead] = 1.0
    W[:, dead] = 0.0
    S, M = scale.to(W), mins.to(W)
    perm = torch.argsort(torch.diagonal(Hd), descending=True, stable=True) if cfg.act_order else None
    if perm is not None:
        W, Hd, S, M = W[:, perm], Hd[perm][:, perm], S[:, perm], M[:, perm]
    grid = torch.tensor(levels, dtype=dtype, device=W.device) if levels else None
    codes = _solve_fixed(W, inverse_cholesky(Hd, cfg.damp), S, M, lo, hi, cfg.block_size, grid)
    return codes if perm is None else codes[:, torch.argsort(perm)]
