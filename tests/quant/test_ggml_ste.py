"""Trainable fake quantization on ggml grids (quant.ggml_ste): the start state is the grid it came from,
exactly; gradients reach the latent weight, the sub-block scales and the mins; whatever training moves,
the finalized grid is storable (codes in range, llama.cpp's decoder reads back the same weights)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf.constants import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from mixbits.quant import ggml_packing, kquant
from mixbits.quant.ggml_ste import fake_quantize_ggml_ste, finalize_grid, start_grid
from mixbits.quant.spec import GGML_TYPES

TYPES = sorted(GGML_TYPES)


def weights(spec, rows=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, 2 * spec.block * (256 // spec.block), generator=g) * 0.02
    w[1, : spec.block] = 0.0  # a block whose scale is 0
    w[2, : spec.block] = 0.01 + 0.001 * torch.rand(spec.block, generator=g)  # an all-positive block
    return w


def params_of(w, spec, seed=0):
    importance = torch.rand(w.shape[1], generator=torch.Generator().manual_seed(seed + 1)) + 0.1
    return kquant.choose_params(w, spec, importance)


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip((a.d, a.dmin, a.sc, a.mn), (b.d, b.dmin, b.sc, b.mn)))


@pytest.mark.parametrize("name", TYPES)
def test_the_start_finalizes_to_its_grid_and_the_forward_is_round_to_nearest_on_it(name):
    spec = GGML_TYPES[name]
    w = weights(spec)
    params = params_of(w, spec)
    scale, mins = start_grid(params)
    assert same(finalize_grid(scale, mins, params), params)
    rtn = kquant.dequantize(kquant.quantize(w, params), params)
    torch.testing.assert_close(fake_quantize_ggml_ste(w, scale, mins, params), rtn, rtol=0, atol=1e-7)


@pytest.mark.parametrize("name", TYPES)
def test_gradients_reach_the_weight_the_scales_and_the_mins(name):
    spec = GGML_TYPES[name]
    w = weights(spec)
    params = params_of(w, spec)
    scale, mins = (t.clone().requires_grad_(True) for t in start_grid(params))
    latent = w.clone().requires_grad_(True)
    target = torch.randn(w.shape, generator=torch.Generator().manual_seed(3)) * 0.02
    ((fake_quantize_ggml_ste(latent, scale, mins, params) - target) ** 2).sum().backward()
    for grad in (latent.grad, scale.grad):
        assert bool(torch.isfinite(grad).all()) and float(grad.abs().sum()) > 0
    if spec.symmetric:  # no min is stored, so none is learned
        assert mins.grad is None
    else:
        assert bool(torch.isfinite(mins.grad).all()) and float(mins.grad.abs().sum()) > 0


@pytest.mark.parametrize("name", TYPES)
def test_moved_scales_finalize_to_a_storable_grid_that_llama_cpp_reads_back(name):
    spec = GGML_TYPES[name]
    w = weights(spec, seed=4)
    params = params_of(w, spec, seed=4)
    scale, mins = start_grid(params)
    g = torch.Generator().manual_seed(5)
    scale = scale * (1 + 0.3 * torch.randn(scale.shape, generator=g)) * 1.5  # far off the grid, out of range
    mins = mins * (1 + 0.3 * torch.randn(mins.shape, generator=g)) + 0.01
    final = finalize_grid(scale, mins, params)
    lo, hi = spec.sc_range
    assert int(final.sc.min()) >= lo and int(final.sc.max()) <= hi
    assert torch.equal(final.d, final.d.half().float()) and torch.equal(final.dmin, final.dmin.half().float())
    # the forward saw the grid that is stored (up to the fp16 rounding of a one-scale type's s and m,
    # as affine training rounds its scales): nearest codes on it give the same weight
    stored = kquant.dequantize(kquant.quantize(w, final), final)
    if not spec.scale_bits:
        scale, mins = scale.half().float(), mins.half().float()
    torch.testing.assert_close(fake_quantize_ggml_ste(w, scale, mins, params), stored, rtol=0, atol=1e-7)
    blocks = ggml_packing.encode(kquant.quantize(w, final), final)
    read = gguf_dequantize(blocks.numpy(), GGMLQuantizationType[name])
    np.testing.assert_array_equal(read.reshape(w.shape), stored.numpy())


def test_a_block_whose_super_scale_is_zero_keeps_its_codes():
    spec = GGML_TYPES["Q4_K"]
    w = weights(spec)
    params = params_of(w, spec)
    assert bool((params.d[1, 0] == 0)), "the all-zero block has a zero super scale"
    scale, mins = start_grid(params)
    final = finalize_grid(scale + 0.05, mins + 0.05, params)
    assert torch.equal(final.sc[1, : spec.subs], params.sc[1, : spec.subs])
    assert torch.equal(final.mn[1, : spec.subs], params.mn[1, : spec.subs])
