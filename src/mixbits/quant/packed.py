"""The stored tensors of one quantized linear, and their shapes without packing anything.

`packed_tensors` is the one packing of a layer for the native format (`QuantLinear`'s state:
`{name}.qweight` uint8 bitstream of the [out, in] codes, `{name}.scales` fp16 [out, G],
`{name}.qzeros` uint8 bitstream of the [out, G] zeros, empty when symmetric, `{name}.bias` fp16).
`packed_shapes` gives the same names with their (shape, dtype) from the layer's shape alone; their
bytes are `cost.layer_storage_bytes` (plus the bias), which is how sizes are computed without a copy.
It lives here, below `model` and `export`, so the streamed quantizer and the writers share it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mixbits.quant.affine import QParams
from mixbits.quant.groups import num_groups
from mixbits.quant.packing import packed_nbytes
from mixbits.quant.qlinear import QuantLinear
from mixbits.quant.spec import QuantSpec


def packed_tensors(name: str, weight: Tensor, spec: QuantSpec, qparams: QParams | None = None,
                   bias: Tensor | None = None) -> dict[str, Tensor]:
    """`{name}.qweight/.scales/.qzeros(/.bias)` of `weight` [out, in] on the CPU.

    Quantized with `qparams` (a quantizer's, which reproduce its codes exactly) or min-max per
    `spec`; see `QuantLinear`. Peak: the layer's codes once, unpacked."""
    layer = QuantLinear.from_weight(weight.detach(), bias, spec, qparams)
    return {f"{name}.{key}": value.detach().cpu().contiguous() for key, value in layer.state_dict().items()}


def packed_shapes(name: str, out_features: int, in_features: int, spec: QuantSpec,
                  has_bias: bool) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """name -> (shape, dtype) of what `packed_tensors` gives for an [out, in] layer."""
    groups = num_groups(in_features, spec.group_size)
    zeros = 0 if spec.symmetric else packed_nbytes(out_features * groups, spec.bits)
    shapes = {f"{name}.qweight": ((packed_nbytes(out_features * in_features, spec.bits),), torch.uint8),
              f"{name}.scales": ((out_features, groups), torch.float16),
              f"{name}.qzeros": ((zeros,), torch.uint8)}
    if has_bias:
        shapes[f"{name}.bias"] = ((out_features,), torch.float16)
    return shapes
