"""The fixed-tier strategies: which layers get which bits."""

import pytest

from mixbits.classify.strategies import STRATEGIES, build_strategies, int4_count, sensitivity_order
from mixbits.quant.spec import QuantSpec


def test_order_is_most_sensitive_first_with_ties_in_model_order():
    assert sensitivity_order(["a", "b", "c", "d"], [0.1, 0.5, 0.1, -0.2]) == ["b", "a", "c", "d"]
    with pytest.raises(ValueError, match="one finite score per layer"):
        sensitivity_order(["a", "b"], [0.1, float("nan")])


def test_int4_count_is_clamped_to_leave_both_tiers():
    assert int4_count(10, 0.5) == 5 and int4_count(10, 0.01) == 1 and int4_count(10, 0.99) == 9
    with pytest.raises(ValueError, match="at least 2"):
        int4_count(1, 0.5)


def test_strategies_follow_the_order():
    order = ["l3", "l0", "l2", "l1", "l4"]  # most sensitive first
    plans = {s.name: s.specs for s in build_strategies(order, group_size=128, int4_fraction=0.4)}
    assert tuple(plans) == STRATEGIES
    w = {b: QuantSpec(b, 128) for b in (4, 6, 8)}
    assert set(plans["uniform_int8"].values()) == {w[8]} and len(plans["uniform_int8"]) == 5
    assert set(plans["uniform_int4"].values()) == {w[4]}
    assert plans["int6_int4"] == {"l3": w[6], "l0": w[6], "l2": w[6], "l1": w[4], "l4": w[4]}
    assert plans["int8_selective_int4"] == {"l3": w[8], "l0": w[8], "l2": w[8], "l1": w[4], "l4": w[4]}
    assert plans["least_sensitive_int4"] == {"l4": w[4]}


def test_per_channel_groups():
    plans = build_strategies(["a", "b"], group_size=None, int4_fraction=0.5)
    assert {s.label for p in plans for s in p.specs.values()} == {"w4pc", "w6pc", "w8pc"}
