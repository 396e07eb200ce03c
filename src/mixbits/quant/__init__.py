"""Pure quantization math: specs, affine quantize/dequantize, STE, bit packing, cost, QuantLinear,
clipping search and GPTQ."""

from mixbits.quant.affine import (
    QParams,
    dequantize,
    fake_quantize,
    fake_quantize_ste,
    minmax_qparams,
    quantize,
    round_ste,
)
from mixbits.quant.clip import clip_fake_quantize, search_qparams
from mixbits.quant.cost import layer_bits_per_weight, layer_storage_bytes
from mixbits.quant.gptq import GPTQConfig, GPTQResult, gptq_quantize
from mixbits.quant.gram import GramAccumulator, gram, output_error
from mixbits.quant.groups import expand_groups, group_view, num_groups
from mixbits.quant.packing import pack_bits, packed_nbytes, unpack_bits
from mixbits.quant.qlinear import QuantLinear
from mixbits.quant.spec import KEEP, QUANT_BITS, VALID_BITS, VALID_GROUP_SIZES, QuantSpec

__all__ = [
    "GPTQConfig",
    "GPTQResult",
    "GramAccumulator",
    "KEEP",
    "QUANT_BITS",
    "VALID_BITS",
    "VALID_GROUP_SIZES",
    "QParams",
    "QuantLinear",
    "QuantSpec",
    "clip_fake_quantize",
    "dequantize",
    "expand_groups",
    "fake_quantize",
    "fake_quantize_ste",
    "gptq_quantize",
    "gram",
    "group_view",
    "layer_bits_per_weight",
    "layer_storage_bytes",
    "minmax_qparams",
    "num_groups",
    "output_error",
    "pack_bits",
    "packed_nbytes",
    "quantize",
    "round_ste",
    "search_qparams",
    "unpack_bits",
]
