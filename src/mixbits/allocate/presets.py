"""The SG-MPQ presets (seed 000, `--mpq_strategy conservative | adaptive | aggressive`).

From SG-MPQ's `calculate_mixed_precision_config`, with n = (s - min) / (max - min) in [0, 1]
(tied units share their group's max score) and every comparison strict:

    group size     n > 0.8 -> 64,  n > 0.5 -> 128,  else 256      (all three presets)
    conservative   n > 0.7 -> 8,   n > 0.4 -> 6,    else 4
    aggressive     n > 0.9 -> 8,   n > 0.7 -> 6,    n > 0.4 -> 4,  else 2
    adaptive       p = n^α (α = 0.5); p above none .. four of its 15/30/60/80 % quantiles
                   -> 2, 3, 4, 6, 8; then moved towards the budget one rung at a time.

Each wanted (bits, group) becomes the nearest allowed config (see `strategies`); the ladder
of a unit is its allowed bit-widths up to 8 at its tier's group size.

The seed runs them at targets 5.0 / 4.0 / 3.0 bits, but only `adaptive` uses the target:
`conservative` and `aggressive` are fixed tiers and report how far they exceed it (`miss`).
Without a budget, those nominal targets are the ones reported against (and the one
`adaptive` moves towards).

`adaptive`'s budget step. The seed moves single layers by one bit until the unweighted mean
bit-width is within 0.05 of the target: while above, it lowers the layer with the least
sensitivity / bits; while below, it raises the one with the most sensitivity / (bits + 1).
Here the budget counts stored bits (codes, scales, zero-points) of layers of unequal size,
so the same idea is carried out on stored bits: while over budget, step down the group that
loses the least s·|group|·Δbits per stored bit saved; then, while an upgrade fits, step up
the one that gains the most per extra stored bit. The result is within the budget whenever
the ladders' bottom rungs are; otherwise it is the cheapest plan of those ladders, with `miss`.
"""

from __future__ import annotations

import numpy as np

from mixbits.allocate.heuristics import QUANTILE_BITS, QUANTILES
from mixbits.allocate.solver import REL_TOL
from mixbits.allocate.strategies import Problem, StrategyResult, finish, ladder, minmax, snap
from mixbits.errors import UserError

PRESET_TARGET_BPW = {"conservative": 5.0, "adaptive": 4.0, "aggressive": 3.0}
PRESET_BITS_CAP = 8


def preset_group_sizes(n: np.ndarray) -> np.ndarray:
    """[G] group size per normalised score: smaller groups for sensitive layers."""
    return np.where(n > 0.8, 64, np.where(n > 0.5, 128, 256))


def _tiered(n: np.ndarray, edges: tuple[float, ...], bits: tuple[int, ...]) -> np.ndarray:
    return np.asarray(bits, dtype=np.float64)[(n[:, None] > np.asarray(edges)[None, :]).sum(axis=1)]


def _budget(problem: Problem, name: str) -> tuple[float, str]:
    if problem.budget_bits is not None:
        return problem.budget_bits, ""
    target = PRESET_TARGET_BPW[name]
    return target * problem.numel, f" (nominal target {target:g} bpw)"


def _fixed(problem: Problem, name: str, edges: tuple[float, ...], bits: tuple[int, ...]) -> StrategyResult:
    n = minmax(problem.score)
    cfg, rung_bits = ladder(problem, preset_group_sizes(n), cap=PRESET_BITS_CAP)
    choice = cfg[np.arange(len(cfg)), snap(rung_bits, _tiered(n, edges, bits))]
    budget, note = _budget(problem, name)
    tiers = ", ".join(f"n > {e:g} -> {b}" for e, b in zip(reversed(edges), reversed(bits[1:])))
    rule = f"{name}: {tiers}, else {bits[0]} bits; groups 64/128/256 at n > 0.8/0.5; fixed tiers{note}"
    return finish(problem, choice, rule, budget)


def conservative(problem: Problem) -> StrategyResult:
    return _fixed(problem, "conservative", (0.4, 0.7), (4, 6, 8))


def aggressive(problem: Problem) -> StrategyResult:
    return _fixed(problem, "aggressive", (0.4, 0.7, 0.9), (2, 4, 6, 8))


def adaptive(problem: Problem, alpha: float = 0.5) -> StrategyResult:
    """Quantile tiers of n^alpha, then one-rung moves until the plan fits the budget."""
    if not alpha > 0:
        raise UserError(f"alpha={alpha!r} must be positive (0.5 is the seed's square-root mapping)")
    n = minmax(problem.score)
    p = n**alpha
    edges = np.quantile(np.repeat(p, problem.size), QUANTILES)
    want = np.asarray(QUANTILE_BITS, dtype=np.float64)[(p[:, None] > edges[None, :]).sum(axis=1)]
    cfg, rung_bits = ladder(problem, preset_group_sizes(n), cap=PRESET_BITS_CAP)
    budget, note = _budget(problem, "adaptive")
    pos = fit_ladder(problem, cfg, rung_bits, snap(rung_bits, want), budget)
    rule = (f"adaptive: n^{alpha:g} above its 15/30/60/80% quantiles -> 2/3/4/6/8 bits, groups by n, "
            f"then one-rung moves by s·Δbits per stored bit to the budget{note}")
    return finish(problem, cfg[np.arange(len(cfg)), pos], rule, budget)


def fit_ladder(
    problem: Problem, cfg: np.ndarray, rung_bits: np.ndarray, pos: np.ndarray, budget: float
) -> np.ndarray:
    """Rung positions [G] moved one rung at a time: down while over `budget` (least loss of
    Σ s·bits per stored bit saved first), then up while an upgrade fits (most gain first)."""
    rows, top = np.arange(len(cfg)), (cfg >= 0).sum(axis=1) - 1
    rung_cost = np.where(cfg >= 0, problem.cost[rows[:, None], np.maximum(cfg, 0)], np.inf)
    weight = problem.score * problem.size
    pos = pos.copy()
    room = budget * (1 + REL_TOL) - float(rung_cost[rows, pos].sum())
    while room < 0:
        low = np.maximum(pos - 1, 0)
        save = rung_cost[rows, pos] - rung_cost[rows, low]
        ok = (pos > 0) & (save > 0)
        if not ok.any():
            break
        loss = weight * (rung_bits[rows, pos] - rung_bits[rows, low]) / np.where(ok, save, 1.0)
        best = np.where(ok, loss, np.inf)
        g = int(np.argmax(np.where(best <= best.min() + 1e-12 * abs(best.min()), save, -np.inf)))
        pos[g], room = pos[g] - 1, room + save[g]
    while True:
        up = np.minimum(pos + 1, top)
        extra = rung_cost[rows, up] - rung_cost[rows, pos]
        gain = weight * (rung_bits[rows, up] - rung_bits[rows, pos])
        ok = (pos < top) & (gain > 0) & (extra <= room)
        if not ok.any():
            return pos
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(ok, np.where(extra > 0, gain / extra, np.inf), -np.inf)
        near = ok & (ratio >= ratio.max() * (1 - 1e-9))
        g = int(np.argmin(np.where(near, extra, np.inf)))
        pos[g], room = pos[g] + 1, room - extra[g]
