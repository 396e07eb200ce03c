"""ggml's block types built directly from mixbits codes: the legacy Q4_0, Q4_1, Q5_0, Q5_1, Q8_0
from an affine `QuantSpec` (`encode_blocks`), and every `GGMLSpec` type, K-quants Q2_K..Q6_K
included, from `quant.kquant`'s codes and grid (`encode_ggml`, at the end of this file).

Each row of a weight [out, in] is cut into blocks of 32 consecutive inputs; a block stores its
own fp16 scale d (and fp16 offset m for the _1 types) and 32 integer codes:

    type  bytes  layout (little-endian)                       value of code q
    Q4_0    18   d, qs[16]                                    d * (q - 8)
    Q4_1    20   d, m, qs[16]                                 d * q + m
    Q5_0    22   d, qh[4], qs[16]                             d * (q - 16)
    Q5_1    24   d, m, qh[4], qs[16]                          d * q + m
    Q8_0    34   d, qs[32] (int8)                             d * q

qs byte j holds the low 4 bits of q[j] (low nibble) and of q[j + 16] (high nibble); qh is a
32-bit word whose bit j is bit 4 of q[j].

The mapping from mixbits' W_hat = s * (q - z) is exact where the format has the same grid:
symmetric specs (z = 2**(b-1)) are Q4_0 / Q5_0 / Q8_0 with d = s and the very same codes
(Q8_0 stores q - 128). Asymmetric 4 and 5 bits are Q4_1 / Q5_1 with d = s, the same codes,
and m = -z * s rounded to fp16 (relative error <= 2**-11 of z * s: the only rounding).

Q8_0 has no offset, so an asymmetric 8-bit block is exact (d = s, codes q - z) only when its
codes stay within [z - 128, z + 127]; that holds for most blocks of groups wider than 32
(about 70% at g128, 94% per-channel, 2% at g32 on SmolLM2). Every other block is re-quantized
from W_hat by llama.cpp's own Q8_0 rule (d = max|w| / 127, `gguf.quants`): error <= d / 2 per
weight, about 0.4% of the block's largest weight. Symmetric 8-bit specs are always exact.

A mixbits group spans whole blocks when its size is a multiple of 32 (always, for mixbits'
group sizes, once `in` is a multiple of 32): its s and z are repeated in each of its blocks,
which keeps the plan's codes exactly at the storage cost of 32-wide groups.
"""

from __future__ import annotations


import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf import quants
from torch import Tensor

from mixbits.errors import UserError
from mixbits.quant import ggml_packing
from mixbits.quant.affine import QParams, dequantize
from mixbits.quant.ggml_packing import fp16_bytes as _fp16_bytes, high_bits as _high_bits
from mixbits.quant.groups import effective_group_size
from mixbits.quant.spec import QuantSpec

BLOCK = 32


def block_type(spec: QuantSpec) -> Q:
    """The ggml type that stores `spec`; ValueError when none does."""
    table = {(4, True): Q.Q4_0, (4, False): Q.Q4_1, (5, True): Q.Q5_0, (5, False): Q.Q5_1, (8, True): Q.Q8_0,
             (8, False): Q.Q8_0}
    if (spec.bits, spec.symmetric) not in table:
        raise UserError(f"spec {spec.label} has no ggml legacy block type; GGUF stores 4, 5 and 8 bits")
    return table[(spec.bits, spec.symmetric)]


def per_block(t: Tensor, in_features: int, group_size: int | None) -> Tensor:
    """Per-group values [out, G] -> per-block values [out, in / 32] (each group repeated)."""
    if in_features % BLOCK:
        raise UserError(f"a row of {in_features} inputs does not split into blocks of {BLOCK}")
    gs = effective_group_size(in_features, group_size)
    starts = torch.arange(0, in_features, BLOCK)
    return t[:, starts // gs]


def _nibbles(q: Tensor) -> Tensor:
    """uint8 [out, nb, 32] -> uint8 [out, nb, 16]: low nibbles of q[j] and q[j + 16]."""
    low = q & 0x0F
    return low[..., :16] | (low[..., 16:] << 4)


def _q8_0_asymmetric(codes: Tensor, qp: QParams, spec: QuantSpec) -> np.ndarray:
    """Q8_0 bytes [out, in / 32 * 34]: blocks whose q - z fits int8 exactly, the rest by llama.cpp's rule."""
    out_features, in_features = codes.shape
    scale = per_block(qp.scale.float(), in_features, spec.group_size)
    zero = per_block(qp.zero.float(), in_features, spec.group_size)
    diff = codes.to(torch.int16).reshape(out_features, -1, BLOCK) - zero.to(torch.int16)[..., None]
    fits = ((diff.amin(dim=-1) >= -128) & (diff.amax(dim=-1) <= 127)).reshape(-1)
    blocks = torch.cat([_fp16_bytes(scale), diff.clamp(-128, 127).to(torch.int8).view(torch.uint8)], dim=-1)
    blocks = blocks.reshape(-1, blocks.shape[-1])
    if not bool(fits.all()):
        w_hat = dequantize(codes, qp, spec).reshape(-1, BLOCK)[~fits].numpy()
        blocks[~fits] = torch.from_numpy(quants.quantize(w_hat, Q.Q8_0))
    return blocks.reshape(out_features, -1).numpy()


def encode_blocks(codes: Tensor, qp: QParams, spec: QuantSpec) -> tuple[Q, np.ndarray]:
    """(type, uint8 [out, in / 32 * type_size]) storing W_hat = dequantize(codes, qp, spec)."""
    kind = block_type(spec)
    out_features, in_features = codes.shape
    if kind == Q.Q8_0 and not spec.symmetric:
        return kind, _q8_0_asymmetric(codes, qp, spec)
    q = codes.to(torch.uint8).reshape(out_features, in_features // BLOCK, BLOCK)
    scale = per_block(qp.scale.float(), in_features, spec.group_size)
    parts = [_fp16_bytes(scale)]
    if kind in (Q.Q4_1, Q.Q5_1):
        zero = per_block(qp.zero.float(), in_features, spec.group_size)
        parts.append(_fp16_bytes(-zero * scale))
    if kind in (Q.Q5_0, Q.Q5_1):
        parts.append(_high_bits(q))
    if kind == Q.Q8_0:
        parts.append((q.to(torch.int16) - 128).to(torch.int8).view(torch.uint8))
    else:
        parts.append(_nibbles(q))
    blocks = torch.cat(parts, dim=-1)
    return kind, blocks.reshape(out_features, -1).numpy()


# --- Blocks of any GGMLSpec (K-quants and legacy) from `quant.kquant`'s codes and grid --------------
# The layouts live in `quant.ggml_packing` (encode and decode), so the native format stores the same bytes.


def encode_ggml(codes: Tensor, params) -> tuple[Q, np.ndarray]:
    """(type, uint8 [out, in / block * type_size]): the GGUF blocks of `kquant.dequantize(codes, params)`.

    codes: int [out, in] in [qmin, qmax]; params: a `kquant.GGMLParams`. Bit-exact: ggml (and
    `gguf.quants.dequantize`) read back exactly the weights mixbits computed."""
    return Q[params.spec.name], ggml_packing.encode(codes, params).numpy()
