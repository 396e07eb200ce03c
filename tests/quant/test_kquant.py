"""ggml block types as data (GGMLSpec): exact bytes and bits per weight, storable row lengths; quantization
on those grids (quant.kquant): storable, ggml's arithmetic, nearest codes, importance-weighted, GPTQ on the grid."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q
from gguf import quants as gguf_quants

from mixbits.errors import UserError
from mixbits.quant import kquant
from mixbits.quant.cost import layer_bits_per_weight, layer_storage_bytes
from mixbits.quant.gptq import GPTQConfig, gptq_quantize
from mixbits.quant.gptq_fixed import gptq_fixed_grid
from mixbits.quant.groups import expand_groups
from mixbits.quant.spec import GGML_TYPES, GGMLSpec, QuantSpec, ggml_types_for_row

TYPES = list(GGML_TYPES.values())


@pytest.mark.parametrize("spec", TYPES, ids=lambda s: s.name)
def test_block_bytes_equal_ggml(spec):
    assert (spec.block, spec.type_size) == GGML_QUANT_SIZES[Q[spec.name]]
    assert layer_storage_bytes(3, 4 * spec.block, spec) == 3 * 4 * GGML_QUANT_SIZES[Q[spec.name]][1]


def test_bits_per_weight():
    expected = {"Q2_K": 2.625, "Q3_K": 3.4375, "Q4_K": 4.5, "Q5_K": 5.5, "Q6_K": 6.5625, "Q8_0": 8.5,
                "Q4_0": 4.5, "Q4_1": 5.0, "Q5_0": 5.5, "Q5_1": 6.0, "IQ4_NL": 4.5, "IQ4_XS": 4.25}
    assert {s.name: s.bits_per_weight for s in TYPES} == expected
    assert {s.name: layer_bits_per_weight(512, 768, s) for s in TYPES} == expected


def test_row_lengths_choose_the_types():
    assert [s.name for s in ggml_types_for_row(768)] == ["Q2_K", "Q3_K", "IQ4_XS", "Q4_K", "Q4_0", "IQ4_NL", "Q4_1",
                                                          "Q5_K", "Q5_0", "Q5_1", "Q6_K", "Q8_0"]
    assert [s.name for s in ggml_types_for_row(576)] == ["Q4_0", "IQ4_NL", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]
    assert ggml_types_for_row(100) == ()
    with pytest.raises(ValueError, match="576 weights do not split into Q4_K blocks of 256"):
        layer_storage_bytes(8, 576, GGML_TYPES["Q4_K"])


def test_parse_and_ranges():
    assert GGMLSpec.parse(" q3_k ") is GGML_TYPES["Q3_K"] and GGML_TYPES["Q3_K"].label == "q3_k"
    with pytest.raises(UserError, match="unknown ggml type 'q7_k'"):
        GGMLSpec.parse("q7_k")
    q3, q4, q6 = GGML_TYPES["Q3_K"], GGML_TYPES["Q4_K"], GGML_TYPES["Q6_K"]
    assert (q3.qmin, q3.qmax, q3.sc_range, q3.symmetric) == (-4, 3, (-32, 31), True)
    assert (q4.qmin, q4.qmax, q4.sc_range, q4.symmetric) == (0, 15, (0, 63), False)
    assert (q6.qmin, q6.qmax, q6.sc_range) == (-32, 31, (-128, 127))
    assert GGML_TYPES["Q8_0"].sc_range == (1, 1) and not GGML_TYPES["Q8_0"].keep


# --- quantize / dequantize on the grids (quant.kquant) ------------------------------------------

K_TYPES = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]


def weights(out: int, n: int, seed: int = 0) -> torch.Tensor:
    """Gaussian rows with a few outliers and one all-zero block, as real layers have."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out, n, generator=gen) * 0.02
    w[0, 5] = 0.3
    w[1, :32] = 0.0
    return w


def importance(n: int, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.exp(2 * torch.randn(n, generator=gen))


def weighted_error(w, w_hat, a=None) -> float:
    a = torch.ones(w.shape[1]) if a is None else a
    return float((((w - w_hat) ** 2) * a).sum() / ((w**2) * a).sum())


@pytest.mark.parametrize("spec", TYPES, ids=lambda s: s.name)
@pytest.mark.parametrize("with_importance", [False, True])
def test_grid_is_storable(spec, with_importance):
    w = weights(6, 512)
    p = kquant.choose_params(w, spec, importance(512) if with_importance else None)
    q = kquant.quantize(w, p)
    assert p.d.shape == p.dmin.shape == (6, 512 // spec.block)
    assert p.sc.shape == p.mn.shape == (6, 512 // spec.sub_block)
    assert torch.equal(p.d.half().float(), p.d) and torch.equal(p.dmin.half().float(), p.dmin)
    lo, hi = spec.sc_range
    assert int(p.sc.min()) >= lo and int(p.sc.max()) <= hi
    mn_range = (1, 1) if spec.min_bits == 16 else (0, 0) if spec.symmetric else (0, (1 << spec.min_bits) - 1)
    assert int(p.mn.min()) >= mn_range[0] and int(p.mn.max()) <= mn_range[1]
    assert int(q.min()) >= spec.qmin and int(q.max()) <= spec.qmax and q.dtype == torch.int32
    assert torch.equal(kquant.dequantize(q, p)[1, :32], torch.zeros(32))  # a zero block stays zero


@pytest.mark.parametrize("spec", TYPES, ids=lambda s: s.name)
def test_dequantize_is_ggml_formula_and_codes_are_nearest(spec):
    w = weights(2, 256 if spec.block == 256 else 64, seed=3)
    p = kquant.choose_params(w, spec)
    q = kquant.quantize(w, p)
    got = kquant.dequantize(q, p)
    d, dmin, sc, mn = (t.numpy() for t in (p.d, p.dmin, p.sc.float(), p.mn.float()))
    levels = np.array(spec.levels or range(spec.qmin, spec.qmax + 1), dtype=np.float32)  # IQ4_NL/XS: its 16 values
    for r in range(w.shape[0]):
        for i in range(w.shape[1]):  # naive: one weight at a time, float32 as ggml's dequantize_row_*
            b, s = i // spec.block, i // spec.sub_block
            scale, mins = np.float32(d[r, b] * sc[r, s]), np.float32(dmin[r, b] * mn[r, s])
            value = levels[q[r, i].item()] if spec.levels else np.float32(q[r, i].item())
            assert got[r, i].item() == np.float32(scale * value - mins), (r, i)
            best = np.abs(w[r, i].item() - (scale * levels - mins)).min()
            assert abs(w[r, i].item() - got[r, i].item()) <= best + 1e-7, (r, i)


@pytest.mark.parametrize("name", K_TYPES + ["Q4_0", "Q4_1"])
def test_importance_lowers_the_weighted_error(name):
    spec, w, a = GGML_TYPES[name], weights(32, 512), importance(512)
    uniform = kquant.fake_quantize(w, spec)
    weighted = kquant.fake_quantize(w, spec, a)
    assert weighted_error(w, weighted, a) < 0.97 * weighted_error(w, uniform, a)
    assert weighted_error(w, uniform) < weighted_error(w, weighted)  # and each wins on its own objective


def test_error_falls_with_the_type_on_gaussian_weights():
    w = torch.randn(64, 1024, generator=torch.Generator().manual_seed(0))
    errors = [weighted_error(w, kquant.fake_quantize(w, GGML_TYPES[n])) for n in K_TYPES + ["Q8_0"]]
    assert errors == sorted(errors, reverse=True) and errors[0] > 2 * errors[1], errors
    assert 0.03 < errors[2] / errors[0] < 0.1  # Q4_K vs Q2_K: about 4 dB per bit


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"])
def test_legacy_types_beat_llama_cpp_reference_rounding(name):
    """gguf's quantize_blocks is llama.cpp's reference (min-max) rule; the search does better."""
    w = torch.randn(64, 512, generator=torch.Generator().manual_seed(0))
    ref = gguf_quants.dequantize(gguf_quants.quantize(w.numpy(), Q[name]), Q[name])
    ours = weighted_error(w, kquant.fake_quantize(w, GGML_TYPES[name]))
    assert ours < 0.95 * weighted_error(w, torch.from_numpy(ref))


def test_sub_block_fit_is_near_brute_force():
    gen = torch.Generator().manual_seed(0)
    x, a = torch.randn(100, 16, generator=gen), torch.rand(100, 16, generator=gen) ** 2

    def err(s, b, lo, hi):
        q = torch.clamp(torch.round((x - b) / s), lo, hi)
        return (a * (x - s * q - b) ** 2).sum(-1)

    s, b = kquant._fit_affine(x, a, 3, min_le_zero=True)  # 2 bits with a min <= 0, as Q2_K
    grid = [(sv, bv) for bv in torch.linspace(-3, 0, 121) for sv in torch.linspace(0.01, 2.5, 250)]
    brute = torch.stack([err(sv, bv, 0, 3) for sv, bv in grid])
    assert float((err(s, b, 0, 3) / brute.amin(0)).mean()) < 1.02
    s = kquant._fit_scale(x, a, -4, 3, fp16=False)  # 3 bits signed, as Q3_K
    brute = torch.stack([err(sv, 0.0, -4, 3) for sv in torch.linspace(-2, 2, 4001) if sv != 0])
    assert float((err(s, 0.0, -4, 3) / brute.amin(0)).mean()) < 1.02


def correlated_gram(n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mix = torch.eye(n) + 0.3 * torch.randn(n, n, generator=gen) / n**0.5
    x = torch.randn(4 * n, n, generator=gen) @ mix * torch.exp(torch.randn(n, generator=gen))
    return x.T @ x


@pytest.mark.parametrize("name", ["Q2_K", "Q3_K", "Q4_K", "Q6_K", "Q4_1"])
def test_gptq_on_the_grid_lowers_the_output_error(name):
    spec, w, H = GGML_TYPES[name], weights(16, 256), correlated_gram(256)
    r = kquant.gptq_ggml(w, H, spec)
    assert r.error < 0.95 * r.rtn_error
    assert int(r.codes.min()) >= spec.qmin and int(r.codes.max()) <= spec.qmax
    assert torch.equal(r.weight, kquant.dequantize(r.codes, r.params))
    act = kquant.gptq_ggml(w, H, spec, GPTQConfig(act_order=True))
    assert act.error < act.rtn_error and torch.equal(act.params.sc, r.params.sc)  # same grid, other order


def test_gptq_with_a_diagonal_gram_is_rounding_to_nearest():
    w, a = weights(8, 256), importance(256)
    r = kquant.gptq_ggml(w, torch.diag(a), GGML_TYPES["Q3_K"], GPTQConfig(damp=0.0))
    assert torch.equal(r.codes, kquant.quantize(w, r.params)) and r.error == pytest.approx(r.rtn_error)


def test_fixed_grid_gptq_equals_static_group_gptq_on_an_affine_grid():
    w, H = torch.randn(16, 256, dtype=torch.float64), correlated_gram(256).double()
    ref = gptq_quantize(w, H, QuantSpec(3, 64), GPTQConfig(static_groups=True, act_order=True))
    scale = expand_groups(ref.qparams.scale, 256, 64).double()
    zero = expand_groups(ref.qparams.zero, 256, 64).double()
    codes = gptq_fixed_grid(w, H, scale, scale * zero, 0, 7, GPTQConfig(act_order=True))
    assert torch.equal(codes.to(torch.uint8), ref.codes)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="rows of 288 weights do not split into Q4_K blocks of 256"):
        kquant.choose_params(torch.zeros(2, 288), GGML_TYPES["Q4_K"])
    with pytest.raises(ValueError, match=r"importance must be \[256\]"):
        kquant.choose_params(torch.zeros(2, 256), GGML_TYPES["Q4_K"], torch.ones(255))
