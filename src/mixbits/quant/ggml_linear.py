"""A linear layer that holds its weight as ggml blocks: the stored form of a layer planned as a ggml type.

Buffers (what `state_dict` holds and the native export writes):
    qweight  uint8 [out, in / block * type_size]   the GGUF blocks of each row, byte for byte as a
                                                   GGUF file stores them (`quant.ggml_packing`)
    bias     float16 [out] or absent
The type is the layer's spec (a `GGMLSpec`, named in the plan the native folder records), so the
buffer needs no header of its own; its bytes are `cost.layer_storage_bytes` exactly.

The dequantized weight is `kquant.dequantize` of the decoded codes and grid, ggml's arithmetic, so
it equals the quantizer's weight and what llama.cpp reads from the same bytes, bit for bit.
Forward, the per-(device, dtype) cache and the fp16 bias are `QuantLinear`'s.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mixbits.quant import ggml_packing, kquant
from mixbits.quant.kquant import GGMLParams
from mixbits.quant.qlinear import QuantLinear
from mixbits.quant.spec import GGMLSpec

__all__ = ["GGMLLinear"]


class GGMLLinear(QuantLinear):
    """y = x @ W_hat.T + b with W_hat decoded from ggml blocks; see the module docstring."""

    def __init__(self, in_features: int, out_features: int, spec: GGMLSpec, qweight: Tensor,
                 bias: Tensor | None = None) -> None:
        torch.nn.Module.__init__(self)  # not QuantLinear's: it checks the affine buffers this layer has not
        if not isinstance(spec, GGMLSpec) or not spec.fits(in_features):
            raise ValueError(f"GGMLLinear needs a ggml type whose blocks split rows of {in_features}, got {spec!r}")
        expected = {"qweight": ((out_features, in_features // spec.block * spec.type_size), torch.uint8, qweight)}
        if bias is not None:
            expected["bias"] = ((out_features,), torch.float16, bias)
        for name, (shape, dtype, value) in expected.items():
            if tuple(value.shape) != shape or value.dtype != dtype:
                raise ValueError(f"{name} has shape {tuple(value.shape)} dtype {value.dtype}; {spec.name} on a "
                                 f"[{out_features}, {in_features}] layer needs shape {shape} dtype {dtype}")
        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", None)  # QuantLinear's fp16-kept buffers: none here but the bias
        self.register_buffer("bias", bias)
        self._cache = None

    @classmethod
    def from_weight(cls, weight: Tensor, bias: Tensor | None, spec: GGMLSpec,
                    qparams: GGMLParams | None = None) -> "GGMLLinear":
        """Pack `weight` [out, in] on the grid `qparams` (a quantizer's, which reproduce its codes:
        the nearest grid point to a weight on the grid is itself) or one chosen with uniform importance."""
        weight = weight.detach().float()
        params = kquant.choose_params(weight, spec) if qparams is None else qparams
        if params.spec != spec:
            raise ValueError(f"qparams are of {params.spec.name}, the layer is planned as {spec.name}")
        out_features, in_features = weight.shape
        blocks = ggml_packing.encode(kquant.quantize(weight, params), params).to(weight.device)
        return cls(in_features, out_features, spec, blocks,
                   None if bias is None else bias.detach().to(device=weight.device, dtype=torch.float16))

    @classmethod
    def from_state(cls, tensors: dict[str, Tensor], spec: GGMLSpec, in_features: int,
                   out_features: int) -> "GGMLLinear":
        """Rebuild a layer from its saved `state_dict` tensors (qweight, optionally bias)."""
        unknown, missing = set(tensors) - {"qweight", "bias"}, {"qweight"} - set(tensors)
        if unknown or missing:
            raise ValueError(f"GGMLLinear state has unknown keys {sorted(unknown)} and lacks {sorted(missing)}; "
                             f"a {spec.name} layer stores qweight (its ggml blocks) and optionally bias")
        return cls(in_features, out_features, spec, tensors["qweight"], tensors.get("bias"))

    def decoded(self) -> tuple[Tensor, GGMLParams]:
        """(codes int32 [out, in], GGMLParams), CPU: the blocks read back."""
        return ggml_packing.decode(self.qweight, self.spec)

    def qparams(self) -> GGMLParams:
        return self.decoded()[1]

    def codes(self) -> Tensor:
        return self.decoded()[0]

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """W_hat [out, in] = (d * sc) * q - (dmin * mn) in float32 (ggml's order), returned in `dtype`."""
        codes, params = self.decoded()
        return kquant.dequantize(codes, params).to(device=self.qweight.device, dtype=dtype)

    def storage_bytes(self) -> int:
        return self.qweight.nbytes
