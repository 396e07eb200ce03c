"""IQ4_NL (quant.iq4nl through quant.kquant): a non-uniform 16-level grid under one fp16 scale per 32
weights, Q4_0's bytes. Its scale search beats Q4_0 at the same size on Gaussian weights, weighs by
importance, and GPTQ on its fixed grid lowers the output error below round-to-nearest on that grid."""

from __future__ import annotations

import torch

from mixbits.quant import iq4nl, kquant
from mixbits.quant.spec import GGML_TYPES

IQ4, Q40 = GGML_TYPES["IQ4_NL"], GGML_TYPES["Q4_0"]


def weights(out=64, n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, n, generator=g) * 0.02


def error(w, w_hat, a=None):
    a = torch.ones(w.shape[1]) if a is None else a
    return float((((w - w_hat) ** 2) * a).sum())


def test_same_bytes_as_q4_0_and_lower_error_on_gaussian_weights():
    w = weights()
    assert IQ4.type_size == Q40.type_size == 18 and IQ4.bits_per_weight == 4.5
    assert error(w, kquant.fake_quantize(w, IQ4)) < 0.85 * error(w, kquant.fake_quantize(w, Q40))


def test_codes_index_the_nearest_level_of_the_chosen_scale():
    w = weights(8, 64, seed=2)
    p = kquant.choose_params(w, IQ4)
    codes = kquant.quantize(w, p)
    assert int(codes.min()) >= 0 and int(codes.max()) <= 15
    scale, _ = p.columns()
    values = scale.unsqueeze(-1) * torch.tensor(IQ4.levels, dtype=torch.float32)  # every level, every weight
    best = (w.unsqueeze(-1) - values).abs().amin(-1)
    assert bool(((w - kquant.dequantize(codes, p)).abs() <= best + 1e-7).all())


def test_scales_are_fp16_values_and_a_zero_block_gets_a_zero_scale():
    w = weights(4, 64)
    w[1, :32] = 0.0
    p = kquant.choose_params(w, IQ4)
    assert torch.equal(p.d, p.d.half().float()) and float(p.d[1, 0]) == 0.0
    assert torch.equal(kquant.fake_quantize(w, IQ4)[1, :32], torch.zeros(32))


def test_importance_lowers_the_weighted_error():
    w = weights(32, 512, seed=3)
    a = torch.exp(2 * torch.randn(512, generator=torch.Generator().manual_seed(4)))
    plain, weighted = kquant.fake_quantize(w, IQ4), kquant.fake_quantize(w, IQ4, a)
    assert error(w, weighted, a) < 0.97 * error(w, plain, a)


def test_the_search_beats_the_single_scale_that_maps_the_largest_weight_to_an_end():
    w = weights(16, 256, seed=5)
    x = w.reshape(16, 8, 32)
    mx = x.gather(-1, x.abs().argmax(-1, keepdim=True))
    d = (mx / -127.0).half().float()  # llama.cpp's first guess (-max / values[0])
    levels = iq4nl.levels_tensor(IQ4.levels, w)
    naive = (d * levels[iq4nl.nearest_level(x / d, levels)]).reshape_as(w)
    assert error(w, kquant.fake_quantize(w, IQ4)) < error(w, naive)


def test_gptq_on_the_iq4_nl_grid_lowers_the_output_error():
    w = weights(32, 128, seed=6)
    g = torch.Generator().manual_seed(7)  # correlated inputs, as a layer's are: what GPTQ's feedback uses
    x = torch.randn(512, 16, generator=g) @ torch.randn(16, 128, generator=g) + 0.1 * torch.randn(512, 128, generator=g)
    r = kquant.gptq_ggml(w, x.T @ x, IQ4)
    assert r.error < 0.5 * r.rtn_error
    assert int(r.codes.min()) >= 0 and int(r.codes.max()) <= 15
    assert torch.equal(r.weight, kquant.dequantize(r.codes, r.params))
