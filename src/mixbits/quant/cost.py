"""True stored size of one linear layer under a QuantSpec, byte for byte what QuantLinear keeps.

A quantized [out, in] weight stores
    codes   packed_nbytes(out * in, bits)        one bitstream of all codes, row-major
    scales  2 * out * G                           float16, G = ceil(in / group_size)
    zeros   packed_nbytes(out * G, bits)          asymmetric only; symmetric uses 2**(bits-1)
and a kept layer (bits 16) stores 2 * out * in bytes. The bias is not counted here: it is stored
in fp16 whatever the spec, so whole-model size adds it once.

So the bits per weight of w4g128 asymmetric are 4 + (16 + 4) / 128 = 4.156; group overhead
is what makes small groups expensive at low bit widths (w2g32: 2 + 18/32 = 2.56).

A ggml type (`GGMLSpec`) stores `type_size` bytes per block of `block` weights of each row, so
its bits per weight are exact and shape-free (Q2_K 2.625, Q3_K 3.4375, Q4_K 4.5, Q5_K 5.5,
Q6_K 6.5625, Q8_0 8.5); a row that is not a whole number of blocks cannot take the type.
"""

from __future__ import annotations

from mixbits.quant.groups import num_groups
from mixbits.quant.packing import packed_nbytes
from mixbits.quant.spec import GGMLSpec, QuantSpec

__all__ = ["layer_bits_per_weight", "layer_storage_bytes", "num_groups"]

_FP16_BYTES = 2


def layer_storage_bytes(out_features: int, in_features: int, spec: QuantSpec | GGMLSpec) -> int:
    """Bytes of the stored weight tensors (codes + fp16 scales + packed zeros; no bias)."""
    if out_features < 1 or in_features < 1:
        raise ValueError(f"layer shape [{out_features}, {in_features}] must have positive sizes")
    if isinstance(spec, GGMLSpec):
        if not spec.fits(in_features):
            raise ValueError(f"rows of {in_features} weights do not split into {spec.name} blocks of {spec.block}")
        return out_features * (in_features // spec.block) * spec.type_size
    if spec.keep:
        return _FP16_BYTES * out_features * in_features
    groups = out_features * num_groups(in_features, spec.group_size)
    codes = packed_nbytes(out_features * in_features, spec.bits)
    scales = _FP16_BYTES * groups
    zeros = 0 if spec.symmetric else packed_nbytes(groups, spec.bits)
    return codes + scales + zeros


def layer_bits_per_weight(out_features: int, in_features: int, spec: QuantSpec | GGMLSpec) -> float:
    """8 * layer_storage_bytes / (out * in)."""
    return 8 * layer_storage_bytes(out_features, in_features, spec) / (out_features * in_features)
