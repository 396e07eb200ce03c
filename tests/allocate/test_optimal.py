import itertools

import numpy as np
import pytest

from mixbits.allocate.budget import Budget
from mixbits.allocate.feasibility import BudgetInfeasible, check_budget, shape_table, uniform_baselines
from mixbits.allocate.optimal import Constraints, allocate_optimal, unit_groups
from mixbits.config import candidate_configs
from mixbits.plan import Plan
from mixbits.quant.spec import QuantSpec
from mixbits.sensitivity.table import DamageTable

SHAPES = {"l0.q": (64, 64), "l0.k": (32, 64), "l0.v": (32, 64), "l0.o": (64, 64), "l0.down": (64, 128)}
TIED = [("l0.q", "l0.k", "l0.v")]
CONFIGS = candidate_configs((2, 3, 4), (64,))


def table(seed=0):
    rng = np.random.default_rng(seed)
    base = rng.uniform(0.1, 10, size=len(SHAPES))
    bits = np.array([c.bits for c in CONFIGS])
    damage = base[:, None] * np.where(bits == 16, 0.0, 4.0 ** -bits)[None, :]
    return DamageTable(tuple(SHAPES), tuple(SHAPES.values()), CONFIGS, damage, "test")


def brute(t, groups, budget_bits, constraints):
    cost_unit = t.cost_bits()
    idx = t.index()
    best = None
    for choice in itertools.product(range(len(CONFIGS)), repeat=len(groups)):
        specs = {m: CONFIGS[c] for g, c in zip(groups, choice) for m in g}
        if constraints.keep and any(s.bits != 16 for n, s in specs.items() if constraints.keep in n):
            continue
        if any(s.bits < constraints.min_bits or s.bits > constraints.max_bits for s in specs.values()):
            continue
        if any(specs[n] != s for p, s in constraints.pins for n in specs if p in n):
            continue
        cost = sum(cost_unit[idx[n], CONFIGS.index(s)] for n, s in specs.items())
        dmg = sum(t.damage[idx[n], CONFIGS.index(s)] for n, s in specs.items())
        if cost <= budget_bits and (best is None or dmg < best - 1e-15):
            best = dmg
    return best


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize(
    "kwargs",
    [{}, {"min_bits": 3}, {"max_bits": 4}, {"keep": "down"}, {"pins": (("l0.o", CONFIGS[0]),)}],
)
@pytest.mark.parametrize("bpw", [2.6, 3.1, 3.6, 4.5])
def test_optimal_matches_brute_force_with_ties_pins_and_ranges(tie, kwargs, bpw):
    constraints = Constraints(tie=tie, **kwargs)
    t = table()
    groups = unit_groups(t.units, TIED, tie)
    budget = bpw * t.numels().sum()
    try:
        specs, sol = allocate_optimal(t, groups, budget, constraints)
    except ValueError:
        assert brute(t, groups, budget, constraints) is None
        return
    assert sol.damage == pytest.approx(brute(t, groups, budget, constraints), rel=1e-9, abs=1e-15)
    assert Plan(specs).storage_bytes(SHAPES) * 8 <= budget
    if tie:
        assert specs["l0.q"] == specs["l0.k"] == specs["l0.v"]
    if constraints.keep:
        assert specs["l0.down"].keep
    for pattern, spec in constraints.pins:
        assert specs[pattern] == spec


def test_parse_pin():
    assert Constraints.parse_pin("down_proj=4") == ("down_proj", QuantSpec(4, 128))
    assert Constraints.parse_pin("down=w3g64")[1].group_size == 64
    assert Constraints.parse_pin("down=Q4_K")[1].name == "Q4_K"
    with pytest.raises(ValueError, match="must look like"):
        Constraints.parse_pin("down")


def test_budget_outside_reachable_range_names_it():
    groups = unit_groups(tuple(SHAPES), TIED, True)
    with pytest.raises(BudgetInfeasible, match=r"cheapest plan needs 2\.\d+"):
        check_budget(SHAPES, CONFIGS, groups, Constraints(), Budget(bpw=1.0), 0)
    with pytest.raises(BudgetInfeasible, match="above the richest"):
        check_budget(SHAPES, CONFIGS, groups, Constraints(), Budget(bpw=17.0), 0)
    with pytest.raises(BudgetInfeasible, match="target-size-mb"):
        check_budget(SHAPES, CONFIGS, groups, Constraints(), Budget(size_mb=0.001), 0)
    bits = check_budget(SHAPES, CONFIGS, groups, Constraints(), Budget(size_mb=0.05), 20_000)
    assert bits == pytest.approx((0.05e6 - 20_000) * 8)


def test_uniform_baselines_bracket_the_budget():
    configs = candidate_configs((2, 3, 4), (64, 128))
    shapes = {"x": (128, 128)}
    labels = lambda b: [(s.label, fits) for s, fits in uniform_baselines(shapes, configs, Budget(bpw=b), 0)]
    assert labels(3.25) == [("w3g128", True), ("w3g64", False)]
    assert labels(3.4) == [("w3g64", True), ("w4g128", False)]
    assert labels(2.0) == [("w2g128", False)]
    assert labels(5.0) == [("w4g64", True)]


def test_shape_table_costs_follow_cost_model():
    t = shape_table(SHAPES, CONFIGS)
    assert t.cost_bits()[0, -1] == 16 * 64 * 64
