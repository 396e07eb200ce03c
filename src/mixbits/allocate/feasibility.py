"""Check a budget before any compute, and pick the uniform baseline a budget is compared with.

Both need only layer shapes and the cost model, so they run right after the model's config is
known and long before calibration.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from mixbits.allocate.budget import Budget
from mixbits.allocate.optimal import Constraints, allowed_options, merged_problem
from mixbits.allocate.solver import feasible_range
from mixbits.errors import UserError
from mixbits.plan import Plan
from mixbits.quant.fake import storable
from mixbits.quant.spec import GGMLSpec, QuantSpec
from mixbits.sensitivity.table import DamageTable


class BudgetInfeasible(UserError):
    """A budget no plan can meet; the message names the reachable range."""


def shape_table(shapes: Mapping[str, tuple[int, int]], configs: Sequence[QuantSpec]) -> DamageTable:
    """A damage table with zero damage: enough for cost and feasibility questions."""
    return DamageTable(tuple(shapes), tuple(shapes.values()), tuple(configs), np.zeros((len(shapes), len(configs))), "none")


def check_budget(
    shapes: Mapping[str, tuple[int, int]],
    configs: Sequence[QuantSpec],
    groups: Sequence[Sequence[str]],
    constraints: Constraints,
    budget: Budget,
    fixed_bytes: int,
) -> float:
    """Return the budget in stored bits, or raise BudgetInfeasible naming the reachable range."""
    return check_table_budget(shape_table(shapes, configs), groups, constraints, budget, fixed_bytes)


def check_table_budget(
    table: DamageTable,
    groups: Sequence[Sequence[str]],
    constraints: Constraints,
    budget: Budget,
    fixed_bytes: int,
    stored_as: str = "model",
) -> float:
    """`check_budget` on the costs `table` gives (the cost model's, or a file format's:
    `file_cost.FileCostTable`); `stored_as` names what a size budget measures in messages."""
    configs = table.configs
    cost, _ = merged_problem(table, groups, allowed_options(table, constraints))
    cheapest, richest = feasible_range(cost)
    numel = int(table.numels().sum())
    bits = budget.to_bits(numel, fixed_bytes)
    flag = "--target-bpw" if budget.bpw is not None else "--target-size-mb"
    lo, hi = budget.from_bits(cheapest, numel, fixed_bytes), budget.from_bits(richest, numel, fixed_bytes)
    sizes = "" if budget.bpw is not None else (
        f" (the smallest {stored_as} is {_bytes(cheapest, fixed_bytes)} bytes, the largest "
        f"{_bytes(richest, fixed_bytes)} bytes)")
    if bits < cheapest:
        raise BudgetInfeasible(
            f"{flag} {budget.label} cannot be met: with candidate configs "
            f"{[c.label for c in configs]} and these constraints the cheapest plan needs {lo:.4g} and the "
            f"richest {hi:.4g}{sizes}; choose a budget in [{lo:.4g}, {hi:.4g}] or allow fewer bits/larger groups"
        )
    if bits > richest * (1 + 1e-12):
        raise BudgetInfeasible(
            f"{flag} {budget.label} is above the richest reachable plan ({hi:.4g}){sizes}: nothing would be "
            f"quantized; choose a budget in [{lo:.4g}, {hi:.4g}]"
        )
    return bits


def _bytes(bits: float, fixed_bytes: int) -> int:
    return int(round(bits / 8 + fixed_bytes))


def uniform_baselines(
    shapes: Mapping[str, tuple[int, int]], configs: Sequence[QuantSpec], budget: Budget, fixed_bytes: int
) -> list[tuple[QuantSpec, bool]]:
    """The uniform configs a budget is compared with: the richest one whose storage fits the
    budget, and the cheapest one above it (so a mixed plan is shown against a uniform model
    both smaller and larger than itself). Ties in cost: the larger group size (ggml: block) wins.
    Only configs every layer can take compete (a K-quant is no uniform baseline of a model with
    576-wide rows). The flag says whether the config fits the budget."""
    numel = sum(o * i for o, i in shapes.values())
    limit = budget.to_bits(numel, fixed_bytes)
    uniform = [c for c in configs if not c.keep and all(storable(c, i) for _, i in shapes.values())]
    priced = [(8 * Plan.uniform(shapes, c).storage_bytes(shapes), (c.block if isinstance(c, GGMLSpec) else c.group_size) or 1 << 30, c)
              for c in uniform]
    return around_limit(priced, limit)


def around_limit(priced: Sequence[tuple[float, int, object]], limit: float) -> list[tuple[object, bool]]:
    """Of (cost, group or block size, config) triples: the richest config at or below `limit` and the
    cheapest one above it (ties: the larger group or block wins), each with whether it fits."""
    fitting = [p for p in priced if p[0] <= limit]
    above = [p for p in priced if p[0] > limit]
    out = []
    if fitting:
        out.append((max(fitting, key=lambda p: (p[0], p[1]))[2], True))
    if above:
        out.append((min(above, key=lambda p: (p[0], -p[1]))[2], False))
    return out
