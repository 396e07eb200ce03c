"""A damage table priced in a file format's bytes: costs are the price function's sums over each
unit's members, +inf where the format cannot store a config, and allocation on it never picks those
and stays within a budget in that format's bytes; the feasibility check names the smallest file."""

from __future__ import annotations

import numpy as np
import pytest

from mixbits.allocate.budget import Budget
from mixbits.allocate.feasibility import BudgetInfeasible, check_table_budget
from mixbits.allocate.file_cost import FileCostTable, file_cost_table
from mixbits.allocate.optimal import Constraints, allocate_optimal, unit_groups
from mixbits.quant.spec import GGML_TYPES, KEEP, GGMLSpec, QuantSpec
from mixbits.sensitivity.table import DamageTable
from mixbits.sensitivity.units import BlockDamageTable

CONFIGS = (QuantSpec(3, 64), QuantSpec(4, 64), GGML_TYPES["Q4_K"], GGML_TYPES["Q8_0"], KEEP)
SHAPES = {"a": (64, 256), "b": (32, 576), "c": (128, 256)}


def price(shape, spec):
    """A made-up format: 3-bit grids and K-quants on rows not of 256 unstorable, 100 bytes per row and bit."""
    if spec == QuantSpec(3, 64) or (isinstance(spec, GGMLSpec) and not spec.fits(shape[1])):
        return None
    return shape[0] * 100 * spec.bits + 7


def damage_table(seed: int = 0) -> DamageTable:
    rng = np.random.default_rng(seed)
    damage = np.sort(rng.random((len(SHAPES), len(CONFIGS))), axis=1)[:, ::-1].copy()
    damage[:, -1] = 0.0
    return DamageTable(tuple(SHAPES), tuple(SHAPES.values()), CONFIGS, damage, "fisher")


def test_costs_are_the_price_of_each_member():
    table = file_cost_table(damage_table(), price, "test file")
    cost = table.cost_bits()
    for u, shape in enumerate(SHAPES.values()):
        for c, spec in enumerate(CONFIGS):
            expected = price(shape, spec)
            assert cost[u, c] == (np.inf if expected is None else 8 * expected)
    assert np.isinf(cost[1, 2]) and np.isfinite(cost[0, 2])  # Q4_K: only on the 256-rows
    block = BlockDamageTable(("blk",), ((1, 64 * 256 + 32 * 576),), CONFIGS, np.zeros((1, len(CONFIGS))), "fisher",
                             member_shapes=((SHAPES["a"], SHAPES["b"]),))
    summed = file_cost_table(block, price, "test file").cost_bits()[0]
    assert summed[3] == 8 * (price(SHAPES["a"], CONFIGS[3]) + price(SHAPES["b"], CONFIGS[3]))
    assert np.isinf(summed[2])  # one member cannot take it, so the block cannot
    with pytest.raises(ValueError, match="file_bits"):
        FileCostTable(("x",), ((1, 1),), CONFIGS, np.zeros((1, len(CONFIGS))), "fisher", file_bits=np.zeros((2, 2)))


def test_allocation_in_file_bytes_never_picks_what_the_file_cannot_store():
    table = file_cost_table(damage_table(), price, "test file")
    groups = unit_groups(table.units, [], False)
    cost = table.cost_bits()
    cheapest = float(np.where(np.isfinite(cost), cost, np.inf).min(axis=1).sum())
    for extra in (0.0, 0.3, 0.7):
        budget = cheapest + extra * (float(cost[:, -1].sum()) - cheapest)
        specs, solution = allocate_optimal(table, groups, budget)
        assert solution.cost <= budget
        assert all(price(SHAPES[n], s) is not None for n, s in specs.items())


def test_feasibility_names_the_smallest_file_in_bytes():
    table = file_cost_table(damage_table(), price, "test file")
    groups = unit_groups(table.units, [], False)
    cost = table.cost_bits()
    smallest = 1000 + int(np.where(np.isfinite(cost), cost, np.inf).min(axis=1).sum()) // 8
    with pytest.raises(BudgetInfeasible, match=f"the smallest test file is {smallest} bytes"):
        check_table_budget(table, groups, Constraints(), Budget(size_mb=(smallest - 1) / 1e6), 1000, "test file")
    bits = check_table_budget(table, groups, Constraints(), Budget(size_mb=smallest / 1e6), 1000, "test file")
    assert bits == pytest.approx(8 * (smallest - 1000))
