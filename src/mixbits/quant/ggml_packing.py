"""ggml's block bytes of any `GGMLSpec` (K-quants Q2_K..Q6_K, the legacy Q4_0..Q8_0, IQ4_NL, IQ4_XS), both ways.

`encode(codes, params)` packs `quant.kquant`'s codes and grid into the bytes GGUF stores (one row
of the weight is one row of blocks); `decode(blocks, spec)` reads them back into the very same
codes and `GGMLParams`, so `kquant.dequantize(*decode(encode(codes, params)))` is the weight
mixbits computed, bit for bit, and equals what llama.cpp and `gguf.quants.dequantize` read
(tests/export/test_ggml_blocks.py). Every layout is dense (no unused bit), so the bytes are a
bijection of (codes, sub-block codes, fp16 super scales): the native format stores these bytes
(`quant.ggml_linear`), and a GGUF file written from them is byte-identical to one written from
the quantizer's output.

Each type's block is a sequence of fields (LAYOUT). Codes are stored unsigned, u = q - qmin
(Q8_0: the int8 q itself); a "planes" field puts several codes in a byte: with `per` codes of
b bits per byte, code j of a run of per * span codes goes to byte j % span at bit b * (j // span).
That single rule gives every K-quant layout (Q2_K's 2-bit qs, Q3_K's hmask, Q4_K's nibbles,
Q6_K's ql and qh, Q3_K's and IQ4_XS's packed scales); the legacy 5-bit high bits are one little-endian word.
Pure tensor code (no gguf import), CPU; peak: a few int32 copies of the codes.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor

from mixbits.quant.kquant import GGMLParams
from mixbits.quant.spec import GGMLSpec

__all__ = ["LAYOUT", "decode", "encode", "fp16_bytes", "high_bits"]

LAYOUT = {
    "Q2_K": ("scales_q2k", "low2", "d", "dmin"),
    "Q3_K": ("bit2", "low2", "scales_q3k", "d"),
    "Q4_K": ("d", "dmin", "scales_k4", "low4"),
    "Q5_K": ("d", "dmin", "scales_k4", "bit4", "low4"),
    "Q6_K": ("low4_64", "high2", "scales_i8", "d"),
    "Q4_0": ("d", "low4_16"),
    "IQ4_NL": ("d", "low4_16"),  # Q4_0's bytes; the nibble is an index into the levels, not q + 8
    "IQ4_XS": ("d", "scales_iq4xs", "low4_16"),  # scales_h (uint16), scales_l[4], then IQ4_NL's nibbles per 32
    "Q4_1": ("d", "m", "low4_16"),
    "Q5_0": ("d", "word4", "low4_16"),
    "Q5_1": ("d", "m", "word4", "low4_16"),
    "Q8_0": ("d", "int8"),
}
_PLANES = {"low2": (2, 0, 32), "bit2": (1, 2, 32), "low4": (4, 0, 32), "bit4": (1, 4, 32),
           "low4_64": (4, 0, 64), "high2": (2, 4, 32), "low4_16": (4, 0, 16)}  # bits, shift in u, span


def fp16_bytes(t: Tensor) -> Tensor:
    """float [...] -> uint8 [..., 2]: each value's little-endian fp16 bytes."""
    raw = t.to(torch.float16).contiguous().view(torch.uint8).view(*t.shape, 2)
    return raw.flip(-1) if sys.byteorder == "big" else raw


def _from_fp16_bytes(b: Tensor) -> Tensor:
    """uint8 [..., 2] little-endian -> float32 [...] (the fp16 values)."""
    b = b.flip(-1) if sys.byteorder == "big" else b
    return b.contiguous().view(torch.float16)[..., 0].float()


def high_bits(q: Tensor) -> Tensor:
    """uint8 [out, nb, 32] -> uint8 [out, nb, 4]: the little-endian word whose bit j is bit 4 of q[j]."""
    bits = ((q >> 4) & 1).to(torch.int64)
    word = (bits << torch.arange(32, dtype=torch.int64)).sum(dim=-1)
    return torch.stack([(word >> (8 * k)) & 0xFF for k in range(4)], dim=-1).to(torch.uint8)


def _planes(v: Tensor, bits: int, span: int) -> Tensor:
    """uint8 [..., n] values < 2**bits -> uint8 [..., n * bits / 8] (see the module docstring)."""
    per = 8 // bits
    v = v.to(torch.int32).reshape(*v.shape[:-1], -1, per, span)
    shifts = (torch.arange(per, dtype=torch.int32) * bits).reshape(per, 1)
    return (v << shifts).sum(dim=-2).reshape(*v.shape[:-3], -1).to(torch.uint8)


def _unplanes(b: Tensor, bits: int, span: int) -> Tensor:
    """The inverse of `_planes`: uint8 [..., m] -> int32 [..., m * 8 / bits]."""
    per = 8 // bits
    b = b.to(torch.int32).reshape(*b.shape[:-1], -1, 1, span)
    shifts = (torch.arange(per, dtype=torch.int32) * bits).reshape(per, 1)
    return ((b >> shifts) & ((1 << bits) - 1)).reshape(*b.shape[:-3], -1)


def _scales_k4(sc: Tensor, mn: Tensor) -> Tensor:
    """Q4_K / Q5_K: eight 6-bit scales and mins in 12 bytes (get_scale_min_k4's layout)."""
    lo_sc, hi_sc, lo_mn, hi_mn = sc[..., :4], sc[..., 4:], mn[..., :4], mn[..., 4:]
    return torch.cat([lo_sc | ((hi_sc >> 4) << 6), lo_mn | ((hi_mn >> 4) << 6), (hi_sc & 15) | ((hi_mn & 15) << 4)], -1)


def _unscales_k4(b: Tensor) -> tuple[Tensor, Tensor]:
    b = b.to(torch.int32)
    first, second, third = b[..., :4], b[..., 4:8], b[..., 8:]
    sc = torch.cat([first & 63, (third & 15) | ((first >> 6) << 4)], -1)
    mn = torch.cat([second & 63, (third >> 4) | ((second >> 6) << 4)], -1)
    return sc, mn


def _width(name: str, spec: GGMLSpec) -> int:
    """Bytes of field `name` in one block of `spec`."""
    if name in ("d", "dmin", "m"):
        return 2
    fixed = {"scales_q2k": spec.subs, "scales_q3k": 12, "scales_k4": 12, "scales_i8": spec.subs, "scales_iq4xs": 6,
             "int8": spec.block, "word4": 4}
    return fixed[name] if name in fixed else spec.block * _PLANES[name][0] // 8


def _field(name: str, u: Tensor, q: Tensor, d: Tensor, dmin: Tensor, sc: Tensor, mn: Tensor) -> Tensor:
    """One field of every block: uint8 [out, nb, bytes]."""
    if name in ("d", "dmin", "m"):
        return fp16_bytes({"d": d, "dmin": dmin, "m": -dmin}[name])
    if name == "scales_q2k":
        return (sc | (mn << 4)).to(torch.uint8)
    if name == "scales_q3k":
        s = sc + 32
        return torch.cat([_planes(s & 15, 4, 8), _planes(s >> 4, 2, 4)], -1)
    if name == "scales_k4":
        return _scales_k4(sc, mn).to(torch.uint8)
    if name == "scales_iq4xs":  # ls = sc + 32: bits 4-5 of sub-block j at bit 2j of a word, bits 0-3 nibble-wise
        s = sc + 32
        return torch.cat([_planes(s >> 4, 2, 1), _planes(s & 15, 4, 1)], -1)
    if name == "scales_i8":
        return sc.to(torch.int8).view(torch.uint8)
    if name == "int8":
        return q.to(torch.int8).view(torch.uint8)
    if name == "word4":
        return high_bits(u)
    bits, shift, span = _PLANES[name]
    return _planes((u >> shift) & ((1 << bits) - 1), bits, span)


def encode(codes: Tensor, params: GGMLParams) -> Tensor:
    """uint8 [out, in / block * type_size]: the ggml blocks of `kquant.dequantize(codes, params)`.

    codes: int [out, in] in [qmin, qmax]; params: a `kquant.GGMLParams`. CPU result."""
    spec = params.spec
    out_features, in_features = codes.shape
    nb = in_features // spec.block
    q = codes.to(torch.int32).cpu().reshape(out_features, nb, spec.block)
    if int(q.min()) < spec.qmin or int(q.max()) > spec.qmax:
        raise ValueError(f"{spec.name} codes must lie in [{spec.qmin}, {spec.qmax}]")
    u = q - spec.qmin
    sc = params.sc.to(torch.int32).cpu().reshape(out_features, nb, spec.subs)
    mn = params.mn.to(torch.int32).cpu().reshape(out_features, nb, spec.subs)
    d, dmin = params.d.float().cpu(), params.dmin.float().cpu()
    blocks = torch.cat([_field(name, u, q, d, dmin, sc, mn) for name in LAYOUT[spec.name]], dim=-1)
    if blocks.shape[-1] != spec.type_size:
        raise AssertionError(f"{spec.name} block has {blocks.shape[-1]} bytes, expected {spec.type_size}")
    return blocks.reshape(out_features, -1).contiguous()


def decode(blocks: Tensor, spec: GGMLSpec) -> tuple[Tensor, GGMLParams]:
    """The inverse of `encode`: uint8 [out, in / block * type_size] -> (codes int32 [out, in], GGMLParams),
    with the conventions `kquant.choose_params` uses where a type stores nothing (sc ones without
    sub-block scales; mn ones for the legacy fp16 offset, zeros and dmin zeros when symmetric)."""
    if blocks.dtype != torch.uint8 or blocks.dim() != 2 or blocks.shape[1] % spec.type_size:
        raise ValueError(f"{spec.name} blocks must be uint8 [out, n * {spec.type_size}], "
                         f"got {tuple(blocks.shape)} {blocks.dtype}")
    out_features = blocks.shape[0]
    nb = blocks.shape[1] // spec.type_size
    raw = blocks.cpu().reshape(out_features, nb, spec.type_size)
    fields, at = {}, 0
    for name in LAYOUT[spec.name]:
        fields[name], at = raw[..., at:at + _width(name, spec)], at + _width(name, spec)
    zeros = torch.zeros(out_features, nb, spec.subs, dtype=torch.int32)
    d = _from_fp16_bytes(fields["d"])
    dmin = (-_from_fp16_bytes(fields["m"]) if "m" in fields else
            _from_fp16_bytes(fields["dmin"]) if "dmin" in fields else torch.zeros_like(d))
    sc, mn = zeros + 1, zeros + (1 if spec.min_bits == 16 else 0)
    if "scales_q2k" in fields:
        s = fields["scales_q2k"].to(torch.int32)
        sc, mn = s & 15, s >> 4
    elif "scales_q3k" in fields:
        s = fields["scales_q3k"]
        sc = (_unplanes(s[..., :8], 4, 8) | (_unplanes(s[..., 8:], 2, 4) << 4)) - 32
    elif "scales_k4" in fields:
        sc, mn = _unscales_k4(fields["scales_k4"])
    elif "scales_iq4xs" in fields:
        s = fields["scales_iq4xs"]
        sc = (_unplanes(s[..., 2:], 4, 1) | (_unplanes(s[..., :2], 2, 1) << 4)) - 32
    elif "scales_i8" in fields:
        sc = fields["scales_i8"].contiguous().view(torch.int8).to(torch.int32)
    if "int8" in fields:
        q = fields["int8"].contiguous().view(torch.int8).to(torch.int32)
    else:
        u = torch.zeros(out_features, nb, spec.block, dtype=torch.int32)
        for name in (n for n in LAYOUT[spec.name] if n in _PLANES):
            bits, shift, span = _PLANES[name]
            u |= _unplanes(fields[name], bits, span) << shift
        if "word4" in fields:
            u |= _word_bits(fields["word4"]) << 4
        q = u + spec.qmin
    params = GGMLParams(spec, d, dmin, sc.reshape(out_features, -1), mn.reshape(out_features, -1))
    return q.reshape(out_features, -1), params


def _word_bits(b: Tensor) -> Tensor:
    """uint8 [..., 4] little-endian words -> int32 [..., 32]: bit j of each word."""
    word = sum(b[..., k].to(torch.int64) << (8 * k) for k in range(4))
    return ((word[..., None] >> torch.arange(32, dtype=torch.int64)) & 1).to(torch.int32)
