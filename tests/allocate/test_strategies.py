import numpy as np
import pytest

from mixbits.allocate.optimal import Constraints, allocate_optimal, unit_groups
from mixbits.allocate.registry import BUDGETED, STRATEGIES, STRATEGY_HELP, predicted_damage, run_strategy
from mixbits.config import candidate_configs
from mixbits.plan import Plan
from mixbits.quant.spec import KEEP, QuantSpec
from mixbits.sensitivity.table import DamageTable

CONFIGS = candidate_configs((2, 3, 4, 5, 6, 8), (64, 128, 256))
LAYER = [("q", (64, 64)), ("k", (32, 64)), ("v", (32, 64)), ("o", (64, 64)),
         ("gate", (128, 64)), ("up", (128, 64)), ("down", (64, 128))]
NEEDS_BUDGET = {"optimal", "uniform", "greedy"}
FIXED = sorted(set(STRATEGIES) - BUDGETED)


def random_table(seed=0, layers=3, configs=CONFIGS):
    """Unequal shapes, q/k/v and gate/up tied, lognormal scores, damage ~ score * 4^-bits."""
    rng = np.random.default_rng(seed)
    units = [f"l{i}.{n}" for i in range(layers) for n, _ in LAYER]
    shapes = [s for _ in range(layers) for _, s in LAYER]
    tied = [t for i in range(layers) for t in ((f"l{i}.q", f"l{i}.k", f"l{i}.v"), (f"l{i}.gate", f"l{i}.up"))]
    score = rng.lognormal(0.0, 1.5, len(units))
    bits = np.array([c.bits for c in configs])
    group = np.array([c.group_size or 4096 for c in configs])
    noise = rng.uniform(0.5, 2.0, (len(units), len(configs)))
    damage = score[:, None] * noise * np.where(bits == 16, 0.0, 4.0 ** -bits * (1 + group / 512))[None, :]
    table = DamageTable(tuple(units), tuple(shapes), configs, damage, "test", scores={"s": score})
    return table, unit_groups(table.units, tied, True)


def small_table(scores, shape=(64, 64), configs=CONFIGS):
    """Independent units of one shape with the given scores (no ties)."""
    units = tuple(f"u{i}" for i in range(len(scores)))
    table = DamageTable(units, (shape,) * len(units), configs, np.zeros((len(units), len(configs))), "test",
                        scores={"s": np.asarray(scores, float)})
    return table, [(u,) for u in units]


def bits_of(result):
    return [s.bits for s in result.specs.values()]


def run(name, table, groups, bpw=None, **kw):
    budget = None if bpw is None else bpw * table.numels().sum()
    return run_strategy(name, table, groups, budget, **kw)


@pytest.mark.parametrize("bpw", [None, 3.0, 4.5])
@pytest.mark.parametrize("name", list(STRATEGIES))
def test_every_strategy_gives_a_valid_plan_with_tied_units_sharing_a_config(name, bpw):
    table, groups = random_table()
    shapes = dict(zip(table.units, table.shapes))
    if bpw is None and name in NEEDS_BUDGET:
        with pytest.raises(ValueError, match="needs"):
            run(name, table, groups)
        return
    r = run(name, table, groups, bpw)
    Plan(r.specs).validate(shapes)
    assert list(r.specs) == list(table.units) and all(s in CONFIGS for s in r.specs.values())
    for g in groups:
        assert len({r.specs[m] for m in g}) == 1
    assert r.bpw == pytest.approx(Plan(r.specs).bits_per_weight(shapes), rel=1e-12)
    assert r.rule and name in STRATEGY_HELP


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("bpw", [2.6, 3.0, 3.5, 4.25, 5.0, 6.5])
def test_budgeted_strategies_meet_reachable_budgets_and_never_exceed_them(seed, bpw):
    table, groups = random_table(seed)
    for name in sorted(BUDGETED):
        r = run(name, table, groups, bpw)
        assert r.target_bpw == pytest.approx(bpw)
        assert r.miss == 0.0 and r.meets_target, (name, r.bpw)
        assert r.bpw <= bpw * (1 + 1e-9), name
        assert r.bpw > bpw - 1.0, name  # they use the budget, not just fit under it


@pytest.mark.parametrize("bpw", [2.2, 3.0, 4.0, 16.0])
def test_fixed_tiers_report_by_how_much_they_miss(bpw):
    table, groups = random_table(2)
    missed = 0
    for name in FIXED:
        r = run(name, table, groups, bpw)
        over = r.bpw - bpw
        assert r.miss == (pytest.approx(over) if over > 1e-9 * bpw else 0.0), name
        assert r.meets_target == (r.miss == 0.0)
        missed += r.miss > 0
    assert (missed > 0) == (bpw < 16)  # tiers ignore the budget: low targets are missed


def test_cheapest_reachable_plan_above_budget_is_reported_as_a_miss():
    table, groups = random_table()
    for name in ("greedy", "power_law", "adaptive", "uniform"):
        r = run(name, table, groups, 1.5)
        assert r.miss == pytest.approx(r.bpw - 1.5) and r.miss > 0, name


def test_presets_without_budget_report_against_their_nominal_targets():
    table, groups = random_table()
    for name, target in (("conservative", 5.0), ("adaptive", 4.0), ("aggressive", 3.0)):
        r = run(name, table, groups)
        assert r.target_bpw == target and "nominal target" in r.rule
    assert run("adaptive", table, groups).miss == 0.0


def test_power_law_follows_its_formula_with_ties_rounding_up():
    table, groups = small_table([0.0, 0.25, 1.0])
    assert bits_of(run("power_law", table, groups, alpha=0.5)) == [2, 5, 8]  # 2 + 6 * (0, .5, 1)
    assert bits_of(run("power_law", table, groups, alpha=1.0)) == [2, 4, 8]  # 3.5 is a tie: up
    assert bits_of(run("power_law", table, groups, alpha=2.0)) == [2, 2, 8]  # 2.375 -> 2
    assert {s.group_size for s in run("power_law", table, groups, group_size=64).specs.values()} == {64}


def test_power_law_budget_shifts_the_curve_to_the_richest_fitting_plan():
    table, groups = random_table()
    free = run("power_law", table, groups)
    exact = run_strategy("power_law", table, groups, free.bpw * table.numels().sum())
    assert dict(exact.specs) == dict(free.specs)  # the t = 0 plan is the largest offset at its own cost
    low = run("power_law", table, groups, 3.0)
    assert low.bpw <= 3.0 and "-" in low.rule.split("n^0.5 ")[1][:2]


def test_quantile_thresholds_follow_the_score_distribution():
    table, groups = small_table(np.arange(1.0, 21.0))
    # quantiles of 1..20: q.15 = 3.85, q.30 = 6.7, q.60 = 12.4, q.80 = 16.2; strictly above -> next tier
    expected = [2] * 3 + [3] * 3 + [4] * 6 + [6] * 4 + [8] * 4
    assert bits_of(run("quantile", table, groups)) == expected
    assert "q0.15=3.85" in run("quantile", table, groups).rule


def test_int_tier_rules_follow_their_thresholds():
    table, groups = small_table([1, 2, 3, 4, 5, 6, 7, 8])  # mean 4.5, std 2.29
    w4, w8 = QuantSpec(4, 128), QuantSpec(8, 128)

    def specs(name):
        return list(run(name, table, groups).specs.values())

    assert specs("adaptive_threshold") == [w4] * 3 + [w8] + [KEEP] * 4  # >= 4.5 keep, >= 3.35 INT8
    assert specs("percentile") == [w4] * 2 + [w8] * 2 + [KEEP] * 4  # p25 = 2.75, p50 = 4.5
    assert specs("exponential") == [w4] * 3 + [w8] * 2 + [KEEP] * 3  # e >= .5 <=> n >= .653 (s >= 5.57)
    assert specs("threshold_conservative") == [w8] * 3 + [KEEP] * 5  # >= 3.93
    assert specs("threshold_aggressive") == [w4] * 3 + [w8] * 2 + [KEEP] * 3  # [3.93, 5.07) INT8
    assert specs("int4_only") == [w4] * 8 and specs("int8_only") == [w8] * 8


def test_presets_follow_seed_tiers_for_bits_and_group_sizes():
    table, groups = small_table(np.arange(11.0))  # n = s / 10
    cons = run("conservative", table, groups)
    assert bits_of(cons) == [4] * 5 + [6] * 3 + [8] * 3
    assert [s.group_size for s in cons.specs.values()] == [256] * 6 + [128] * 3 + [64] * 2
    assert bits_of(run("aggressive", table, groups)) == [2] * 5 + [4] * 3 + [6] * 2 + [8]


def test_adaptive_keeps_its_quantile_start_when_that_fits_exactly():
    table, groups = small_table(np.arange(1.0, 21.0))
    n = (np.arange(1.0, 21.0) - 1) / 19
    p = np.sqrt(n)
    edges = np.quantile(p, (0.15, 0.30, 0.60, 0.80))
    start = np.array([2, 3, 4, 6, 8])[(p[:, None] > edges).sum(axis=1)]
    group = np.where(n > 0.8, 64, np.where(n > 0.5, 128, 256))
    specs = {u: QuantSpec(int(b), int(g)) for u, b, g in zip(table.units, start, group)}
    budget = Plan(specs).storage_bytes(dict(zip(table.units, table.shapes))) * 8
    r = run_strategy("adaptive", table, groups, budget)
    assert dict(r.specs) == specs and r.miss == 0.0
    tighter = run_strategy("adaptive", table, groups, budget * 0.8)
    assert tighter.bpw * table.numels().sum() <= budget * 0.8
    lowered = [u for u in table.units if tighter.specs[u].bits < specs[u].bits]
    assert lowered and min(table.units.index(u) for u in lowered) <= 5  # least sensitive go down first


def test_greedy_takes_the_best_gain_per_stored_bit_first():
    configs = candidate_configs((2, 3, 4), (64,))
    table = DamageTable(("a", "b"), ((32, 64), (128, 64)), configs, np.zeros((2, len(configs))), "test",
                        scores={"s": np.array([1.0, 2.0])})  # gain/bit: a 1/2048 > b 2/8192
    cost = table.cost_bits()
    step_a, step_b = cost[0, 1] - cost[0, 0], cost[1, 1] - cost[1, 0]
    base = cost[0, 0] + cost[1, 0]
    r = run_strategy("greedy", table, [("a",), ("b",)], base + step_a)
    assert bits_of(r) == [3, 2]
    r = run_strategy("greedy", table, [("a",), ("b",)], base + step_b, score="s")
    assert bits_of(r) == [4, 2]  # a first (3, then 4); b's step no longer fits
    table8 = DamageTable(table.units, table.shapes, configs, table.damage, "test", scores={"s": np.array([1.0, 8.0])})
    assert bits_of(run_strategy("greedy", table8, [("a",), ("b",)], base + step_b)) == [2, 3]  # b: 8/8192 > 1/2048


def test_missing_configs_snap_to_the_nearest_available():
    configs = candidate_configs((2, 4, 8), (64, 256))
    table, groups = small_table([1.0, 2.0], shape=(64, 512), configs=configs)
    assert set(run("int4_only", table, groups).specs.values()) == {QuantSpec(4, 256)}  # g128: tie -> cheaper
    assert set(run("uniform", table, groups, spec=QuantSpec(3, 64)).specs.values()) == {QuantSpec(4, 64)}
    capped = run("int8_only", table, groups, constraints=Constraints(max_bits=4))
    assert {s.bits for s in capped.specs.values()} == {4} and "nearest allowed" in capped.rule
    no_keep = run("percentile", table, groups, constraints=Constraints(max_bits=8))
    assert max(bits_of(no_keep)) == 8


@pytest.mark.parametrize("name", [n for n in STRATEGIES if n != "optimal"])
def test_keep_and_pins_are_respected(name):
    table, groups = random_table()
    pin = ("l1.o", QuantSpec(3, 64))
    r = run(name, table, groups, 4.0, constraints=Constraints(keep=r"l0\.down", pins=(pin,)))
    assert r.specs["l0.down"] == KEEP and r.specs["l1.o"] == pin[1]


@pytest.mark.parametrize("seed", [0, 3, 4])
def test_optimal_damage_is_at_most_every_heuristics_at_its_achieved_size(seed):
    table, groups = random_table(seed)
    numel = table.numels().sum()
    for bpw in (None, 2.6, 3.5, 5.0):
        for name in STRATEGIES:
            if name == "optimal" or (bpw is None and name in NEEDS_BUDGET):
                continue
            r = run(name, table, groups, bpw)
            specs, solution = allocate_optimal(table, groups, r.bpw * numel)
            heuristic = predicted_damage(table, r.specs)
            assert solution.damage == pytest.approx(predicted_damage(table, specs), rel=1e-12)
            assert solution.damage <= heuristic * (1 + 1e-12), (name, bpw)


def test_optimal_through_the_registry_matches_allocate_optimal():
    table, groups = random_table()
    budget = 3.25 * table.numels().sum()
    r = run_strategy("optimal", table, groups, budget)
    specs, _ = allocate_optimal(table, groups, budget)
    assert dict(r.specs) == specs and r.miss == 0.0 and "proven optimal" in r.rule


def test_unknown_strategy_lists_the_names():
    table, groups = random_table()
    with pytest.raises(ValueError, match=r"unknown strategy 'fastest'; choose one of optimal, uniform, .*greedy"):
        run_strategy("fastest", table, groups, None)


def test_scores_groups_and_parameters_are_checked():
    table, groups = random_table()
    with pytest.raises(ValueError, match=r"score 'hessian' is not in this table; use one of \['s'\]"):
        run("quantile", table, groups, score="hessian")
    r = run("quantile", table, groups, score="damage:w4g128")
    assert "damage:w4g128" in r.rule
    with pytest.raises(ValueError, match="not a candidate config"):
        run("quantile", table, groups, score="damage:w4g32")
    nan = DamageTable(table.units, table.shapes, table.configs, table.damage, "t",
                      scores={"s": np.where(np.arange(len(table.units)) == 2, np.nan, 1.0)})
    with pytest.raises(ValueError, match=r"NaN/inf for 1 unit\(s\), e.g. \['l0.v'\]"):
        run("quantile", nan, groups)
    with pytest.raises(ValueError, match="exactly once"):
        run("quantile", table, groups[1:])
    with pytest.raises(ValueError, match="alpha=0"):
        run("power_law", table, groups, alpha=0)


def test_tied_groups_use_their_most_sensitive_member():
    table, _ = small_table([1.0, 10.0, 2.0, 3.0])
    r = run("conservative", table, [("u0", "u1"), ("u2",), ("u3",)])
    assert bits_of(r)[:2] == [8, 8]  # u0 rides with u1's score


def test_block_tables_are_priced_by_their_members():
    from mixbits.model.arch import LinearInfo
    from mixbits.sensitivity.units import block_table

    linears = {f"b{b}.{n}": LinearInfo(f"b{b}.{n}", b, o, i, False)
               for b in range(4) for n, (o, i) in (("q", (64, 64)), ("down", (64, 200)))}
    units = {f"b{b}": (f"b{b}.q", f"b{b}.down") for b in range(4)}
    table = block_table(units, linears, CONFIGS, np.zeros((4, len(CONFIGS))), "test",
                        scores={"s": np.array([1.0, 4.0, 2.0, 3.0])})
    groups = [(u,) for u in table.units]
    for name in STRATEGIES:
        r = run(name, table, groups, 4.0)
        members = {m: r.specs[u] for u, ms in units.items() for m in ms}
        shapes = {n: (li.out_features, li.in_features) for n, li in linears.items()}
        assert r.bpw == pytest.approx(Plan(members).bits_per_weight(shapes), rel=1e-12), name
