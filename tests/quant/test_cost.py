"""The cost model counts exactly the bytes that QuantLinear stores."""

from __future__ import annotations

import pytest
import torch

from mixbits.quant.cost import layer_bits_per_weight, layer_storage_bytes, num_groups
from mixbits.quant.qlinear import QuantLinear
from mixbits.quant.spec import KEEP, QUANT_BITS, VALID_GROUP_SIZES, QuantSpec

SHAPES = ((1, 1), (3, 7), (5, 200), (17, 333), (8, 256))
SPECS = [QuantSpec(b, g, s) for b in QUANT_BITS for g in VALID_GROUP_SIZES for s in (False, True)]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.label)
def test_cost_equals_packed_layer_bytes(spec):
    gen = torch.Generator().manual_seed(spec.bits)
    for out_features, in_features in SHAPES:
        w = torch.randn(out_features, in_features, generator=gen)
        layer = QuantLinear.from_weight(w, torch.randn(out_features, generator=gen), spec)
        stored = sum(t.nbytes for k, t in layer.state_dict().items() if k != "bias")
        expected = layer_storage_bytes(out_features, in_features, spec)
        assert layer.storage_bytes() == stored == expected, (out_features, in_features)


def test_hand_computed_example():
    # w3g128 on [3, 200]: codes ceil(600*3/8)=225, G=2 -> scales 2*6=12, zeros ceil(6*3/8)=3.
    assert layer_storage_bytes(3, 200, QuantSpec(3, 128)) == 225 + 12 + 3
    assert layer_storage_bytes(3, 200, QuantSpec(3, 128, symmetric=True)) == 225 + 12
    assert layer_storage_bytes(3, 200, QuantSpec(3, None)) == 225 + 6 + 2


def test_bits_per_weight():
    assert layer_bits_per_weight(4096, 4096, QuantSpec(4, 128)) == 4 + (16 + 4) / 128
    assert layer_bits_per_weight(4096, 4096, QuantSpec(4, 128, symmetric=True)) == 4 + 16 / 128
    assert layer_bits_per_weight(4096, 4096, QuantSpec(2, 32)) == 2 + 18 / 32
    assert layer_bits_per_weight(4096, 11008, KEEP) == 16
    assert layer_storage_bytes(7, 9, KEEP) == 2 * 7 * 9


def test_num_groups():
    assert num_groups(200, 64) == 4
    assert num_groups(256, 64) == 4
    assert num_groups(100, 128) == 1
    assert num_groups(4096, None) == 1
    with pytest.raises(ValueError, match="in_features=0"):
        num_groups(0, 64)
    with pytest.raises(ValueError, match="group_size=0"):
        num_groups(10, 0)


def test_rejects_empty_layer():
    with pytest.raises(ValueError, match=r"\[0, 5\]"):
        layer_storage_bytes(0, 5, QuantSpec(4))
