"""The exact multiple-choice knapsack solver against brute force and an independent dp."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest

from mixbits.allocate import solver
from mixbits.allocate.solver import REL_TOL, BudgetError, Solution, feasible_range, solve_mckp


def brute_force(cost, damage, budget) -> Solution:
    """Every combination of available options; the least damage within the budget (ties: cheaper).

    Same feasibility rule as the solver: total <= budget + REL_TOL * |budget|.
    """
    cost, damage = np.asarray(cost, dtype=float), np.asarray(damage, dtype=float)
    avail = [np.flatnonzero(np.isfinite(c) & np.isfinite(d)) for c, d in zip(cost, damage)]
    combos = np.array(list(itertools.product(*avail)), dtype=np.int64).reshape(-1, len(avail))
    rows = np.arange(len(avail))
    totals, harms = cost[rows, combos].sum(axis=1), damage[rows, combos].sum(axis=1)
    ok = np.flatnonzero(totals <= budget + REL_TOL * abs(budget))
    if not ok.size:
        raise BudgetError(budget, totals.min(), totals.max())
    best = ok[np.lexsort((totals[ok], harms[ok]))[0]]
    return Solution(combos[best], float(totals[best]), float(harms[best]), True, "brute force")


def random_instance(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, bool]:
    """1-6 units x 1-5 options, integer or float costs, deliberate ties, some options unavailable."""
    units, options = int(rng.integers(1, 7)), int(rng.integers(1, 6))
    integer = bool(rng.random() < 0.5)
    if integer:
        cost = rng.integers(0, 8, (units, options)).astype(float)
    else:
        cost = np.round(rng.uniform(0, 8, (units, options)), int(rng.integers(1, 4)))
    if rng.random() < 0.5:
        damage = rng.integers(0, 4, (units, options)).astype(float)  # many exact ties
    else:
        damage = rng.exponential(1.0, (units, options))
    if options > 1 and rng.random() < 0.4:  # an exact duplicate option
        u, (a, b) = rng.integers(units), rng.choice(options, 2, replace=False)
        cost[u, b], damage[u, b] = cost[u, a], damage[u, a]
    off = rng.random((units, options)) < 0.2
    for u in np.flatnonzero(off.all(axis=1)):
        off[u, rng.integers(options)] = False
    target = np.where(rng.random((units, options)) < 0.5, cost, damage)
    target[off] = np.inf  # unavailable through either array
    return cost, damage, integer


def budgets(rng, cost, damage) -> list[float]:
    """From below the cheapest to above the richest, including exact totals of combinations."""
    finite = np.isfinite(cost) & np.isfinite(damage)
    lo = np.where(finite, cost, np.inf).min(axis=1).sum()
    hi = np.where(finite, cost, -np.inf).max(axis=1).sum()
    combo = [rng.choice(np.flatnonzero(f)) for f in finite]
    exact = float(cost[np.arange(len(cost)), combo].sum())
    return [lo - 0.5 - rng.random(), lo, exact, *rng.uniform(lo, hi, 2), hi, hi + 1.0]


def check(sol: Solution, cost, damage, budget, reference: Solution) -> None:
    rows = np.arange(len(cost))
    assert sol.choice.shape == (len(cost),) and sol.choice.dtype.kind == "i"
    assert np.isfinite(cost[rows, sol.choice]).all() and np.isfinite(damage[rows, sol.choice]).all()
    assert sol.cost == pytest.approx(cost[rows, sol.choice].sum(), rel=1e-12, abs=1e-12)
    assert sol.damage == pytest.approx(damage[rows, sol.choice].sum(), rel=1e-12, abs=1e-12)
    assert sol.cost <= budget + REL_TOL * abs(budget)
    assert sol.damage == pytest.approx(reference.damage, rel=1e-9, abs=1e-12)
    assert sol.optimal


@pytest.mark.parametrize("seed", range(300))
def test_random_small_instances_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    cost, damage, integer = random_instance(rng)
    methods = ("auto", "milp", "dp") if integer else ("auto", "milp")
    for budget in budgets(rng, cost, damage):
        try:
            reference = brute_force(cost, damage, budget)
        except BudgetError as expected:
            for method in methods:
                with pytest.raises(BudgetError) as err:
                    solve_mckp(cost, damage, budget, method=method)
                assert err.value.cheapest == pytest.approx(expected.cheapest, rel=1e-12)
                assert err.value.richest == pytest.approx(expected.richest, rel=1e-12)
                assert err.value.budget == budget
            continue
        for method in methods:
            check(solve_mckp(cost, damage, budget, method=method), cost, damage, budget, reference)


def test_unconstrained_ties_prefer_the_cheaper_option():
    cost = np.array([[3.0, 1.0, 2.0], [5.0, 5.0, 4.0]])
    damage = np.array([[0.0, 0.0, 1.0], [2.0, 2.0, 2.0]])
    sol = solve_mckp(cost, damage, 100.0)
    assert sol.choice.tolist() == [1, 2] and sol.cost == 5.0 and sol.method == "unconstrained"


def test_budget_error_names_the_reachable_range():
    cost = np.array([[1.0, 2.0, np.inf], [10.0, 30.0, 20.0]])
    assert feasible_range(cost) == (11.0, 32.0)
    with pytest.raises(BudgetError, match=r"cheapest reachable total cost 11\b.*\[11, 32\]") as err:
        solve_mckp(cost, np.ones_like(cost), 10.5)
    assert (err.value.cheapest, err.value.richest, err.value.budget) == (11.0, 32.0, 10.5)
    assert isinstance(err.value, ValueError)


def test_budget_at_exactly_the_cheapest_total():
    cost = np.array([[0.1, 0.7], [0.2, 0.9], [0.3, 0.4]])
    damage = np.array([[5.0, 1.0], [4.0, 1.0], [3.0, 1.0]])
    sol = solve_mckp(cost, damage, 0.1 + 0.2 + 0.3)  # 0.6000000000000001, not 0.6
    assert sol.choice.tolist() == [0, 0, 0] and sol.optimal


@pytest.mark.parametrize("seed", range(40))
def test_damages_spanning_fourteen_decades_are_solved_exactly(seed):
    """Units with damage ~1e-10 beside units with damage ~1e2: the choice among the tiny ones
    must still be the best, although it moves the total by far less than 1e-9 of it."""
    rng = np.random.default_rng(1000 + seed)
    units, options = 6, 4
    cost = rng.integers(1, 9, (units, options)).astype(float)
    tiny = np.arange(units) % 2 == 1
    damage = np.where(tiny, 1e-10, 1e2)[:, None] * rng.uniform(0.1, 1.0, (units, options))
    lo, hi = feasible_range(cost)
    # half the budgets leave the large units at their least damage, so only the tiny ones compete
    large_done = cost[~tiny].max(axis=1).sum() + cost[tiny].min(axis=1).sum()
    budget = float(rng.uniform(lo, hi) if seed % 2 else rng.uniform(large_done, hi))
    reference = brute_force(cost, damage, budget)
    for method in ("auto", "milp", "dp"):
        sol = solve_mckp(cost, damage, budget, method=method)
        assert sol.optimal and sol.cost <= budget
        assert sol.damage == pytest.approx(reference.damage, rel=1e-9)
        # The tiny units' part must be optimal for the budget the large units left them.
        left = budget - cost[~tiny, sol.choice[~tiny]].sum()
        best_tiny = brute_force(cost[tiny], damage[tiny], left).damage
        assert damage[tiny, sol.choice[tiny]].sum() == pytest.approx(best_tiny, rel=1e-9, abs=0)


def sensitivity_table(rng, units: int, integer_costs: bool) -> tuple[np.ndarray, np.ndarray]:
    """Like a real damage table: bits {2,3,4,5,6,8} x group {64,128} plus fp16 (13 options)."""
    configs = [(b, g) for b in (2, 3, 4, 5, 6, 8) for g in (64, 128)] + [(16, 0)]
    bpw = np.array([b + (32 / g if g else 0.0) for b, g in configs])
    if integer_costs:
        numel, per_weight = rng.integers(1, 4, units), 4 * bpw  # small integers, for the dp
    else:
        numel, per_weight = rng.choice([4096 * 4096, 4096 * 11008, 1024 * 4096], units), bpw
    cost = numel[:, None] * per_weight[None, :]
    shape = np.array([4.0 ** -b * (1.1 if g == 128 else 1.0) if g else 0.0 for b, g in configs])
    damage = numel[:, None] * rng.lognormal(0, 2, (units, 1)) * shape * rng.uniform(0.8, 1.2, (units, 13))
    return cost, damage


@pytest.mark.parametrize("units", [210, 560])
def test_table_sized_instances_are_optimal_and_match_the_dp(units):
    rng = np.random.default_rng(units)
    cost, damage = sensitivity_table(rng, units, integer_costs=True)
    lo, hi = feasible_range(cost)
    for frac in (0.05, 0.3):
        budget = lo + frac * (hi - lo)
        sol = solve_mckp(cost, damage, budget)
        assert sol.optimal and sol.cost <= budget
        assert sol.damage == pytest.approx(solve_mckp(cost, damage, budget, method="dp").damage, rel=1e-9)


def test_560_by_13_real_costs(capsys):
    rng = np.random.default_rng(7)
    cost, damage = sensitivity_table(rng, 560, integer_costs=False)
    lo, hi = feasible_range(cost)
    budget = lo + 0.25 * (hi - lo)
    start = time.perf_counter()
    sol = solve_mckp(cost, damage, budget)
    elapsed = time.perf_counter() - start
    with capsys.disabled():
        print(f"\n560 x 13: {elapsed * 1e3:.1f} ms via {sol.method}")
    assert sol.optimal and sol.cost <= budget
    assert sol.damage == pytest.approx(solve_mckp(cost, damage, budget, method="milp").damage, rel=1e-9)


def test_fallback_to_highs_when_the_state_list_grows(monkeypatch):
    rng = np.random.default_rng(3)
    cost, damage = sensitivity_table(rng, 120, integer_costs=True)
    lo, hi = feasible_range(cost)
    budget = lo + 0.3 * (hi - lo)
    exact = solve_mckp(cost, damage, budget, method="dp")
    monkeypatch.setattr(solver, "FRONTIER_MAX_STATES", 1)
    sol = solve_mckp(cost, damage, budget)
    assert sol.method == "milp" and sol.optimal
    assert sol.damage == pytest.approx(exact.damage, rel=1e-9)


def test_time_limit_gives_a_feasible_unproven_answer():
    rng = np.random.default_rng(4)
    cost, damage = sensitivity_table(rng, 200, integer_costs=False)
    lo, hi = feasible_range(cost)
    budget = lo + 0.3 * (hi - lo)
    sol = solve_mckp(cost, damage, budget, time_limit=0.0)
    assert not sol.optimal and sol.method == "greedy" and sol.cost <= budget
    assert sol.damage >= solve_mckp(cost, damage, budget).damage


def test_many_identical_units_with_tied_options():
    cost = np.tile([0.0, 1.0, 1.0, 2.0, 3.0], (300, 1))
    damage = np.tile([4.0, 2.0, 2.0, 1.0, 1.0], (300, 1))
    for budget in (0.0, 1.0, 299.0, 300.0, 451.0, 600.0):
        sol = solve_mckp(cost, damage, budget)
        assert sol.optimal and sol.cost <= budget
        assert sol.damage == pytest.approx(solve_mckp(cost, damage, budget, method="dp").damage, rel=1e-12)


@pytest.mark.parametrize(
    "cost, damage, budget, message",
    [
        ([[1.0, np.nan], [1.0, 2.0]], [[1.0, 0.0], [1.0, 0.0]], 3.0, r"cost\[0, 1\] = nan \(unit 0\)"),
        ([[1.0, 2.0], [1.0, 2.0]], [[1.0, 0.0], [np.nan, 0.0]], 3.0, r"damage\[1, 0\] = nan \(unit 1\)"),
        ([[1.0, -2.0]], [[1.0, 0.0]], 3.0, r"cost\[0, 1\] = -2.0"),
        ([[1.0, 2.0], [np.inf, 3.0]], [[1.0, 0.0], [1.0, np.inf]], 9.0, r"unit 1 has no available option"),
        ([1.0, 2.0], [1.0, 2.0], 3.0, r"\[units, options\].*\(2,\)"),
        ([[1.0, 2.0]], [[1.0, 2.0, 3.0]], 3.0, r"one shape.*\(1, 2\) and \(1, 3\)"),
        (np.zeros((0, 3)), np.zeros((0, 3)), 3.0, r"non-empty"),
        ([[1.0, 2.0]], [[1.0, 0.0]], float("nan"), r"budget must be a number"),
    ],
)
def test_bad_input_is_named(cost, damage, budget, message):
    with pytest.raises(ValueError, match=message):
        solve_mckp(cost, damage, budget)


def test_bad_method_and_non_integer_dp():
    with pytest.raises(ValueError, match=r"method='greedy' is not supported; use one of"):
        solve_mckp([[1.0, 2.0]], [[1.0, 0.0]], 1.5, method="greedy")
    with pytest.raises(ValueError, match=r"method='dp' needs integer costs"):
        solve_mckp([[1.0, 2.5], [1.0, 2.0]], [[1.0, 0.0], [1.0, 0.0]], 3.6, method="dp")
