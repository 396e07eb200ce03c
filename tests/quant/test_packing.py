"""Bit packing: exact round trips for every width, and byte-for-byte agreement with a naive packer."""

from __future__ import annotations

import pytest
import torch

from mixbits.quant.packing import pack_bits, packed_nbytes, unpack_bits

WIDTHS = range(1, 9)
LENGTHS = (0, 1, 2, 7, 8, 9, 13, 64, 1001)


def naive_pack(codes: list[int], bits: int) -> list[int]:
    """Bit by bit: bit b of code i is stream bit i*bits + b, stream bit k is bit k%8 of byte k//8."""
    out = [0] * ((len(codes) * bits + 7) // 8)
    for i, code in enumerate(codes):
        for b in range(bits):
            k = i * bits + b
            out[k // 8] |= ((code >> b) & 1) << (k % 8)
    return out


def random_codes(n: int, bits: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 1 << bits, (n,), generator=gen, dtype=torch.int64).to(torch.uint8)


@pytest.mark.parametrize("bits", WIDTHS)
@pytest.mark.parametrize("n", LENGTHS)
def test_round_trip_is_exact(bits, n):
    codes = random_codes(n, bits, seed=1000 * bits + n)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.numel() == packed_nbytes(n, bits) == (n * bits + 7) // 8
    back = unpack_bits(packed, bits, n)
    assert back.dtype == torch.uint8
    assert torch.equal(back, codes)


@pytest.mark.parametrize("bits", WIDTHS)
@pytest.mark.parametrize("n", (0, 1, 3, 5, 8, 11, 37))
def test_matches_naive_packer(bits, n):
    codes = random_codes(n, bits, seed=7 * bits + n)
    expected = naive_pack(codes.tolist(), bits)
    assert pack_bits(codes, bits).tolist() == expected


@pytest.mark.parametrize("bits", WIDTHS)
def test_extreme_codes(bits):
    maxq = (1 << bits) - 1
    for value in (0, maxq):
        codes = torch.full((29,), value, dtype=torch.uint8)
        packed = pack_bits(codes, bits)
        assert packed.tolist() == naive_pack(codes.tolist(), bits)
        assert torch.equal(unpack_bits(packed, bits, 29), codes)


def test_multi_dimensional_codes_are_flattened_row_major():
    codes = random_codes(5 * 13, 3, seed=3).view(5, 13)
    assert torch.equal(pack_bits(codes, 3), pack_bits(codes.reshape(-1), 3))
    assert torch.equal(pack_bits(codes.t(), 3), pack_bits(codes.t().contiguous().reshape(-1), 3))


def test_unpack_reads_a_prefix_of_a_longer_stream():
    codes = random_codes(20, 5, seed=4)
    packed = torch.cat([pack_bits(codes, 5), torch.full((4,), 255, dtype=torch.uint8)])
    assert torch.equal(unpack_bits(packed, 5, 20), codes)


def test_wider_integer_dtypes_are_accepted():
    codes = random_codes(33, 6, seed=5)
    assert torch.equal(pack_bits(codes.to(torch.int32), 6), pack_bits(codes, 6))


@pytest.mark.parametrize("bits", (1, 3, 7))
def test_rejects_codes_out_of_range(bits):
    with pytest.raises(ValueError, match=f"accepts \\[0, {(1 << bits) - 1}\\]"):
        pack_bits(torch.tensor([0, 1 << bits], dtype=torch.uint8), bits)
    with pytest.raises(ValueError, match="accepts"):
        pack_bits(torch.tensor([-1, 0], dtype=torch.int32), bits)


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="bits=0"):
        pack_bits(torch.zeros(3, dtype=torch.uint8), 0)
    with pytest.raises(ValueError, match="bits=9"):
        packed_nbytes(3, 9)
    with pytest.raises(ValueError, match="integer tensor"):
        pack_bits(torch.zeros(3), 4)
    with pytest.raises(ValueError, match="need 4 bytes"):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), 4, 8)
    with pytest.raises(ValueError, match="1-D uint8"):
        unpack_bits(torch.zeros(4, dtype=torch.int32), 4, 8)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("bits", WIDTHS)
def test_cuda_packs_like_cpu(bits):
    codes = random_codes(100_003, bits, seed=bits)
    packed = pack_bits(codes.cuda(), bits)
    assert packed.is_cuda and torch.equal(packed.cpu(), pack_bits(codes, bits))
    assert torch.equal(unpack_bits(packed, bits, codes.numel()).cpu(), codes)
