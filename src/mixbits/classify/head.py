"""A linear classification head on a frozen encoder's sentence embeddings: the math.

Sentence embedding, as sentence-transformers' all-MiniLM-L6-v2 makes it (its modules.json:
Transformer → mean Pooling → Normalize): the mean of the last hidden states over the real
(unmasked) tokens, scaled to unit length,

    e = Σ_t m_t h_t / Σ_t m_t,        ẽ = e / ‖e‖₂          h: [N, L, H], m: [N, L] in {0, 1}.

Head: multinomial logistic regression on the standardized embeddings z = (ẽ − μ) / σ (μ, σ of the
training rows), with an L2 penalty on the weights,

    min_{W, b}  (1/N) Σ_i CE(W z_i + b, y_i) + (λ/2) ‖W‖²_F,

a convex problem, solved full-batch by L-BFGS in float64 from W = 0, b = 0: the result depends on
the data and λ only (no random start, no minibatch order). λ is picked from a grid by stratified
k-fold cross-validation on the training rows alone (ties: the larger λ, the simpler head), so
the test rows never choose anything. The standardization is folded into the returned weights,

    W z + b = (W/σ) ẽ + (b − (W/σ) μ),

so the head is one linear map of ẽ. Trade-off: a linear head on frozen embeddings is far weaker
than fine-tuning the encoder, but it trains in a second on a CPU, and every later accuracy
change comes from the encoder's weights alone, which is what the quantization experiment needs.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def sentence_embedding(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[N, H] unit-length mean of `hidden` [N, L, H] over the positions where `mask` [N, L] is 1."""
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    mean = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)
    return F.normalize(mean, dim=-1)


@dataclass(frozen=True)
class HeadFit:
    """A trained head: logits = weight @ ẽ + bias; float32 tensors [C, H] and [C]."""

    weight: torch.Tensor
    bias: torch.Tensor
    l2: float  # the λ chosen
    cv_accuracy: dict[float, float]  # λ -> mean held-out-fold accuracy (empty when one λ was given)
    train_accuracy: float


def fit_logistic(x: torch.Tensor, y: torch.Tensor, n_classes: int, l2: float, *,
                 max_iter: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """(W [C, H], b [C]) minimising mean cross-entropy + (l2/2)‖W‖², float64, from zero."""
    x = x.to(torch.float64)
    weight = torch.zeros(n_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9,
                            tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ weight.T + bias, y) + 0.5 * l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return weight.detach(), bias.detach()


def stratified_folds(labels: Sequence[int], k: int, seed: int) -> list[list[int]]:
    """k disjoint index lists covering every row; each class dealt round-robin after a seeded shuffle."""
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(int(label), []).append(i)
    rng = random.Random(seed)
    folds: list[list[int]] = [[] for _ in range(k)]
    offset = 0
    for label in sorted(by_class):
        members = by_class[label]
        rng.shuffle(members)
        for j, index in enumerate(members):
            folds[(offset + j) % k].append(index)
        offset += len(members)
    return [sorted(f) for f in folds]


def _standardize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.to(torch.float64)
    return x.mean(0), x.std(0).clamp_min(1e-12)


def _fit_folded(x, y, n_classes, l2, max_iter) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit on standardized x and return the map of the raw x (standardization folded in)."""
    mu, sigma = _standardize(x)
    weight, bias = fit_logistic((x.to(torch.float64) - mu) / sigma, y, n_classes, l2, max_iter=max_iter)
    folded = weight / sigma
    return folded, bias - folded @ mu


def _accuracy(weight, bias, x, y) -> float:
    return float(((x.to(torch.float64) @ weight.T + bias).argmax(-1) == y).double().mean())


def cross_validate(x: torch.Tensor, y: torch.Tensor, n_classes: int, l2_grid: Sequence[float], *,
                   folds: int, seed: int, max_iter: int = 500) -> dict[float, float]:
    """λ -> mean accuracy over `folds` stratified folds (train on k−1, score the held-out one)."""
    parts = stratified_folds(y.tolist(), folds, seed)
    if any(len(p) == 0 for p in parts):
        raise ValueError(f"{len(y)} training rows cannot fill {folds} folds; use fewer --head-folds or one --head-l2")
    out = {}
    for l2 in l2_grid:
        scores = []
        for held in parts:
            keep = torch.ones(len(y), dtype=torch.bool)
            keep[held] = False
            weight, bias = _fit_folded(x[keep], y[keep], n_classes, l2, max_iter)
            scores.append(_accuracy(weight, bias, x[held], y[held]))
        out[float(l2)] = sum(scores) / len(scores)
    return out


def train_head(features: torch.Tensor, labels: Sequence[int], n_classes: int, *, l2_grid: Sequence[float],
               folds: int = 5, seed: int = 0, max_iter: int = 500) -> HeadFit:
    """The head of the module docstring on `features` [N, H] (the sentence embeddings ẽ)."""
    y = torch.as_tensor(list(labels), dtype=torch.long)
    if features.ndim != 2 or features.shape[0] != len(y):
        raise ValueError(f"features {tuple(features.shape)} and {len(y)} labels; pass [N, H] features, one label per row")
    if not l2_grid or any(l2 <= 0 for l2 in l2_grid):
        raise ValueError(f"head L2 grid {list(l2_grid)} must hold one or more positive values, e.g. 0.01,0.1,1,10")
    cv = cross_validate(features, y, n_classes, l2_grid, folds=folds, seed=seed, max_iter=max_iter) if len(l2_grid) > 1 else {}
    best = max(cv, key=lambda l2: (cv[l2], l2)) if cv else float(l2_grid[0])
    weight, bias = _fit_folded(features, y, n_classes, best, max_iter)
    return HeadFit(weight.float(), bias.float(), best, cv, _accuracy(weight, bias, features, y))
