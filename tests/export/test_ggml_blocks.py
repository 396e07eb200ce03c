"""GGUF blocks of every ggml type mixbits writes, checked against an independent decoder:
`gguf.quants.dequantize` (llama.cpp's block layouts in numpy) must read back exactly the weights
mixbits computed, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf.quants import dequantize as gguf_dequantize

from mixbits.export.ggml_blocks import encode_ggml
from mixbits.quant import kquant
from mixbits.quant.spec import GGML_TYPES

TYPES = list(GGML_TYPES.values())


def decoded(codes, params) -> torch.Tensor:
    kind, blocks = encode_ggml(codes, params)
    out, n = codes.shape
    assert kind.name == params.spec.name and blocks.dtype == np.uint8
    assert blocks.shape == (out, n // params.spec.block * GGML_QUANT_SIZES[kind][1])
    return torch.from_numpy(np.asarray(gguf_dequantize(blocks, kind), dtype=np.float32).copy())


@pytest.mark.parametrize("spec", TYPES, ids=lambda s: s.name)
@pytest.mark.parametrize("shape", [(1, 256), (5, 512), (3, 1024)])
def test_quantized_weights_read_back_exactly(spec, shape):
    gen = torch.Generator().manual_seed(shape[0])
    w = torch.randn(*shape, generator=gen) * torch.rand(shape[1], generator=gen) * 0.05
    for imp in (None, torch.rand(shape[1], generator=gen) ** 4):
        params = kquant.choose_params(w, spec, imp)
        codes = kquant.quantize(w, params)
        assert torch.equal(decoded(codes, params), kquant.dequantize(codes, params))


@pytest.mark.parametrize("spec", TYPES, ids=lambda s: s.name)
def test_gptq_codes_read_back_exactly(spec):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(600, 256, generator=gen) * torch.exp(torch.randn(256, generator=gen))
    r = kquant.gptq_ggml(torch.randn(4, 256, generator=gen), x.T @ x, spec)
    assert torch.equal(decoded(r.codes, r.params), r.weight)


@pytest.mark.parametrize("spec", TYPES, ids=lambda s: s.name)
def test_every_field_value_reads_back(spec):
    """Codes, scale and min codes over their whole ranges (both ends included), fp16 super scales
    of both signs, subnormal and large: every bit of every field lands where ggml reads it."""
    gen = torch.Generator().manual_seed(7)
    out, n = 6, 512
    nb, ns = n // spec.block, n // spec.sub_block

    def ints(lo, hi, size):
        t = torch.randint(lo, hi + 1, size, generator=gen, dtype=torch.int32)
        t.view(-1)[:2] = torch.tensor([lo, hi], dtype=torch.int32)
        return t

    def fp16(size):
        return (torch.randn(size, generator=gen) * 10.0 ** torch.randint(-7, 3, size, generator=gen)).half().float()

    lo, hi = spec.sc_range
    mn_lo, mn_hi = (1, 1) if spec.min_bits == 16 else (0, 0) if spec.symmetric else (0, (1 << spec.min_bits) - 1)
    dmin = torch.zeros(out, nb) if spec.symmetric else fp16((out, nb))
    params = kquant.GGMLParams(spec, fp16((out, nb)), dmin, ints(lo, hi, (out, ns)), ints(mn_lo, mn_hi, (out, ns)))
    codes = ints(spec.qmin, spec.qmax, (out, n))
    assert torch.equal(decoded(codes, params), kquant.dequantize(codes, params))


def test_codes_out_of_range_are_refused():
    spec = GGML_TYPES["Q3_K"]
    params = kquant.choose_params(torch.randn(1, 256), spec)
    with pytest.raises(ValueError, match=r"Q3_K codes must lie in \[-4, 3\]"):
        encode_ggml(torch.full((1, 256), 4, dtype=torch.int32), params)
