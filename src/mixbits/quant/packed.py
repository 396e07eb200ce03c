"""The stored tensors of one quantized linear, and their shapes without packing anything.

`packed_tensors` is the one packing of a layer for the native format (`QuantLinear`'s state:
`{name}.qweight` uint8 bitstream of the [out, in] codes, `{name}.scales` fp16 [out, G],
`{name}.qzeros` uint8 bitstream of the [out, G] zeros, empty when symmetric, `{name}.bias` fp16).
`packed_shapes` gives the same names with their (shape, dtype) from the layer's shape alone; their
bytes are `cost.layer_storage_bytes` (plus the bias), which is how sizes are computed without a copy.
It lives here, below `model` and `export`, so the streamed quantizer and the writers share it.

A layer planned as a ggml type (`GGMLSpec`) is stored as `GGMLLinear`'s state instead:
`{name}.qweight` uint8 [out, in / block * type_size], its GGUF blocks byte for byte (the type is the
plan's), and `{name}.bias` fp16. `layer_from_state` rebuilds either kind from its tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mixbits.quant.affine import QParams
from mixbits.quant.ggml_linear import GGMLLinear
from mixbits.quant.groups import num_groups
from mixbits.quant.kquant import GGMLParams
from mixbits.quant.packing import packed_nbytes
from mixbits.quant.qlinear import QuantLinear
from mixbits.quant.spec import GGMLSpec, QuantSpec


def _layer_class(spec: QuantSpec | GGMLSpec) -> type[QuantLinear]:
    return GGMLLinear if isinstance(spec, GGMLSpec) else QuantLinear


def packed_tensors(name: str, weight: Tensor, spec: QuantSpec | GGMLSpec,
                   qparams: QParams | GGMLParams | None = None, bias: Tensor | None = None) -> dict[str, Tensor]:
    """`{name}.qweight/.scales/.qzeros(/.bias)` of `weight` [out, in] on the CPU.

    Quantized with `qparams` (a quantizer's, which reproduce its codes exactly) or min-max per
    `spec` (a ggml type: its `GGMLParams`, or a grid chosen with uniform importance); see
    `QuantLinear` and `GGMLLinear`. Peak: the layer's codes once, unpacked."""
    layer = _layer_class(spec).from_weight(weight.detach(), bias, spec, qparams)
    return {f"{name}.{key}": value.detach().cpu().contiguous() for key, value in layer.state_dict().items()}


def layer_from_state(tensors: dict[str, Tensor], spec: QuantSpec | GGMLSpec, in_features: int,
                     out_features: int) -> QuantLinear:
    """The packed layer (`QuantLinear`, or `GGMLLinear` for a ggml type) from its stored tensors
    (keys without the layer's name: qweight, scales, qzeros, bias)."""
    return _layer_class(spec).from_state(tensors, spec, in_features, out_features)


def packed_shapes(name: str, out_features: int, in_features: int, spec: QuantSpec | GGMLSpec,
                  has_bias: bool) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """name -> (shape, dtype) of what `packed_tensors` gives for an [out, in] layer."""
    bias = {f"{name}.bias": ((out_features,), torch.float16)} if has_bias else {}
    if isinstance(spec, GGMLSpec):
        return {f"{name}.qweight": ((out_features, in_features // spec.block * spec.type_size), torch.uint8), **bias}
    groups = num_groups(in_features, spec.group_size)
    zeros = 0 if spec.symmetric else packed_nbytes(out_features * groups, spec.bits)
    shapes = {f"{name}.qweight": ((packed_nbytes(out_features * in_features, spec.bits),), torch.uint8),
              f"{name}.scales": ((out_features, groups), torch.float16),
              f"{name}.qzeros": ((zeros,), torch.uint8)}
    if has_bias:
        shapes[f"{name}.bias"] = ((out_features,), torch.float16)
    return shapes
