"""ggml types as allocation candidates: offered to a layer only where its row length allows them."""

import itertools

import numpy as np
import pytest

from mixbits.allocate.budget import Budget
from mixbits.allocate.feasibility import check_budget
from mixbits.allocate.optimal import Constraints, allocate_optimal, storable
from mixbits.config import AllocationConfig
from mixbits.errors import UserError
from mixbits.plan import Plan
from mixbits.quant.spec import GGML_TYPES, KEEP, GGMLSpec
from mixbits.sensitivity.table import DamageTable

SHAPES = {"b0.wide": (32, 256), "b0.odd": (32, 576), "b1.wide": (16, 512), "b1.odd": (64, 576)}


def ggml_table(candidates="gguf", seed=0):
    configs = AllocationConfig(target_bpw=4.0, candidates=candidates).configs()
    rng = np.random.default_rng(seed)
    bits = np.array([8.0 * 32 / 2 ** c.bits if not c.keep else 0.0 for c in configs])  # fewer bits, more damage
    legacy = np.array([2.0 if isinstance(c, GGMLSpec) and c.block == 32 else 1.0 for c in configs])  # coarser grids
    damage = rng.uniform(0.7, 1.4, (len(SHAPES), len(configs))) * bits * legacy
    shapes = tuple(SHAPES.values())
    fits = np.array([[not isinstance(c, GGMLSpec) or c.fits(i) for c in configs] for _, i in shapes])
    damage[~fits] = np.nan  # what a damage function writes for a type the layer cannot take
    return DamageTable(tuple(SHAPES), shapes, configs, damage, "test")


def brute(table, budget_bits):
    cost, best = table.cost_bits(), (np.inf, None)
    for choice in itertools.product(range(len(table.configs)), repeat=len(table.units)):
        c = sum(cost[u, j] for u, j in enumerate(choice))
        d = sum(table.damage[u, j] for u, j in enumerate(choice))
        if c <= budget_bits and np.isfinite(d) and d < best[0]:
            best = (d, choice)
    return best


def test_candidate_sets():
    affine = AllocationConfig(target_bpw=4.0).configs()
    gguf = AllocationConfig(target_bpw=4.0, candidates="gguf").configs()
    both = AllocationConfig(target_bpw=4.0, candidates="both").configs()
    assert not any(isinstance(c, GGMLSpec) for c in affine) and affine[-1] == KEEP
    assert set(gguf) == set(GGML_TYPES.values()) | {KEEP} and gguf[-1] == KEEP
    assert set(both) == set(affine) | set(gguf) and len(both) == len(affine) + len(GGML_TYPES)
    with pytest.raises(UserError, match="allocation.candidates.*'ggml'.*affine, gguf, both"):
        AllocationConfig(target_bpw=4.0, candidates="ggml")


def test_costs_of_types_a_row_cannot_take_are_inf_and_masked():
    table = ggml_table()
    fits = storable(table)
    q4k = table.configs.index(GGML_TYPES["Q4_K"])
    q8 = table.configs.index(GGML_TYPES["Q8_0"])
    assert list(fits[:, q4k]) == [True, False, True, False] and fits[:, q8].all()
    cost = table.cost_bits()
    assert np.isinf(cost[1, q4k]) and cost[0, q4k] == 8 * 32 * 144  # 32 rows, one Q4_K block each


@pytest.mark.parametrize("bpw", [4.1, 4.6, 5.2, 6.0, 8.0, 9.0])
@pytest.mark.parametrize("candidates", ["gguf", "both"])
def test_solver_never_gives_a_k_quant_to_a_576_row_and_meets_the_budget(bpw, candidates):
    table = ggml_table(candidates, seed=int(bpw * 10))
    numel = int(table.numels().sum())
    budget = bpw * numel
    specs, solution = allocate_optimal(table, [(u,) for u in table.units], budget)
    for name, spec in specs.items():
        if SHAPES[name][1] == 576:
            assert not (isinstance(spec, GGMLSpec) and spec.block == 256), (name, spec)
    plan = Plan(specs)
    plan.validate(SHAPES)
    assert 8 * plan.storage_bytes(SHAPES) <= budget
    if bpw <= 5.2 and candidates == "gguf":  # the wide rows take K-quants (the budget is too tight for Q8_0 or 16 bit there)
        assert any(isinstance(s, GGMLSpec) and s.block == 256 for n, s in specs.items() if "wide" in n), specs
    if candidates == "gguf":
        assert all(isinstance(s, GGMLSpec) or s.keep for s in specs.values())
        expected, _ = brute(table, budget)
        assert solution.damage == pytest.approx(expected)


def test_the_cheapest_576_plan_is_a_legacy_type_and_the_budget_check_knows_it():
    table = ggml_table()
    # the cheapest storable choice per row: Q2_K on 256/512 rows, Q4_0 or IQ4_NL (4.5 bpw) on 576 rows
    cheapest = 8 * (32 * 1 * 84 + 32 * 18 * 18 + 16 * 2 * 84 + 64 * 18 * 18)  # Q2_K 84 B / 256, Q4_0 18 B / 32
    specs, solution = allocate_optimal(table, [(u,) for u in table.units], cheapest)
    assert solution.cost == cheapest
    assert {specs["b0.odd"].name, specs["b1.odd"].name} <= {"Q4_0", "IQ4_NL"}  # the two 18-byte types of 32
    assert specs["b0.wide"] == specs["b1.wide"] == GGML_TYPES["Q2_K"]
    numel = int(table.numels().sum())
    with pytest.raises(UserError, match="cannot be met"):
        check_budget(SHAPES, table.configs, [(u,) for u in SHAPES], Constraints(), Budget(bpw=(cheapest - 8) / numel), 0)


def test_a_pin_to_a_k_quant_a_row_cannot_take_is_refused_naming_the_layers_and_what_they_can_take():
    table = ggml_table()
    with pytest.raises(UserError, match=r"--pin odd=q4_k: 2 matched layer\(s\) cannot store q4_k") as err:
        allocate_optimal(table, [(u,) for u in table.units], 8.0 * table.numels().sum(),
                         Constraints(pins=(("odd", GGML_TYPES["Q4_K"]),)))
    assert "b0.odd" in str(err.value) and "q4_0" in str(err.value) and "q2_k" not in str(err.value)


def test_a_pin_to_a_ggml_type_is_read_from_its_label_and_obeyed():
    table = ggml_table()
    pin = Constraints.parse_pin("wide=q6_k")
    assert pin == ("wide", GGML_TYPES["Q6_K"])
    specs, _ = allocate_optimal(table, [(u,) for u in table.units], 8.0 * table.numels().sum(),
                                Constraints(pins=(pin,)))
    assert specs["b0.wide"] == specs["b1.wide"] == GGML_TYPES["Q6_K"]


def test_a_ggml_pin_on_affine_candidates_says_to_plan_over_ggml_types():
    from mixbits.allocate.optimal import allowed_options

    with pytest.raises(UserError, match="--candidates gguf"):
        allowed_options(ggml_table("affine"), Constraints(pins=(("wide", GGML_TYPES["Q4_K"]),)))


def test_ggml_table_round_trips_through_its_file(tmp_path):
    table = ggml_table("both")
    table.save(tmp_path / "t.json")
    again = DamageTable.load(tmp_path / "t.json")
    assert again.configs == table.configs
    assert np.array_equal(np.isnan(again.damage), np.isnan(table.damage))


def test_uniform_baselines_are_only_types_every_layer_can_take():
    from mixbits.allocate.feasibility import uniform_baselines

    configs = AllocationConfig(target_bpw=4.0, candidates="gguf").configs()
    numel = sum(o * i for o, i in SHAPES.values())
    out = uniform_baselines(SHAPES, configs, Budget(bpw=5.2), 0)
    assert [(c.name, fits) for c, fits in out] == [("Q4_1", True), ("Q5_0", False)]  # 5.0 and 5.5 bpw
    assert all(c.block == 32 for c, _ in out) and numel > 0


@pytest.mark.parametrize("name", sorted(__import__("mixbits.allocate.registry", fromlist=["x"]).STRATEGIES))
def test_every_strategy_gives_only_types_a_row_can_take(name):
    from mixbits.allocate.registry import run_strategy

    base = ggml_table()
    table = DamageTable(base.units, base.shapes, base.configs, base.damage, "test",
                        scores={"s": np.array([1.0, 2.0, 3.0, 4.0])})
    result = run_strategy(name, table, [(u,) for u in table.units], 5.0 * table.numels().sum())
    Plan(result.specs).validate(SHAPES)  # raises for a ggml type a row cannot split
    assert all(isinstance(s, GGMLSpec) or s.keep for s in result.specs.values())


def test_a_run_over_ggml_candidates_with_block_ap_is_accepted_and_e2e_refused_up_front():
    """`mixbits run` stores ggml layers in its native folder (tests/cli/test_run_gguf.py) and Block-AP trains
    their grids (tests/train/test_ggml.py); E2E-QP trains affine step sizes only, so --e2e with ggml candidates
    is refused before any work, naming the field."""
    from mixbits.config import AllocationConfig, RunConfig, TrainConfig
    from mixbits.errors import UserError

    for candidates in ("gguf", "both"):
        allocation = AllocationConfig(target_bpw=4.0, candidates=candidates)
        assert RunConfig(model="x", allocation=allocation).allocation.candidates == candidates
        assert RunConfig(model="x", quantizer="gptq", allocation=allocation, train=TrainConfig(init="gptq")).train
        with pytest.raises(UserError, match="allocation.candidates.*E2E-QP.*affine step sizes"):
            RunConfig(model="x", quantizer="gptq", allocation=allocation, train=TrainConfig(init="gptq", e2e=True))
    assert RunConfig(model="x", allocation=AllocationConfig(target_bpw=4.0)).allocation.candidates == "affine"


def test_default_score_of_a_ggml_table_without_scores_is_a_type_every_layer_takes():
    from mixbits.allocate.strategies import select_score

    table = ggml_table()  # K-quants are NaN on the 576-rows
    name, values = select_score(table)
    first = next(j for j, c in enumerate(table.configs) if not c.keep and np.isfinite(table.damage[:, j]).all())
    assert table.configs[first].block == 32 and np.isnan(table.damage[:, 0]).any()
    assert name == f"damage:{table.configs[first].label}"
    np.testing.assert_array_equal(values, table.damage[:, first])
