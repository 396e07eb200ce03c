"""The seeds' sensitivity rules: fixed INT4/INT8/FP16 tiers, quantile tiers, power law, greedy.

s is the problem's score per unit (tied units share their group's max), μ and σ its mean and
population standard deviation, n = (s - min) / (max - min) in [0, 1].

Fixed tiers (seed 004, the "sensitivity_aware_quantizer" `--config_strategy` choices). The
seed has four tiers, FP32 / BF16 / INT8 / INT4; a kept layer is stored in 16 bit here, so its
two top tiers both become fp16. INT8 and INT4 are w8g128 and w4g128 (nearest allowed).

    adaptive_threshold       s >= μ -> fp16,          s >= μ - σ/2 -> INT8,  else INT4
    percentile               s >= p50 -> fp16,        s >= p25 -> INT8,      else INT4
    exponential              e = exp(2n)/e^2:  e >= 0.5 -> fp16,  e >= 0.25 -> INT8,  else INT4
    threshold_conservative   s >= μ - σ/4 -> fp16,    else INT8 (never INT4)
    threshold_aggressive     s >= μ + σ/4 -> fp16,    s >= μ - σ/4 -> INT8,  else INT4

None of these looks at the budget: with half the layers at or above the mean, they keep
roughly half the weights in 16 bit. They report how far they exceed a target (`miss`).

The "improved MPQ" rules (seed 001, SG-MPQ):

- quantile: thresholds at the 15/30/60/80 % quantiles of s (linear interpolation, as
  torch.quantile); s above none, one, ... four of them -> 2, 3, 4, 6, 8 bits. The seed takes
  the quantiles of n^0.5; a monotone map keeps the same tiers, so raw s is used. Fixed tiers.
- power_law: bits = b_min + (b_max - b_min) n^α + t, rounded to the nearest allowed bit-width
  (ties up; clipped to the ladder). Without a budget t = 0. With one, t is bisected to the
  largest offset whose plan fits: the plan's cost is a non-decreasing step function of t, so
  this is the richest plan of that shape within the budget (a scale would change the shape).
  Units with equal n move together, so the plan can sit well below the budget (all-equal
  scores give a uniform plan).
- greedy: maximise Σ_u s_u · bits_u subject to stored bits <= budget. Start every group at its
  cheapest config; repeatedly take the upgrade (any allowed config with more bits) with the
  largest gain per extra stored bit, s_group · |group| · Δbits / Δcost, that still fits; ties
  in that ratio go to the smaller step. Bit-widths stop at 8, as in the seed (fp16 only where
  a unit has no other option). The seed's layers were equal-sized blocks and its
  budget an unweighted bit mean; with unequal layers the budget is stored bits, so the ratio
  divides by stored bits. Only bit-widths count, so each bit-width is taken at its cheapest
  (largest) group size. Units with s <= 0 gain nothing and stay at their cheapest config.
"""

from __future__ import annotations

import numpy as np

from mixbits.allocate.solver import REL_TOL
from mixbits.allocate.strategies import Problem, StrategyResult, finish, fits, ladder, minmax, snap, total_bits
from mixbits.errors import UserError

INT_TIER_BITS = (4, 8, 16)  # INT4, INT8, fp16 (the seed's BF16 and FP32 tiers)
INT_TIER_GROUP = 128
QUANTILES = (0.15, 0.30, 0.60, 0.80)
QUANTILE_BITS = (2, 3, 4, 6, 8)
_BISECT_STEPS = 60


def _int_tiers(problem: Problem, tier: np.ndarray, rule: str) -> StrategyResult:
    """Tier 0/1/2 per group -> the nearest allowed config to w4g128 / w8g128 / fp16."""
    cfg, bits = ladder(problem, INT_TIER_GROUP)
    want = np.asarray(INT_TIER_BITS, dtype=np.float64)[tier]
    return finish(problem, cfg[np.arange(len(cfg)), snap(bits, want)], rule)


def _sigma_tiers(problem: Problem, keep_k: float, int8_k: float | None, name: str) -> StrategyResult:
    s = problem.unit_scores
    mu, sigma = float(s.mean()), float(s.std())
    keep_at = mu + keep_k * sigma
    int8_at = -np.inf if int8_k is None else mu + int8_k * sigma
    tier = (problem.score >= int8_at).astype(int) + (problem.score >= keep_at)
    below = "INT8" if int8_k is None else f"s >= μ{int8_k:+g}σ -> INT8, else INT4"
    return _int_tiers(problem, tier, f"{name}: s >= μ{keep_k:+g}σ ({keep_at:.4g}) -> fp16, {below}")


def adaptive_threshold(problem: Problem) -> StrategyResult:
    return _sigma_tiers(problem, 0.0, -0.5, "adaptive_threshold")


def threshold_conservative(problem: Problem) -> StrategyResult:
    return _sigma_tiers(problem, -0.25, None, "threshold_conservative")


def threshold_aggressive(problem: Problem) -> StrategyResult:
    return _sigma_tiers(problem, 0.25, -0.25, "threshold_aggressive")


def percentile(problem: Problem) -> StrategyResult:
    p25, p50 = np.percentile(problem.unit_scores, (25, 50))
    tier = (problem.score >= p25).astype(int) + (problem.score >= p50)
    return _int_tiers(problem, tier, f"percentile: s >= p50 ({p50:.4g}) -> fp16, s >= p25 ({p25:.4g}) -> INT8, else INT4")


def exponential(problem: Problem) -> StrategyResult:
    e = np.exp(2.0 * minmax(problem.score)) / np.exp(2.0)
    tier = (e >= 0.25).astype(int) + (e >= 0.5)
    return _int_tiers(problem, tier, "exponential: e = exp(2n)/e^2; e >= 0.5 -> fp16, e >= 0.25 -> INT8, else INT4")


def quantile(
    problem: Problem, quantiles=QUANTILES, bits=QUANTILE_BITS, group_size: int | None = 128
) -> StrategyResult:
    """Tier = number of quantile thresholds s exceeds (strictly) -> bits[tier]."""
    if len(bits) != len(quantiles) + 1 or list(quantiles) != sorted(quantiles):
        raise UserError(f"quantile needs sorted quantiles and one more bit-width: got {quantiles} and {bits}")
    edges = np.quantile(problem.unit_scores, quantiles)
    tier = (problem.score[:, None] > edges[None, :]).sum(axis=1)
    cfg, rung_bits = ladder(problem, group_size, cap=max(bits))
    want = np.asarray(bits, dtype=np.float64)[tier]
    tiers = ", ".join(f"q{q:g}={e:.4g}" for q, e in zip(quantiles, edges))
    return finish(problem, cfg[np.arange(len(cfg)), snap(rung_bits, want)],
                  f"quantile: {tiers} -> bits {tuple(bits)} at group {group_size or 'pc'}")


def power_law(
    problem: Problem, alpha: float = 0.5, b_min: int | None = None, b_max: int | None = None,
    group_size: int | None = 128,
) -> StrategyResult:
    """bits = b_min + (b_max - b_min) n^alpha + t, t = 0 or bisected to fill the budget."""
    if not alpha > 0:
        raise UserError(f"alpha={alpha!r} must be positive (0.5 is the seed's square-root mapping)")
    quant = sorted({c.bits for c in problem.configs if not c.keep})
    b_min = quant[0] if b_min is None else b_min
    b_max = max(b for b in quant if b <= 8) if b_max is None else b_max
    if b_min > b_max:
        raise UserError(f"power_law needs b_min <= b_max, got {b_min} > {b_max}")
    cfg, rung_bits = ladder(problem, group_size, cap=b_max)
    base = b_min + (b_max - b_min) * minmax(problem.score) ** alpha
    rows = np.arange(len(cfg))

    def plan(t: float) -> np.ndarray:
        return cfg[rows, snap(rung_bits, base + t)]

    t, budget = 0.0, problem.budget_bits
    if budget is not None:
        lo, hi = -(b_max - b_min) - 1.0, (b_max - b_min) + 1.0  # every group at its bottom / top rung
        if fits(total_bits(problem, plan(hi)), budget):
            lo = hi
        elif fits(total_bits(problem, plan(lo)), budget):
            for _ in range(_BISECT_STEPS):  # invariant: plan(lo) fits, plan(hi) does not
                mid = 0.5 * (lo + hi)
                lo, hi = (mid, hi) if fits(total_bits(problem, plan(mid)), budget) else (lo, mid)
        t = lo
    rule = f"power_law: bits = {b_min} + {b_max - b_min}·n^{alpha:g} {t:+.4f}, nearest allowed at group {group_size or 'pc'}"
    return finish(problem, plan(t), rule)


def greedy(problem: Problem, cap: int = 8) -> StrategyResult:
    """Cheapest start, then the best Σ s·bits gain per extra stored bit while it fits;
    bit-widths above `cap` (the seed's 8) only where a unit has nothing else (keep, pins)."""
    if problem.budget_bits is None:
        raise UserError("greedy needs a budget (--target-bpw or --target-size-mb)")
    bits = problem.bits
    capped = np.where(bits[None, :] <= cap, problem.cost, np.inf)
    cost = np.where(np.isfinite(capped).any(axis=1, keepdims=True), capped, problem.cost)
    rows = np.arange(len(cost))
    weight = problem.score * problem.size  # Σ over members of the shared score
    cheapest = np.where(np.isfinite(cost), cost, np.inf).min(axis=1, keepdims=True)
    choice = np.argmax(np.where(cost == cheapest, bits, -np.inf), axis=1)  # cheapest; ties: more bits
    room = problem.budget_bits * (1 + REL_TOL) - float(cost[rows, choice].sum())
    while True:
        step = cost - cost[rows, choice][:, None]
        gain = weight[:, None] * (bits[None, :] - bits[choice][:, None])
        ok = np.isfinite(step) & (gain > 0) & (step <= room)
        if not ok.any():
            break
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(ok, np.where(step > 0, gain / step, np.inf), -np.inf)  # step <= 0: a free upgrade
        near = ok & (ratio >= ratio.max() * (1 - 1e-9))
        g, c = divmod(int(np.argmin(np.where(near, step, np.inf))), cost.shape[1])
        choice[g], room = c, room - step[g, c]
    return finish(problem, choice, f"greedy: max Σ s·bits (bits <= {cap}), best gain per stored bit first, within the budget")
