"""`predicted_damage`: the one price of a plan on a damage table (run, sweep, ablate, allocate and
results.json all call it)."""

import numpy as np
import pytest

from mixbits.allocate.registry import predicted_damage
from mixbits.errors import UserError
from mixbits.plan import Plan
from mixbits.quant.spec import KEEP, QuantSpec
from mixbits.sensitivity.table import DamageTable

W2, W4, W8 = QuantSpec(2, 64), QuantSpec(4, 64), QuantSpec(8, 64)


def table(configs=(W2, W4, KEEP)) -> DamageTable:
    # keep costs something here, so that a unit priced as "keep" is told apart from one left out of the sum
    damage = np.array([[9.0, 3.0, 0.5], [7.0, 2.0, 0.25], [5.0, 1.0, 0.125]])[:, : len(configs)]
    return DamageTable(("a", "b", "c"), ((8, 64),) * 3, configs, damage, "test")


def test_sums_the_chosen_column_of_every_unit():
    assert predicted_damage(table(), {"a": W2, "b": W4, "c": KEEP}) == 9.0 + 2.0 + 0.125


def test_a_unit_the_plan_leaves_out_is_priced_as_kept():
    plan = Plan({"a": W4})
    assert predicted_damage(table(), plan.specs) == 3.0 + 0.25 + 0.125


def test_a_spec_outside_the_table_is_an_error_not_a_keep():
    with pytest.raises(UserError, match=r"b: the plan gives it w8g64, which is not a config of the damage table"):
        predicted_damage(table(), {"a": W2, "b": W8})


def test_leaving_a_unit_out_of_a_table_without_keep_is_an_error():
    with pytest.raises(UserError, match=r"c: the plan leaves it in 16 bit"):
        predicted_damage(table((W2, W4)), {"a": W2, "b": W4})
