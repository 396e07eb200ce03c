"""Every allocation strategy by name, behind one signature.

``run_strategy(name, table, groups, budget_bits, score=..., alpha=..., constraints=...)``
builds the per-group problem (`strategies.build_problem`) and runs the rule. `optimal`, the
default, is the exact least-predicted-damage plan (`optimal.allocate_optimal`); the others
are the seed write-ups' heuristics, which look only at one scalar score per unit. Options a
strategy does not use are ignored. `predicted_damage` prices any plan on the same table, so
heuristics and the optimum can be compared on the objective the optimum minimises.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np

from mixbits.allocate import heuristics, presets
from mixbits.allocate.optimal import Constraints, allocate_optimal
from mixbits.allocate.strategies import StrategyResult, build_problem, finish, uniform
from mixbits.errors import UserError
from mixbits.quant.spec import KEEP, QuantSpec
from mixbits.sensitivity.table import DamageTable

DEFAULT_STRATEGY = "optimal"


@dataclass(frozen=True)
class StrategyOptions:
    """Knobs some strategies read: the score vector (None: the table's first), the power-law
    exponent, the uniform spec (None with a budget: the richest fitting), the group size the
    single-group rules ask for (power_law, quantile), and the allocation constraints."""

    score: str | None = None
    alpha: float = 0.5
    spec: QuantSpec | None = None
    group_size: int | None = 128
    constraints: Constraints = Constraints()


Strategy = Callable[[DamageTable, Sequence[Sequence[str]], "float | None", StrategyOptions], StrategyResult]


def _heuristic(rule: Callable[..., StrategyResult], *uses: str, **fixed) -> Strategy:
    """Adapt ``rule(problem, **kwargs)`` to the registry's signature; `uses` names the
    StrategyOptions fields passed on as keyword arguments."""

    def run(table, groups, budget_bits, options: StrategyOptions) -> StrategyResult:
        problem = build_problem(table, groups, budget_bits, score=options.score, constraints=options.constraints)
        return rule(problem, **fixed, **{k: getattr(options, k) for k in uses})

    run.__doc__ = rule.__doc__
    return run


def _optimal(table, groups, budget_bits, options: StrategyOptions) -> StrategyResult:
    if budget_bits is None:
        raise UserError("strategy 'optimal' needs a budget (--target-bpw or --target-size-mb)")
    specs, solution = allocate_optimal(table, groups, budget_bits, options.constraints)
    problem = build_problem(table, groups, budget_bits, score=options.score, constraints=options.constraints)
    choice = np.array([problem.configs.index(specs[g[0]]) for g in problem.groups])
    proven = "proven optimal" if solution.optimal else "best found, not proven optimal"
    return finish(problem, choice, f"optimal: least predicted damage within the budget ({proven}, {solution.method})",
                  scored=False)


STRATEGIES: Mapping[str, Strategy] = MappingProxyType({
    "optimal": _optimal,
    "uniform": _heuristic(uniform, "spec"),
    "int4_only": _heuristic(uniform, spec=QuantSpec(4, 128)),
    "int8_only": _heuristic(uniform, spec=QuantSpec(8, 128)),
    "conservative": _heuristic(presets.conservative),
    "adaptive": _heuristic(presets.adaptive, "alpha"),
    "aggressive": _heuristic(presets.aggressive),
    "adaptive_threshold": _heuristic(heuristics.adaptive_threshold),
    "percentile": _heuristic(heuristics.percentile),
    "exponential": _heuristic(heuristics.exponential),
    "threshold_conservative": _heuristic(heuristics.threshold_conservative),
    "threshold_aggressive": _heuristic(heuristics.threshold_aggressive),
    "power_law": _heuristic(heuristics.power_law, "alpha", "group_size"),
    "quantile": _heuristic(heuristics.quantile, "group_size"),
    "greedy": _heuristic(heuristics.greedy),
})

BUDGETED = frozenset({"optimal", "uniform", "adaptive", "power_law", "greedy"})
"""Strategies that try to meet the budget; the others are fixed tiers and report `miss`."""

STRATEGY_HELP: Mapping[str, str] = MappingProxyType({
    "optimal": "exact least total predicted damage within the budget (multiple-choice knapsack)",
    "uniform": "one spec for every unit (--spec), or the richest uniform spec within the budget",
    "int4_only": "every unit w4g128 (seed 004)",
    "int8_only": "every unit w8g128 (seed 004)",
    "conservative": "n>0.7 -> 8, n>0.4 -> 6, else 4 bits; groups 64/128/256 by n (seed 000, fixed tiers)",
    "adaptive": "quantile tiers of n^0.5 -> 2/3/4/6/8 bits, groups by n, then moved rung by rung to the budget (seed 000)",
    "aggressive": "n>0.9 -> 8, n>0.7 -> 6, n>0.4 -> 4, else 2 bits; groups by n (seed 000, fixed tiers)",
    "adaptive_threshold": "s >= mean -> fp16, s >= mean - std/2 -> INT8, else INT4 (seed 004, fixed tiers)",
    "percentile": "s >= p50 -> fp16, s >= p25 -> INT8, else INT4 (seed 004, fixed tiers)",
    "exponential": "exp(2n)/e^2 >= 0.5 -> fp16, >= 0.25 -> INT8, else INT4 (seed 004, fixed tiers)",
    "threshold_conservative": "s >= mean - std/4 -> fp16, else INT8 (seed 004 'conservative', fixed tiers)",
    "threshold_aggressive": "s >= mean + std/4 -> fp16, s >= mean - std/4 -> INT8, else INT4 (seed 004 'aggressive')",
    "power_law": "bits = b_min + (b_max - b_min) n^alpha + offset, offset bisected to fill the budget (seed 001)",
    "quantile": "s above its 15/30/60/80% quantiles -> 2/3/4/6/8 bits (seed 001, fixed tiers)",
    "greedy": "max sum s*bits: from the cheapest plan, best gain per extra stored bit while it fits (seed 001)",
})


def run_strategy(
    name: str,
    table: DamageTable,
    groups: Sequence[Sequence[str]],
    budget_bits: float | None = None,
    *,
    score: str | None = None,
    alpha: float = 0.5,
    spec: QuantSpec | None = None,
    group_size: int | None = 128,
    constraints: Constraints = Constraints(),
) -> StrategyResult:
    """Run strategy `name` on `table`; `groups` from `unit_groups`, `budget_bits` stored bits
    of the units (None for rules without a budget)."""
    if name not in STRATEGIES:
        raise UserError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
    options = StrategyOptions(score=score, alpha=alpha, spec=spec, group_size=group_size, constraints=constraints)
    return STRATEGIES[name](table, groups, budget_bits, options)


def predicted_damage(table: DamageTable, specs: Mapping[str, QuantSpec]) -> float:
    """Σ_u damage[u, spec_u]: the table's predicted loss increase of a plan over its units.

    A unit the plan leaves out stays in 16 bit (the table's keep column, as `Plan` reads it); a
    spec that is not one of the table's configs is an error, never priced as some other config."""
    column = {c: j for j, c in enumerate(table.configs)}
    total = 0.0
    for u, name in enumerate(table.units):
        spec = specs.get(name, KEEP)
        if spec not in column:
            given = "leaves it in 16 bit" if name not in specs else f"gives it {spec.label}"
            raise UserError(f"{name}: the plan {given}, which is not a config of the damage table "
                            f"{[c.label for c in table.configs]}; allocate among the table's configs")
        total += float(table.damage[u, column[spec]])
    return total
