"""GPTQ against a plain column-by-column reference; beats RTN on output error; exact round-trips."""

from __future__ import annotations

import logging

import pytest
import torch

from mixbits.quant.affine import QParams, dequantize, fake_quantize, minmax_qparams, quantize
from mixbits.quant.clip import clip_fake_quantize
from mixbits.quant.gptq import GPTQConfig, gptq_quantize
from mixbits.quant.gram import GramAccumulator, gram, output_error
from mixbits.quant.packing import pack_bits, unpack_bits
from mixbits.quant.qlinear import QuantLinear
from mixbits.quant.spec import KEEP, QUANT_BITS, QuantSpec


def layer(out_features=32, in_features=256, tokens=2048, seed=0, spread=0.5):
    """Weights and X = Z A diag(exp(spread * n)): correlated columns of unequal scale; (w, X, H)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=gen) * 0.05
    a = torch.randn(in_features, in_features, generator=gen) / in_features**0.5
    col_scale = torch.exp(spread * torch.randn(in_features, generator=gen))
    x = torch.randn(tokens, in_features, generator=gen) @ a * col_scale
    return w, x, x.T @ x


def reference_gptq(w, H, spec, damp=0.01, act_order=False):
    """GPTQ written plainly: one column at a time, every later column updated at once, no blocks."""
    W, H = w.clone(), H.clone().to(w.dtype)
    n = W.shape[1]
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    perm = torch.argsort(torch.diagonal(H), descending=True, stable=True) if act_order else torch.arange(n)
    W, H = W[:, perm], H[perm][:, perm]
    H = H + damp * torch.diagonal(H).mean() * torch.eye(n, dtype=H.dtype)
    Hinv = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)
    gs = n if spec.group_size is None else spec.group_size
    Q = torch.zeros_like(W)
    for i in range(n):
        if i % gs == 0:  # group parameters from the weights as updated so far
            qp = minmax_qparams(W[:, i : i + gs], QuantSpec(spec.bits, None, spec.symmetric))
            s, z = qp.scale[:, 0], qp.zero[:, 0]
        q = (torch.clamp(torch.round(W[:, i] / s) + z, 0, spec.maxq) - z) * s
        Q[:, i] = q
        err = (W[:, i] - q) / Hinv[i, i]
        W[:, i + 1 :] -= torch.outer(err, Hinv[i, i + 1 :])
    return Q[:, torch.argsort(perm)]




@pytest.mark.parametrize("group_size", (32, 64, 128, None), ids=lambda g: f"g{g}")
@pytest.mark.parametrize("bits", QUANT_BITS)
def test_beats_rtn_on_output_error(bits, group_size):
    w, x, H = layer(seed=bits)
    for spec in (QuantSpec(bits, group_size),) + ((QuantSpec(bits, group_size, True),) if bits in (3, 4) else ()):
        res = gptq_quantize(w, H, spec)
        rtn = fake_quantize(w, spec)
        assert res.rtn_error == pytest.approx(float(((x @ (w - rtn).T) ** 2).sum()), rel=1e-3)
        assert res.error == pytest.approx(float(((x @ (w - res.weight).T) ** 2).sum()), rel=1e-3)
        assert res.error < 0.9 * res.rtn_error, spec.label


@pytest.mark.parametrize(
    "spec, in_features, block_size",
    [
        (QuantSpec(3, 64), 200, 48),  # groups straddle blocks and the last group is short
        (QuantSpec(4, 32), 200, 128),  # several groups per block
        (QuantSpec(2, None), 150, 64),  # per-channel
        (QuantSpec(4, 64, True), 200, 32),
    ],
    ids=lambda v: getattr(v, "label", str(v)),
)
@pytest.mark.parametrize("act_order", (False, True), ids=("natural", "act_order"))
def test_matches_column_by_column_reference(spec, in_features, block_size, act_order):
    """In float64 the blocked order equals the plain one to rounding; in float32 a last-bit
    difference can tip a rounding (or fp16-scale) decision now and then, so there we ask for
    almost all weights equal and the same output error."""
    w, _, H = layer(out_features=24, in_features=in_features, tokens=1024, seed=in_features + block_size)
    cfg = GPTQConfig(block_size=block_size, act_order=act_order)
    res64 = gptq_quantize(w.double(), H.double(), spec, cfg)
    ref64 = reference_gptq(w.double(), H.double(), spec, act_order=act_order)
    assert torch.allclose(res64.weight.double(), ref64, atol=1e-9, rtol=0)
    res = gptq_quantize(w, H, spec, cfg)
    ref = reference_gptq(w, H, spec, act_order=act_order)
    assert ((res.weight - ref).abs() <= 1e-5).float().mean() > 0.98
    assert res.error == pytest.approx(output_error(w, ref, H), rel=2e-3)


def test_act_order_rescues_heavy_tailed_inputs_at_2_bits():
    """Inputs whose scales span e^+-2: in natural order the early, unimportant columns absorb
    the error of important ones and widen the later groups; act-order rounds the important first."""
    w, _, H = layer(seed=11, spread=1.0)
    spec = QuantSpec(2, 64)
    natural = gptq_quantize(w, H, spec)
    ordered = gptq_quantize(w, H, spec, GPTQConfig(act_order=True))
    assert ordered.error < 0.5 * natural.rtn_error and ordered.error < 0.6 * natural.error


@pytest.mark.parametrize("spec", (QuantSpec(3, 64), QuantSpec(4, None), QuantSpec(2, 32, True)), ids=lambda s: s.label)
def test_codes_and_qparams_reproduce_the_weight(spec):
    w, _, H = layer(in_features=200, seed=1)
    res = gptq_quantize(w, H, spec, GPTQConfig(block_size=64))
    assert res.codes.dtype == torch.uint8 and res.perm is None
    gs = 200 if spec.group_size is None else spec.group_size
    assert torch.equal(res.g_idx, (torch.arange(200) // gs).int())
    assert torch.equal(dequantize(res.codes, res.qparams, spec), res.weight)
    assert torch.equal(quantize(res.weight, res.qparams, spec), res.codes)
    packed = QuantLinear.from_weight(res.weight, None, spec, qparams=res.qparams)
    assert torch.equal(packed.codes(), res.codes) and torch.equal(packed.dequantized_weight(), res.weight)


@pytest.mark.parametrize("spec", (QuantSpec(3, 64), QuantSpec(5, 32, True)), ids=lambda s: s.label)
def test_act_order_round_trips_through_g_idx(spec):
    w, _, H = layer(in_features=200, seed=2)
    res = gptq_quantize(w, H, spec, GPTQConfig(act_order=True))
    perm, g_idx = res.perm, res.g_idx.long()
    assert sorted(perm.tolist()) == list(range(200))
    assert torch.equal(g_idx[perm], torch.arange(200) // spec.group_size)
    assert not torch.equal(g_idx, torch.arange(200) // spec.group_size)  # the order really changed
    codes = unpack_bits(pack_bits(res.codes, spec.bits), spec.bits, res.codes.numel()).view_as(res.codes)
    scale, zero = res.qparams.scale[:, g_idx], res.qparams.zero[:, g_idx]
    assert torch.equal((codes.float() - zero) * scale, res.weight)
    assert res.error < res.rtn_error


@pytest.mark.parametrize("act_order", (False, True))
def test_static_groups_use_the_original_order(act_order):
    spec = QuantSpec(3, 64)
    w, _, H = layer(in_features=200, seed=3)
    res = gptq_quantize(w, H, spec, GPTQConfig(act_order=act_order, static_groups=True))
    mm = minmax_qparams(w, spec)  # static: computed before any update
    assert torch.equal(res.qparams.scale, mm.scale) and torch.equal(res.qparams.zero, mm.zero)
    assert torch.equal(res.g_idx, (torch.arange(200) // 64).int())
    assert torch.equal(dequantize(res.codes, res.qparams, spec), res.weight)
    assert res.error < res.rtn_error


def test_clip_lowers_the_error_further_at_low_bits():
    w, _, H = layer(seed=4)
    w[:, ::37] *= 8.0  # outlier columns
    spec = QuantSpec(3, 64)
    plain = gptq_quantize(w, H, spec)
    clipped = gptq_quantize(w, H, spec, GPTQConfig(clip=True))
    clip_rtn = output_error(w, clip_fake_quantize(w, spec, torch.diagonal(H)), H)
    assert clip_rtn < plain.rtn_error
    assert clipped.error < plain.error
    assert torch.equal(dequantize(clipped.codes, clipped.qparams, spec), clipped.weight)


def test_dead_columns_are_zero():
    w, x, _ = layer(in_features=128, seed=5)
    x[:, [0, 9, 100]] = 0.0
    res = gptq_quantize(w, gram(x), QuantSpec(4, 32), GPTQConfig(act_order=True))
    assert bool(torch.isfinite(res.weight).all()) and bool((res.weight[:, [0, 9, 100]] == 0).all())
    assert res.error < res.rtn_error


def test_scale_of_H_does_not_matter():
    # Without dead columns (their H_ii = 1 is not scaled, so it shifts the relative damping).
    w, x, H = layer(in_features=128, tokens=1000, seed=5)
    spec = QuantSpec(4, 32)
    sum_form = gptq_quantize(w.double(), H.double(), spec)
    mean_form = gptq_quantize(w.double(), H.double() * (2.0 / x.shape[0]), spec)  # GPTQ's 2/n convention
    assert torch.allclose(mean_form.weight, sum_form.weight, atol=1e-9, rtol=0)


def test_gram_accumulator_sums_batches():
    _, x, H = layer(in_features=64, tokens=300, seed=6)
    acc = GramAccumulator(64)
    assert torch.equal(acc.H, torch.zeros(64, 64))
    for chunk in x.view(3, 100, 64).unbind(0):
        acc.add(chunk.view(4, 25, 64).half())  # any leading shape and dtype
    assert acc.count == 300 and acc.H.dtype == torch.float32
    expected = gram(x.half())
    assert torch.allclose(acc.H, expected, rtol=1e-5, atol=1e-4)
    assert torch.allclose(acc.mean(), expected / 300, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"expected \[\.\.\., 64\]"):
        acc.add(torch.ones(3, 63))
    with pytest.raises(ValueError, match="no inputs"):
        GramAccumulator(8).mean()


def test_singular_H_raises_damping_and_logs(caplog):
    w, x, _ = layer(in_features=64, tokens=8, seed=7)  # rank 8 < 64
    with caplog.at_level(logging.WARNING, logger="mixbits.quant.gptq"):
        res = gptq_quantize(w, gram(x), QuantSpec(4, 32), GPTQConfig(damp=0.0))
    assert bool(torch.isfinite(res.weight).all())
    assert any("damp" in r.getMessage() for r in caplog.records)


def test_errors_name_the_bad_value():
    w, _, H = layer(in_features=64, tokens=100, seed=8)
    spec = QuantSpec(4, 32)
    with pytest.raises(ValueError, match=r"needs H \[64, 64\]"):
        gptq_quantize(w, H[:32, :32], spec)
    with pytest.raises(ValueError, match="not positive definite"):
        gptq_quantize(w, -torch.eye(64), spec)
    with pytest.raises(ValueError, match="inf or nan"):
        gptq_quantize(w, H * float("nan"), spec)
    with pytest.raises(ValueError, match="fp16"):
        gptq_quantize(w, H, KEEP)
    with pytest.raises(ValueError, match="block_size=0"):
        GPTQConfig(block_size=0)
    with pytest.raises(ValueError, match="damp=-1"):
        GPTQConfig(damp=-1.0)


def test_inputs_are_not_modified_and_dtype_is_float32():
    w, _, H = layer(in_features=64, tokens=200, seed=9)
    w[:, 3] = 1.0
    H[5, :] = H[:, 5] = 0.0
    w0, H0 = w.clone(), H.clone()
    res = gptq_quantize(w.bfloat16(), H, QuantSpec(3, 32), GPTQConfig(act_order=True))
    assert torch.equal(w, w0) and torch.equal(H, H0)
    assert res.weight.dtype == torch.float32 and isinstance(res.qparams, QParams)


@pytest.fixture
def threads():
    """Set torch's intra-op thread count inside a test; the count is restored after."""
    saved = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(saved)


@pytest.mark.parametrize("cfg", (GPTQConfig(clip=True), GPTQConfig(act_order=True)), ids=("clip", "act_order"))
def test_same_codes_at_any_thread_count(threads, cfg):
    """MKL's Cholesky rounds differently with 1 and 2 threads (27 of 28 SmolLM2 layers got other scales)
    before `inverse_cholesky` ran single-threaded; now the codes are a function of w and H alone."""
    w, _, H = layer(out_features=192, in_features=576, tokens=4096, seed=11)
    spec = QuantSpec(3, 64)
    results = []
    for n in (1, 2):
        threads(n)
        results.append(gptq_quantize(w, H, spec, cfg))
    for other in results[1:]:
        assert torch.equal(other.codes, results[0].codes)
        assert torch.equal(other.qparams.scale, results[0].qparams.scale)
        assert torch.equal(other.qparams.zero, results[0].qparams.zero)
        assert torch.equal(other.weight, results[0].weight)
    assert torch.get_num_threads() == 2  # inverse_cholesky restored the caller's count


def test_gram_is_the_same_at_any_thread_count(threads):
    """A narrow layer over many tokens: MKL splits the token sum across threads unless sliced."""
    x = torch.randn(1, 8192, 64, generator=torch.Generator().manual_seed(2))
    sums = []
    for n in (1, 2):
        threads(n)
        acc = GramAccumulator(64)
        acc.add(x)
        sums.append(acc.H.clone())
    assert torch.equal(sums[0], sums[1])
    torch.testing.assert_close(sums[0], x[0].double().T @ x[0].double(), rtol=1e-5, atol=1e-3, check_dtype=False)


@pytest.mark.parametrize("cfg", [GPTQConfig(), GPTQConfig(clip=True), GPTQConfig(act_order=True, clip=True),
                                 GPTQConfig(act_order=True, static_groups=True, clip=True)])
def test_sweep_equals_one_run_per_spec_bit_for_bit(cfg):
    """gptq_sweep stacks the rows of every bit-width of a group size into one column loop and
    factors H once; each spec's result is still exactly gptq_quantize's."""
    from mixbits.quant.gptq import gptq_factor, gptq_sweep

    g = torch.Generator().manual_seed(7)
    x = torch.randn(400, 128, generator=g) * torch.rand(128, generator=g) * 2
    x[:, 3] = 0.0
    w, H = torch.randn(40, 128, generator=g) * 0.1, x.T @ x
    specs = [QuantSpec(2, 32), QuantSpec(4, 32), QuantSpec(3, 64), QuantSpec(8, 32), QuantSpec(3, 32, True),
             QuantSpec(3, None)]
    for factor in (None, gptq_factor(H, cfg)):
        for spec, res in zip(specs, gptq_sweep(w, H, specs, cfg, factor)):
            alone = gptq_quantize(w, H, spec, cfg)
            assert torch.equal(res.codes, alone.codes) and torch.equal(res.weight, alone.weight)
            assert torch.equal(res.qparams.scale, alone.qparams.scale) and torch.equal(res.g_idx, alone.g_idx)
            assert (res.error, res.rtn_error) == (alone.error, alone.rtn_error)
