"""ggml block types as data (GGMLSpec): exact bytes and bits per weight, storable row lengths."""

from __future__ import annotations

import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

from mixbits.errors import UserError
from mixbits.quant.cost import layer_bits_per_weight, layer_storage_bytes
from mixbits.quant.spec import GGML_TYPES, GGMLSpec, ggml_types_for_row

TYPES = list(GGML_TYPES.values())


@pytest.mark.parametrize("spec", TYPES, ids=lambda s: s.name)
def test_block_bytes_equal_ggml(spec):
    assert (spec.block, spec.type_size) == GGML_QUANT_SIZES[Q[spec.name]]
    assert layer_storage_bytes(3, 4 * spec.block, spec) == 3 * 4 * GGML_QUANT_SIZES[Q[spec.name]][1]


def test_bits_per_weight():
    expected = {"Q2_K": 2.625, "Q3_K": 3.4375, "Q4_K": 4.5, "Q5_K": 5.5, "Q6_K": 6.5625, "Q8_0": 8.5,
                "Q4_0": 4.5, "Q4_1": 5.0, "Q5_0": 5.5, "Q5_1": 6.0}
    assert {s.name: s.bits_per_weight for s in TYPES} == expected
    assert {s.name: layer_bits_per_weight(512, 768, s) for s in TYPES} == expected


def test_row_lengths_choose_the_types():
    assert [s.name for s in ggml_types_for_row(768)] == ["Q2_K", "Q3_K", "Q4_K", "Q4_0", "Q4_1", "Q5_K", "Q5_0",
                                                          "Q5_1", "Q6_K", "Q8_0"]
    assert [s.name for s in ggml_types_for_row(576)] == ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]
    assert ggml_types_for_row(100) == ()
    with pytest.raises(ValueError, match="576 weights do not split into Q4_K blocks of 256"):
        layer_storage_bytes(8, 576, GGML_TYPES["Q4_K"])


def test_parse_and_ranges():
    assert GGMLSpec.parse(" q3_k ") is GGML_TYPES["Q3_K"] and GGML_TYPES["Q3_K"].label == "q3_k"
    with pytest.raises(UserError, match="unknown ggml type 'q7_k'"):
        GGMLSpec.parse("q7_k")
    q3, q4, q6 = GGML_TYPES["Q3_K"], GGML_TYPES["Q4_K"], GGML_TYPES["Q6_K"]
    assert (q3.qmin, q3.qmax, q3.sc_range, q3.symmetric) == (-4, 3, (-32, 31), True)
    assert (q4.qmin, q4.qmax, q4.sc_range, q4.symmetric) == (0, 15, (0, 63), False)
    assert (q6.qmin, q6.qmax, q6.sc_range) == (-32, 31, (-128, 127))
    assert GGML_TYPES["Q8_0"].sc_range == (1, 1) and not GGML_TYPES["Q8_0"].keep
