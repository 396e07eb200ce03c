"""One fake-quantizer for every kind of spec: affine grids (`QuantSpec`) and ggml types (`GGMLSpec`).

Damage tables and the in-memory quantized model measure a spec by dequantize(quantize(w)); this is
the one place that sends each kind of spec to its own math (`affine.fake_quantize`,
`kquant.fake_quantize`). A ggml type exists only for rows that split into its blocks:
`storable` says so, and damage functions record NaN ("not measured") where it is False, which
allocation masks (`allocate.optimal.storable`).
"""

from __future__ import annotations

from torch import Tensor

from mixbits.quant import affine, kquant
from mixbits.quant.spec import GGMLSpec, QuantSpec


def storable(spec: QuantSpec | GGMLSpec, in_features: int) -> bool:
    """False only for a ggml type whose blocks do not divide a row of `in_features` weights."""
    return not isinstance(spec, GGMLSpec) or spec.fits(in_features)


def fake_quantize(w: Tensor, spec: QuantSpec | GGMLSpec) -> Tensor:
    """dequantize(quantize(w)) on `spec`'s grid, same shape and dtype as `w` [out, in].

    ggml types choose their grid with uniform importance (round-to-nearest, as llama.cpp without
    an imatrix); raises ValueError when `w`'s rows do not split into the type's blocks."""
    if isinstance(spec, GGMLSpec):
        return kquant.fake_quantize(w, spec)
    return affine.fake_quantize(w, spec)
