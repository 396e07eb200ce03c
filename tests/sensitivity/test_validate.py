import math

import numpy as np
import pytest
from scipy.stats import spearmanr

from mixbits.quant.spec import KEEP, QuantSpec
from mixbits.sensitivity.table import DamageTable
from mixbits.sensitivity.validate import ranking, validate_methods

W2, W3 = QuantSpec(2, 128), QuantSpec(3, 128)
CONFIGS = (W2, W3, KEEP)
UNITS = tuple(f"u{i}" for i in range(6))


def table(damage, method, scores=None):
    damage = np.column_stack([damage, np.zeros(len(UNITS))])
    return DamageTable(UNITS, ((8, 8),) * len(UNITS), CONFIGS, damage, method, scores or {})


def test_spearman_equals_scipy_over_units_and_configs():
    rng = np.random.default_rng(0)
    measured = table(rng.random((6, 2)), "ablation")
    pred = table(rng.random((6, 2)), "fisher")
    out = validate_methods({"fisher": pred}, measured, [W2, W3, KEEP], {"fisher": 2.0}, 4.0)
    r = out["methods"]["fisher"]
    assert r["spearman"] == pytest.approx(spearmanr(pred.damage[:, :2].ravel(), measured.damage[:, :2].ravel()).statistic)
    assert r["per_config"]["w3g128"] == pytest.approx(spearmanr(pred.damage[:, 1], measured.damage[:, 1]).statistic)
    assert r["pairs"] == 12 and r["cost_ratio"] == 0.5 and out["configs"] == ["w2g128", "w3g128"]


def test_nan_pairs_are_left_out():
    base = np.arange(12.0).reshape(6, 2)
    measured = table(base.copy(), "divergence")
    measured.damage[0, 0] = np.nan
    out = validate_methods({"a": table(base, "a")}, measured, [W2, W3], {"a": 1.0}, 1.0)
    assert out["methods"]["a"]["pairs"] == 11 and out["methods"]["a"]["spearman"] == pytest.approx(1.0)


def test_best_method_is_the_cheapest_within_tolerance_of_the_top():
    truth = np.arange(12.0).reshape(6, 2)
    measured = table(truth, "ablation")
    swapped = truth.copy()
    swapped.ravel()[[0, 1]] = swapped.ravel()[[1, 0]]  # rho just under 1
    far = truth.copy()
    far.ravel()[[0, 11]] = far.ravel()[[11, 0]]  # clearly worse
    tables = {"exact": table(truth, "exact"), "near": table(swapped, "near"), "far": table(far, "far")}
    costs = {"exact": 100.0, "near": 1.0, "far": 0.1}
    out = validate_methods(tables, measured, [W2, W3], costs, 1.0)
    rhos = {m: r["spearman"] for m, r in out["methods"].items()}
    assert rhos["exact"] - rhos["near"] < 0.02 < rhos["exact"] - rhos["far"]
    assert out["best_method"] == "near"
    assert validate_methods(tables, measured, [W2, W3], costs, 1.0, tolerance=0.0)["best_method"] == "exact"
    assert "0.02" in out["rule"]


def test_mismatched_units_or_configs_are_refused():
    measured = table(np.ones((6, 2)), "ablation")
    with pytest.raises(ValueError, match="w4g128"):
        validate_methods({"a": table(np.ones((6, 2)), "a")}, measured, [QuantSpec(4, 128)], {}, 1.0)
    other = DamageTable(("x",), ((8, 8),), CONFIGS, np.zeros((1, 3)), "b")
    with pytest.raises(ValueError, match="lacks units"):
        validate_methods({"b": other}, measured, [W2], {}, 1.0)


def test_ranking_most_sensitive_first_nan_last():
    t = table(np.zeros((6, 2)), "fisher", {"fisher_trace": np.array([1.0, 5.0, np.nan, 3.0, 0.0, 2.0])})
    ranked = ranking(t, "fisher_trace")
    assert [u for u, _ in ranked] == ["u1", "u3", "u5", "u0", "u4", "u2"] and math.isnan(ranked[-1][1])
    with pytest.raises(ValueError, match="fisher_trace"):
        ranking(t, "kl")
