"""The iterative mode's order (least predicted damage first) and its stop rule."""

import numpy as np
import pytest

from mixbits.allocate.iterative import exceeds, sensitivity_order
from mixbits.quant.spec import KEEP, QuantSpec
from mixbits.sensitivity.table import DamageTable

W4 = QuantSpec(4, 32)


def test_stop_rule_boundary_and_nan():
    assert not exceeds(10.1, 10.0, 0.01 + 1e-12)
    assert exceeds(10.2, 10.0, 0.01)
    assert exceeds(float("nan"), 10.0, 0.5)
    assert not exceeds(9.0, 10.0, 0.01)  # better than the original is always kept


def test_order_is_by_damage_at_the_spec_summed_over_tied_groups():
    units = ("a", "b", "c", "d")
    configs = (QuantSpec(2, 32), W4, KEEP)
    damage = np.array([[9, 4, 0], [1, 3, 0], [0, 1, 0], [5, 0.5, 0]], dtype=float)
    table = DamageTable(units=units, shapes=((4, 32),) * 4, configs=configs, damage=damage, method="fisher")
    groups = [("a",), ("b", "c"), ("d",)]  # b+c = 4 at w4: ties with a, which comes first in model order
    assert sensitivity_order(table, groups, W4) == [("d",), ("a",), ("b", "c")]
    with pytest.raises(ValueError, match="no column for w8g32"):
        sensitivity_order(table, groups, QuantSpec(8, 32))
