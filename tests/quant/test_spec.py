"""`parse_spec`: one reader for every label a plan, a table or a flag may hold."""

import pytest

from mixbits.errors import UserError
from mixbits.quant.spec import GGML_TYPES, QuantSpec, parse_spec


def test_parse_spec_reads_ggml_and_affine_labels():
    assert parse_spec("q4_k") is GGML_TYPES["Q4_K"] and parse_spec(" Q8_0 ") is GGML_TYPES["Q8_0"]
    assert parse_spec("w4g128") == QuantSpec(4, 128) and parse_spec("w3pcs") == QuantSpec(3, None, True)
    assert parse_spec("fp16").keep
    assert all(parse_spec(s.label) is s for s in GGML_TYPES.values())
    with pytest.raises(UserError, match="q9_k"):
        parse_spec("q9_k")
