"""Exact bit packing of integer codes of any width 1..8 into a little-endian byte stream.

Layout: the codes are flattened (row-major) and code i occupies stream bits
[i * bits, (i + 1) * bits), least significant bit first; stream bit k is bit (k % 8) of byte
k // 8. So n codes take exactly ceil(n * bits / 8) bytes and 3-, 5-, 6- and 7-bit codes cross
byte boundaries, with no padding between codes (only the last byte may be partly unused, and
its spare bits are 0).

How it is vectorised: 8 codes of `bits` bits fill exactly `bits` bytes. The codes are padded to
a multiple of 8 and each run of 8 is assembled into one int64 word (at most 56 bits for widths
below 8, so no sign bit is touched), whose low `bits` bytes are the packed bytes. The Python
loops run over the 8 code slots and the `bits` bytes of a word, never over elements; the
temporary costs one int64 per 8 codes. Width 8 is the identity.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_CODES_PER_WORD = 8


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits={bits!r} cannot be packed; use an integer width from 1 to 8")


def _prefix(flat: Tensor, n: int) -> Tensor:
    # A copy when cut, so the result does not keep (or serialize) the padded storage behind it.
    return flat if flat.numel() == n else flat[:n].clone()


def packed_nbytes(n: int, bits: int) -> int:
    """Bytes taken by n codes of `bits` bits: ceil(n * bits / 8)."""
    _check_bits(bits)
    if n < 0:
        raise ValueError(f"n={n!r} codes: must be >= 0")
    return math.ceil(n * bits / 8)


def pack_bits(codes: Tensor, bits: int) -> Tensor:
    """Integer codes of any shape, each in [0, 2**bits) -> uint8 1-D stream of packed_nbytes(n, bits)."""
    _check_bits(bits)
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise ValueError(f"codes must be an integer tensor (uint8), got dtype {codes.dtype}")
    flat = codes.reshape(-1)
    n = flat.numel()
    if n and (int(flat.min()) < 0 or int(flat.max()) >= (1 << bits)):
        raise ValueError(
            f"codes span [{int(flat.min())}, {int(flat.max())}]; {bits}-bit packing accepts [0, {(1 << bits) - 1}]"
        )
    if bits == 8:
        return flat.to(torch.uint8).clone()
    words_n = math.ceil(n / _CODES_PER_WORD)
    padded = torch.zeros(words_n * _CODES_PER_WORD, dtype=torch.int64, device=codes.device)
    padded[:n] = flat.to(torch.int64)
    slots = padded.view(words_n, _CODES_PER_WORD)
    word = torch.zeros(words_n, dtype=torch.int64, device=codes.device)
    for j in range(_CODES_PER_WORD):
        word |= slots[:, j] << (j * bits)
    out = torch.empty(words_n, bits, dtype=torch.uint8, device=codes.device)
    for k in range(bits):
        out[:, k] = ((word >> (8 * k)) & 0xFF).to(torch.uint8)
    return _prefix(out.reshape(-1), packed_nbytes(n, bits))


def unpack_bits(packed: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of `pack_bits`: the first n codes of a uint8 1-D stream, as uint8 [n]."""
    _check_bits(bits)
    need = packed_nbytes(n, bits)
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError(f"packed must be a 1-D uint8 tensor, got dtype {packed.dtype} shape {tuple(packed.shape)}")
    if packed.numel() < need:
        raise ValueError(f"{n} codes of {bits} bits need {need} bytes; the packed stream has {packed.numel()}")
    if bits == 8:
        return packed[:n].clone()
    words_n = math.ceil(n / _CODES_PER_WORD)
    stream = torch.zeros(words_n * bits, dtype=torch.int64, device=packed.device)
    stream[:need] = packed[:need].to(torch.int64)
    planes = stream.view(words_n, bits)
    word = torch.zeros(words_n, dtype=torch.int64, device=packed.device)
    for k in range(bits):
        word |= planes[:, k] << (8 * k)
    out = torch.empty(words_n, _CODES_PER_WORD, dtype=torch.uint8, device=packed.device)
    mask = (1 << bits) - 1
    for j in range(_CODES_PER_WORD):
        out[:, j] = ((word >> (j * bits)) & mask).to(torch.uint8)
    return _prefix(out.reshape(-1), n)
