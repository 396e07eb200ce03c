"""First-order damage from the loss gradient (AutoRound's auto-scheme score).

Idea: to first order the loss changes by gᵀδ when the weights move by δ = q_c(w) − w. Summing
magnitudes instead of signed terms gives a bound that cannot cancel across weights,

    damage(u, c) = Σ_i |ḡ_i · (w_i − q_c(w_i))|,          ḡ = (1/N) Σ_n g_n,

with g_n the gradient of the mean next-token loss on calibration window n, so ḡ is the gradient
of the mean calibration loss (the gradient accumulated over the windows, divided by N: the
damage is in units of that mean loss, like the Fisher damage). With ``absolute=True``
`gradient_statistics` returns (1/N) Σ_n |g_n| instead, which is AutoRound's own accumulation
(|g ⊙ δ| summed per backward pass, so signs never cancel across windows) up to the factor N.

The same per-window gradients give the empirical Fisher diagonal F = (1/N) Σ_n g_n², so
`gradient_statistics` computes both in one pass and `gradient_fisher_tables` returns both
tables from it (each δ once for both sums, `damage_rows.config_deltas`).

Trade-off: near a converged optimum ḡ is small and noisy, and a first-order term says nothing
about curvature; cheap (one forward + backward per window, as Fisher) and label-free apart
from the LM loss.

Source: Cheng et al. 2023 (SignRound / AutoRound), intel/auto-round `auto_scheme`
(score Σ|grad · (w − qdq(w))|); Molchanov et al. 2019 for first-order Taylor importance.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from functools import partial

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from mixbits.model.arch import LinearInfo, get_weight
from mixbits.quant.spec import QuantSpec
from mixbits.sensitivity.capture import window_gradients
from mixbits.sensitivity.damage_rows import config_deltas, rows_of, unmeasured

log = logging.getLogger(__name__)

Table = tuple[np.ndarray, dict[str, np.ndarray]]


def gradient_statistics(
    model: nn.Module,
    windows: torch.Tensor,
    linears: Mapping[str, LinearInfo],
    *,
    device: torch.device,
    progress: bool = True,
    absolute: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(mean gradient, empirical Fisher) per linear from one pass, both [out, in] float32 on `device`.

    Mean gradient (1/N) Σ_n g_n, or (1/N) Σ_n |g_n| when `absolute`; Fisher (1/N) Σ_n g_n²,
    equal to `fisher.empirical_fisher`. `windows` is a LongTensor [n, seqlen], one sample each.
    """
    if len(windows) == 0:
        raise ValueError("windows is empty; pass at least one calibration window [n >= 1, seqlen]")
    mean_grad: dict[str, torch.Tensor] = {}
    fisher: dict[str, torch.Tensor] = {}
    for grads in window_gradients(model, windows, linears, device=device, progress=progress, desc="gradient"):
        for name, g in grads.items():
            g = g.float()
            if name not in mean_grad:
                mean_grad[name] = torch.zeros_like(g)
                fisher[name] = torch.zeros_like(g)
            mean_grad[name].add_(g.abs() if absolute else g)
            fisher[name].add_(g.square())
    n = len(windows)
    for name in mean_grad:
        mean_grad[name].div_(n)
        fisher[name].div_(n)
    return mean_grad, fisher


def gradient_damage(weight: torch.Tensor, grad: torch.Tensor, configs: Sequence[QuantSpec], *,
                    damage_rows: int | None = None) -> np.ndarray:
    """Σ |g ⊙ (w − q_c(w))| for every config c; weight and grad are [out, in]. damage_rows: each ggml
    type's damage on that many strided rows, scaled to all rows (`damage_rows.py`; None / 0: every row)."""
    w = weight.detach().to(grad.device, torch.float32)
    g = grad.float()
    out = unmeasured(w.shape[1], configs)  # NaN: a ggml type this row length cannot take
    for j, idx, delta, scale in config_deltas(w, configs, damage_rows):
        out[j] = scale * float((rows_of(g, idx) * delta).abs().sum())
    return out


def _table(model: nn.Module, linears: Mapping[str, LinearInfo], configs: Sequence[QuantSpec],
           stats: Mapping[str, torch.Tensor], damage_fn, progress: bool) -> np.ndarray:
    missing = [n for n in linears if n not in stats]
    if missing:
        raise ValueError(f"statistics lack {len(missing)} linears, e.g. {missing[:3]}; compute them for every linear")
    damage = np.zeros((len(linears), len(configs)))
    for u, name in enumerate(tqdm(linears, desc="damage table", disable=not progress, leave=False)):
        damage[u] = damage_fn(get_weight(model.get_submodule(name)), stats[name], configs)
    return damage


def gradient_table(
    model: nn.Module,
    windows: torch.Tensor,
    linears: Mapping[str, LinearInfo],
    configs: Sequence[QuantSpec],
    *,
    device: torch.device,
    progress: bool = True,
    mean_grad: Mapping[str, torch.Tensor] | None = None,
    damage_rows: int | None = None,
) -> Table:
    """Damage [U, C] and scores["gradient_l1"] = Σ|ḡ| per unit.

    `mean_grad` (from `gradient_statistics`) skips the calibration pass; `windows` is then unused.
    """
    if mean_grad is None:
        mean_grad, _ = gradient_statistics(model, windows, linears, device=device, progress=progress)
    damage = _table(model, linears, configs, mean_grad, partial(gradient_damage, damage_rows=damage_rows), progress)
    l1 = np.array([float(mean_grad[n].abs().sum()) for n in linears])
    return damage, {"gradient_l1": l1}


def gradient_fisher_tables(
    model: nn.Module,
    windows: torch.Tensor,
    linears: Mapping[str, LinearInfo],
    configs: Sequence[QuantSpec],
    *,
    device: torch.device,
    progress: bool = True,
    absolute: bool = False,
    damage_rows: int | None = None,
) -> dict[str, Table]:
    """{"gradient": table, "fisher": table} from ONE calibration pass; each table as `fisher_table`.

    Each δ = q_c(w) − w is computed once and feeds both sums, so the two tables cost one
    fake-quantization per linear and config, like one table alone (ggml types on `damage_rows` rows
    per layer, scaled to all: `damage_rows.py`)."""
    mean_grad, fisher = gradient_statistics(model, windows, linears, device=device, progress=progress,
                                            absolute=absolute)
    grad_dmg, fisher_dmg = np.zeros((len(linears), len(configs))), np.zeros((len(linears), len(configs)))
    for u, name in enumerate(tqdm(linears, desc="damage tables", disable=not progress, leave=False)):
        w = get_weight(model.get_submodule(name)).detach().to(fisher[name].device, torch.float32)
        grad_dmg[u] = fisher_dmg[u] = unmeasured(w.shape[1], configs)  # NaN: a ggml type this row length cannot take
        for j, idx, delta, scale in config_deltas(w, configs, damage_rows):
            grad_dmg[u, j] = scale * float((rows_of(mean_grad[name], idx) * delta).abs().sum())
            fisher_dmg[u, j] = scale * 0.5 * float((rows_of(fisher[name], idx) * delta.square()).sum())
    l1 = np.array([float(mean_grad[n].abs().sum()) for n in linears])
    trace = np.array([float(fisher[n].sum()) for n in linears])
    return {"gradient": (grad_dmg, {"gradient_l1": l1}), "fisher": (fisher_dmg, {"fisher_trace": trace})}
