import math

import pytest

from mixbits.config import SCHEDULES
from mixbits.quant.spec import QuantSpec
from mixbits.train.schedule import (
    BlockSchedule, block_bits, block_schedule, block_sensitivity, model_schedules, normalise_scores)

S = (0.0, 0.25, 0.5, 1.0)


def one(name, s, base=2.0, patience=None, above=False):
    return block_schedule(name, s, base_epochs=base, base_patience=patience, above_mean_bits=above)


@pytest.mark.parametrize("s", S)
def test_formulas(s):
    assert one("fixed", s, patience=3) == BlockSchedule(2.0, 1.0, 3)
    lin = one("linear", s, patience=3)
    assert lin.epochs == pytest.approx(2 * (1 + s)) and lin.lr_scale == pytest.approx(1 + 0.5 * (s - 0.5))
    assert lin.patience == 3
    sq = one("sqrt", s)
    assert sq.epochs == pytest.approx(2 * (1 + math.sqrt(s)))
    assert sq.lr_scale == pytest.approx(1 / (1 + 0.5 * s)) and sq.patience == pytest.approx(2 + 3 * s)
    con = one("conservative", s)
    assert con.epochs == pytest.approx(2 * (1 + 0.25 * s)) and con.lr_scale == 1.0 and con.patience is None
    assert one("joint", s, above=False) == sq
    joint = one("joint", s, above=True)
    assert joint.epochs == pytest.approx(1.3 * sq.epochs) and joint.lr_scale == pytest.approx(1.2 * sq.lr_scale)
    assert joint.patience == pytest.approx(sq.patience + 2)


def test_conservative_spans_one_to_one_and_a_quarter():
    assert one("conservative", 0.0).epochs == 2.0 and one("conservative", 1.0).epochs == 2.5


def test_model_schedules_joint_uses_the_plan_mean_and_budget_rescales():
    s, bits = [0.0, 1.0, 0.5], [2.0, 4.0, 3.0]
    out = model_schedules("joint", s, bits, base_epochs=2.0, base_patience=None, mean_bits=3.0)
    assert out[1] == one("joint", 1.0, above=True) and out[2] == one("joint", 0.5, above=False)
    for name in SCHEDULES:
        scaled = model_schedules(name, s, bits, base_epochs=2.0, base_patience=None, mean_bits=3.0,
                                 total_epoch_budget=True)
        plain = model_schedules(name, s, bits, base_epochs=2.0, base_patience=None, mean_bits=3.0)
        assert sum(x.epochs for x in scaled) == pytest.approx(6.0)
        ratios = [a.epochs / b.epochs for a, b in zip(scaled, plain)]
        assert ratios == pytest.approx([ratios[0]] * 3)  # one common factor: the shape is kept
        assert [x.lr_scale for x in scaled] == [x.lr_scale for x in plain]


def test_normalise_and_errors():
    assert normalise_scores([3.0, 1.0, 2.0]) == [1.0, 0.0, 0.5]
    assert normalise_scores([5.0, 5.0]) == [0.0, 0.0]
    with pytest.raises(ValueError, match="finite"):
        normalise_scores([1.0, float("nan")])
    with pytest.raises(ValueError, match="sqrt.*sensitivity"):
        model_schedules("sqrt", None, [3.0], base_epochs=2, base_patience=None)
    with pytest.raises(ValueError, match="one of fixed"):
        one("cubic", 0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        one("sqrt", 1.5)


def test_block_bits_is_numel_weighted():
    specs = {"a": QuantSpec(2, 64), "b": QuantSpec(4, 64), "c": QuantSpec(16, None)}
    bits, mean = block_bits(specs, {"a": 0, "b": 0, "c": 1}, {"a": 300, "b": 100, "c": 100}, 3)
    assert bits == [2.5, 16.0, 16.0] and mean == pytest.approx((600 + 400 + 1600) / 500)


def test_block_sensitivity_sums_linears():
    assert block_sensitivity({"a": 1.0, "b": 2.5, "c": 4.0}, {"a": 0, "b": 0, "c": 1}) == {0: 3.5, 1: 4.0}
    with pytest.raises(ValueError, match="'z'"):
        block_sensitivity({"z": 1.0}, {"a": 0})
