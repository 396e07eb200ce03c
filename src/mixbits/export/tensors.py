"""What every export stores of a model: each planned layer's codes and QParams, every other
tensor in float16, and the int32 word packing the Hugging Face formats share.

A planned layer is taken in its stored form from the weight the model holds: with the `qparams`
a quantizer returned (GPTQ, clip search, training) the codes `quantize(weight, qparams)` are that
quantizer's codes exactly, because the model holds the weights it wrote; without qparams,
min-max per the plan spec, as `fake_quantize` and the native export compute them. The qparams
are checked storable as `QuantLinear` checks them (fp16 scales, integer zero-points in range).

`pack_int32` cuts each row of b-bit codes into a little-endian bit stream (code i at bits
[i*b, (i+1)*b)) and reads it as int32 words, so 3-, 5- and 6-bit codes span word boundaries.
This is the layout of GPTQ's `qweight`/`qzeros` (packed along their own rows after the
transpose each format asks for) and of compressed-tensors' dense `pack_to_int32`.
"""

from __future__ import annotations

import copy
import math
import sys
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mixbits.model.arch import get_bias, get_weight
from mixbits.quant.affine import QParams, minmax_qparams, quantize
from mixbits.quant.packing import pack_bits
from mixbits.quant.qlinear import check_storable
from mixbits.quant import kquant
from mixbits.quant.spec import GGMLSpec, QuantSpec


@dataclass(frozen=True, eq=False)
class StoredLayer:
    """One planned layer as stored: codes uint8 [out, in], QParams float32 [out, G] (CPU),
    the weight it was quantized from (float32 [out, in]) and its bias (float16 [out]) if any."""

    spec: QuantSpec
    codes: torch.Tensor
    qparams: QParams
    weight: torch.Tensor
    bias: torch.Tensor | None


def stored_layer(module: nn.Module, spec: QuantSpec, qparams: QParams | None = None) -> StoredLayer:
    """The stored form of one linear: min-max qparams unless given (then checked storable).

    A ggml type (`GGMLSpec`, GGUF) is stored as `kquant`'s codes and `GGMLParams` (given, or
    chosen from the weight with uniform importance)."""
    weight = get_weight(module).detach().float().cpu()
    if isinstance(spec, GGMLSpec):
        params = qparams if qparams is not None else kquant.choose_params(weight, spec)
        bias = get_bias(module)
        bias = None if bias is None else bias.detach().cpu().to(torch.float16)
        return StoredLayer(spec, kquant.quantize(weight, params), params, weight, bias)
    if qparams is None:
        qp = minmax_qparams(weight, spec)
    else:
        qp = QParams(qparams.scale.float().cpu(), qparams.zero.float().cpu())
    check_storable(qp, spec)
    bias = get_bias(module)
    bias = None if bias is None else bias.detach().cpu().to(torch.float16)
    return StoredLayer(spec, quantize(weight, qp, spec), qp, weight, bias)


def pack_int32(codes: Tensor, bits: int) -> Tensor:
    """uint8 codes [rows, n] -> int32 [rows, ceil(n * bits / 32)], each row its own bit stream."""
    if codes.dim() != 2:
        raise ValueError(f"expected 2-D codes [rows, n], got shape {tuple(codes.shape)}")
    rows, n = codes.shape
    padded_n = math.ceil(n / 32) * 32  # a row of 32 codes is exactly `bits` whole words
    padded = torch.zeros(rows, padded_n, dtype=torch.uint8)
    padded[:, :n] = codes.cpu()
    words = padded_n * bits // 32
    raw = pack_bits(padded, bits).view(rows, words, 4)
    if sys.byteorder == "big":
        raw = raw.flip(-1)
    return raw.contiguous().view(torch.int32).view(rows, words)[:, : math.ceil(n * bits / 32)].contiguous()


def export_config(config, quantization_config: dict | None = None):
    """A copy of a model's config (or of `model.config`) recording float16 storage and the quantization config."""
    config = copy.deepcopy(getattr(config, "config", config))
    config.dtype = torch.float16
    if quantization_config is not None:
        config.quantization_config = quantization_config
    return config
