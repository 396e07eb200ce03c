"""A linear layer that holds its weight packed: the true stored form of a quantized layer.

Buffers (what `state_dict` holds and the native export writes):
    qweight  uint8 [packed_nbytes(out * in, bits)]   bitstream of the [out, in] codes, row-major
    scales   float16 [out, G]
    qzeros   uint8 [packed_nbytes(out * G, bits)]    bitstream of the [out, G] zero codes;
                                                      empty for symmetric (zero = 2**(bits-1))
    bias     float16 [out] or absent
Their bytes, without the bias, are `cost.layer_storage_bytes` exactly.

The dequantized weight is `affine.dequantize` of the unpacked codes, so it equals
`fake_quantize(weight, spec, qparams)` bit for bit (scales were already fp16 values). Forward
dequantizes once and caches the result per (device, dtype): evaluation runs at dense speed at
the cost of one dense weight per layer in memory. The cache is an ordinary attribute, never
saved, and dropped whenever the buffers are moved, cast or loaded.

`.to(dtype)` / `.half()` / `.bfloat16()` move the buffers but keep `scales` and `bias` in
float16: casting them would change the stored values (fp16 -> bf16 is lossy). Forward casts to
the input's dtype instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mixbits.quant.affine import QParams, dequantize, minmax_qparams, quantize
from mixbits.quant.groups import num_groups
from mixbits.quant.packing import pack_bits, packed_nbytes, unpack_bits
from mixbits.quant.spec import QuantSpec

_FP16_KEPT = ("scales", "bias")


def check_storable(qp: QParams, spec: QuantSpec) -> None:
    """QParams must survive storage unchanged: fp16 scales, integer zeros (fixed when symmetric)."""
    if not torch.equal(qp.scale.float(), qp.scale.half().float()) or not bool((qp.scale > 0).all()):
        raise ValueError(
            "qparams.scale must be positive and exactly representable in float16; round it with .half().float()"
        )
    zero = qp.zero.float()
    if spec.symmetric:
        if not bool((zero == (1 << (spec.bits - 1))).all()):
            raise ValueError(
                f"symmetric spec {spec.label} stores no zero-points; qparams.zero must all be {1 << (spec.bits - 1)}"
            )
    elif not torch.equal(zero, zero.round()) or bool((zero < 0).any()) or bool((zero > spec.maxq).any()):
        raise ValueError(f"qparams.zero must hold integers in [0, {spec.maxq}] for spec {spec.label}")


class QuantLinear(nn.Module):
    """y = x @ W_hat.T + b with W_hat dequantized from packed codes; see the module docstring."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        spec: QuantSpec,
        qweight: Tensor,
        scales: Tensor,
        qzeros: Tensor,
        bias: Tensor | None = None,
    ) -> None:
        super().__init__()
        if spec.keep:
            raise ValueError(f"spec {spec.label!r} keeps the layer in 16 bits; use a plain nn.Linear")
        groups = num_groups(in_features, spec.group_size)
        zeros_nbytes = 0 if spec.symmetric else packed_nbytes(out_features * groups, spec.bits)
        expected = {
            "qweight": ((packed_nbytes(out_features * in_features, spec.bits),), torch.uint8, qweight),
            "scales": ((out_features, groups), torch.float16, scales),
            "qzeros": ((zeros_nbytes,), torch.uint8, qzeros),
        }
        if bias is not None:
            expected["bias"] = ((out_features,), torch.float16, bias)
        for name, (shape, dtype, value) in expected.items():
            if tuple(value.shape) != shape or value.dtype != dtype:
                raise ValueError(
                    f"{name} has shape {tuple(value.shape)} dtype {value.dtype}; spec {spec.label} on a "
                    f"[{out_features}, {in_features}] layer needs shape {shape} dtype {dtype}"
                )
        self.in_features = in_features
        self.out_features = out_features
        self.spec = spec
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("qzeros", qzeros)
        self.register_buffer("bias", bias)
        self._cache: tuple[torch.device, torch.dtype, Tensor] | None = None

    @classmethod
    def from_weight(
        cls, weight: Tensor, bias: Tensor | None, spec: QuantSpec, qparams: QParams | None = None
    ) -> "QuantLinear":
        """Quantize and pack `weight` [out, in] (min-max qparams unless given); bias kept in fp16."""
        weight = weight.detach()
        qp = minmax_qparams(weight, spec) if qparams is None else qparams
        check_storable(qp, spec)
        out_features, in_features = weight.shape
        codes = quantize(weight, qp, spec)
        if spec.symmetric:
            qzeros = torch.empty(0, dtype=torch.uint8, device=weight.device)
        else:
            qzeros = pack_bits(qp.zero.to(device=weight.device, dtype=torch.uint8), spec.bits)
        return cls(
            in_features,
            out_features,
            spec,
            qweight=pack_bits(codes, spec.bits),
            scales=qp.scale.to(device=weight.device, dtype=torch.float16),
            qzeros=qzeros,
            bias=None if bias is None else bias.detach().to(device=weight.device, dtype=torch.float16),
        )

    @classmethod
    def from_state(
        cls, tensors: dict[str, Tensor], spec: QuantSpec, in_features: int, out_features: int
    ) -> "QuantLinear":
        """Rebuild a layer from its saved `state_dict` tensors (qzeros may be absent when symmetric)."""
        unknown = set(tensors) - {"qweight", "scales", "qzeros", "bias"}
        missing = {"qweight", "scales"} - set(tensors)
        if unknown or missing:
            raise ValueError(
                f"QuantLinear state has unknown keys {sorted(unknown)} and lacks {sorted(missing)}; "
                "expected qweight, scales, qzeros (asymmetric) and optionally bias"
            )
        qweight = tensors["qweight"]
        qzeros = tensors.get("qzeros")
        if qzeros is None and spec.symmetric:
            qzeros = torch.empty(0, dtype=torch.uint8, device=qweight.device)
        if qzeros is None:
            raise ValueError(f"asymmetric spec {spec.label} needs 'qzeros' in the saved state")
        return cls(in_features, out_features, spec, qweight, tensors["scales"], qzeros, tensors.get("bias"))

    def qparams(self) -> QParams:
        """The stored scales and zero-points as float32 QParams."""
        scale = self.scales.float()
        if self.spec.symmetric:
            zero = torch.full_like(scale, float(1 << (self.spec.bits - 1)))
        else:
            zero = unpack_bits(self.qzeros, self.spec.bits, scale.numel()).view_as(scale).float()
        return QParams(scale=scale, zero=zero)

    def codes(self) -> Tensor:
        """The unpacked integer codes, uint8 [out, in]."""
        n = self.out_features * self.in_features
        return unpack_bits(self.qweight, self.spec.bits, n).view(self.out_features, self.in_features)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """W_hat [out, in] = (q - z) * s in float32, returned in `dtype`."""
        return dequantize(self.codes(), self.qparams(), self.spec, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        cache = self._cache
        stale = cache is None or cache[0] != self.qweight.device or cache[1] != x.dtype
        # A weight made under inference_mode cannot take part in autograd outside it.
        if stale or (cache[2].is_inference() and not torch.is_inference_mode_enabled()):
            cache = (self.qweight.device, x.dtype, self.dequantized_weight(x.dtype))
            self._cache = cache
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, cache[2], bias)

    def storage_bytes(self) -> int:
        """Bytes of qweight, scales and qzeros: equals `cost.layer_storage_bytes` for this layer."""
        return self.qweight.nbytes + self.scales.nbytes + self.qzeros.nbytes

    def _apply(self, fn, recurse: bool = True):
        kept = {name: getattr(self, name) for name in _FP16_KEPT}
        super()._apply(fn, recurse)
        for name, old in kept.items():
            new = getattr(self, name)
            if new is not None and new.dtype != torch.float16:
                # A dtype cast: take only the move, from the untouched fp16 original.
                self._buffers[name] = old.to(new.device)
        self._cache = None
        return self

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self._cache = None
        super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        bias = self.bias is not None
        return f"in_features={self.in_features}, out_features={self.out_features}, spec={self.spec.label}, bias={bias}"
