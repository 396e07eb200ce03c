"""Empirical Fisher diagonal and the damage it predicts.

Idea: near a trained optimum, the loss increase caused by a small weight change δ is, to
second order, ½ δᵀ H δ, and the empirical Fisher F = E[g gᵀ] (g the gradient of the loss on
one sample) approximates H. Keeping only the diagonal,

    damage(u, c) = ½ Σ_i F_ii · (w_i − q_c(w_i))²,     F_ii = (1/N) Σ_n g_{n,i}²,

with g_n the gradient of the mean next-token loss on calibration window n. One forward and
backward per window gives F for every layer at once; the damage of every config then costs
one fake-quantization of the weight, no further passes.

Trade-off: the diagonal ignores interactions inside and across layers, and the quadratic model
underestimates damage at 2 bits, where δ is no longer small. `--validate` (sensitivity issue)
measures how well it ranks layers against real damage.

Source: Kirkpatrick et al. 2017 (EWC) for the Fisher diagonal as importance; the seeds'
SG-MPQ project; Dong et al. 2019/2020 (HAWQ) for second-order damage.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from mixbits.model.arch import LinearInfo, get_weight
from mixbits.quant.spec import QuantSpec
from mixbits.sensitivity.capture import window_gradients
from mixbits.sensitivity.damage_rows import config_deltas, rows_of, unmeasured

log = logging.getLogger(__name__)


def empirical_fisher(
    model: nn.Module,
    windows: torch.Tensor,
    linears: Mapping[str, LinearInfo],
    *,
    device: torch.device,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Mean squared per-window gradient of the LM loss, per linear, as [out, in] float32 on `device`.

    `windows` is a LongTensor [n, seqlen]; each window is one sample.
    """
    fisher = {name: torch.zeros_like(get_weight(model.get_submodule(name)), dtype=torch.float32) for name in linears}
    # The very gradients `gradient.gradient_statistics` sums, in the same order: the Fisher of the
    # shared fisher + gradient pass is bit-identical to this one (one cache key serves both).
    for grads in window_gradients(model, windows, linears, device=device, progress=progress, desc="fisher"):
        for name, g in grads.items():
            fisher[name].add_(g.float().square())
    n = max(len(windows), 1)
    return {name: f.div_(n) for name, f in fisher.items()}


def fisher_damage(weight: torch.Tensor, fisher: torch.Tensor, configs: Sequence[QuantSpec], *,
                  damage_rows: int | None = None) -> np.ndarray:
    """½ Σ F·(w − q_c(w))² for every config c; weight and fisher are [out, in]. damage_rows: each ggml
    type's damage on that many strided rows, scaled to all rows (`damage_rows.py`; None / 0: every row)."""
    w = weight.detach().float()
    out = unmeasured(w.shape[1], configs)  # NaN: a ggml type this row length cannot take, masked by allocation
    for j, idx, delta, scale in config_deltas(w, configs, damage_rows):
        out[j] = scale * 0.5 * float((rows_of(fisher, idx) * delta.square()).sum())
    return out


def fisher_table(
    model: nn.Module,
    windows: torch.Tensor,
    linears: Mapping[str, LinearInfo],
    configs: Sequence[QuantSpec],
    *,
    device: torch.device,
    progress: bool = True,
    damage_rows: int | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Damage [U, C] and scalar scores for every linear, from one Fisher pass (ggml types on `damage_rows`
    rows per layer, scaled: `fisher_damage`)."""
    fisher = empirical_fisher(model, windows, linears, device=device, progress=progress)
    damage = np.zeros((len(linears), len(configs)))
    trace = np.zeros(len(linears))
    for u, name in enumerate(tqdm(linears, desc="damage table", disable=not progress, leave=False)):
        weight = get_weight(model.get_submodule(name))
        damage[u] = fisher_damage(weight, fisher[name], configs, damage_rows=damage_rows)
        trace[u] = float(fisher[name].sum())
        del fisher[name]
    return damage, {"fisher_trace": trace}
