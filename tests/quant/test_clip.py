"""Clip search against a plain per-group brute force, and never worse than min-max on its objective."""

from __future__ import annotations

import pytest
import torch

from mixbits.quant.affine import dequantize, fake_quantize, minmax_qparams, quantize
from mixbits.quant.clip import clip_fake_quantize, search_qparams
from mixbits.quant.spec import KEEP, QuantSpec

FP16_TINY = 2.0**-14


def outlier_weight(out_features=16, in_features=200, seed=0, outliers=0.02):
    """Gaussian weights with a few large outliers (some groups lopsided)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=gen) * 0.05
    mask = torch.rand(out_features, in_features, generator=gen) < outliers
    w[mask] += torch.randn(int(mask.sum()), generator=gen).sign() * (0.3 + torch.rand(int(mask.sum()), generator=gen))
    w[-1] = w[-1].abs()  # a row with no negative weight
    return w


def group_errors(w, fq, group_size, importance=None):
    """Plain sum_j a_j (w_j - w_hat_j)^2 per row and group [out, G], short last group included."""
    out_features, in_features = w.shape
    gs = in_features if group_size is None else group_size
    a = torch.ones(in_features) if importance is None else importance
    starts = list(range(0, in_features, gs))
    err = torch.zeros(out_features, len(starts), dtype=torch.float64)
    for g, start in enumerate(starts):
        d = (w[:, start : start + gs] - fq[:, start : start + gs]).double()
        err[:, g] = (d * d * a[start : start + gs].double()).sum(dim=1)
    return err


def brute_force_diagonal(w, spec, importance, grid, max_shrink):
    """Per row and group, every ratio r of [r * min, r * max] written out; the best error [out, G]."""
    out_features, in_features = w.shape
    gs = in_features if spec.group_size is None else spec.group_size
    ratios = [1.0] if grid == 1 else [1.0 - max_shrink * k / (grid - 1) for k in range(grid)]
    starts = list(range(0, in_features, gs))
    best = torch.full((out_features, len(starts)), float("inf"), dtype=torch.float64)
    for r in range(out_features):
        for g, start in enumerate(starts):
            seg = w[r, start : start + gs]
            a = importance[start : start + gs].double()
            lo0, hi0 = torch.clamp(seg.min(), max=0.0), torch.clamp(seg.max(), min=0.0)
            for ratio in ratios:
                lo, hi = lo0 * ratio, hi0 * ratio
                if spec.symmetric:
                    s = torch.clamp(2 * torch.maximum(-lo, hi) / spec.maxq, FP16_TINY, 65504.0).half().float()
                    z = torch.tensor(2.0 ** (spec.bits - 1))
                else:
                    s = torch.clamp((hi - lo) / spec.maxq, FP16_TINY, 65504.0).half().float()
                    z = torch.clamp(torch.round(-lo / s), 0, spec.maxq)
                q = torch.clamp(torch.round(seg / s) + z, 0, spec.maxq)
                e = (((seg - (q - z) * s).double() ** 2) * a).sum()
                best[r, g] = torch.minimum(best[r, g], e)
    return best


def close_or_below(a, b):
    return bool((a <= b * (1 + 1e-6) + 1e-12).all())


SPECS = [QuantSpec(2, 64), QuantSpec(3, 32), QuantSpec(4, 128), QuantSpec(3, None), QuantSpec(4, 64, True)]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.label)
def test_grid_one_is_minmax_exactly(spec):
    w = outlier_weight(seed=1)
    for refine in (False, True):
        qp, mm = search_qparams(w, spec, grid=1, refine=refine), minmax_qparams(w, spec)
        assert torch.equal(qp.scale, mm.scale) and torch.equal(qp.zero, mm.zero)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.label)
def test_diagonal_search_matches_brute_force(spec):
    w = outlier_weight(out_features=6, seed=2)
    imp = torch.rand(200, generator=torch.Generator().manual_seed(3)) + 0.1
    qp = search_qparams(w, spec, importance=imp, grid=12, max_shrink=0.6, refine=False)
    got = group_errors(w, fake_quantize(w, spec, qp), spec.group_size, imp)
    ref = brute_force_diagonal(w, spec, imp, grid=12, max_shrink=0.6)
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.label)
@pytest.mark.parametrize("weighted", (False, True), ids=("plain", "imatrix"))
def test_never_worse_than_minmax_and_better_with_outliers(spec, weighted):
    for seed in range(2):
        w = outlier_weight(out_features=48, seed=10 + seed)
        imp = torch.rand(200, generator=torch.Generator().manual_seed(seed)) ** 2 if weighted else None
        mm = group_errors(w, fake_quantize(w, spec), spec.group_size, imp)
        diag = group_errors(w, clip_fake_quantize(w, spec, imp, refine=False), spec.group_size, imp)
        full = group_errors(w, clip_fake_quantize(w, spec, imp), spec.group_size, imp)
        assert close_or_below(diag, mm) and close_or_below(full, diag)
        assert full.sum() < 0.97 * mm.sum()  # outliers make min-max steps too coarse


def test_refine_helps_lopsided_groups():
    gen = torch.Generator().manual_seed(5)
    w = (torch.rand(64, 128, generator=gen) * 2 - 1) * 0.1  # a tight body in [-0.1, 0.1]
    w[:, 0] = 0.2  # one positive outlier per row: only the top end is worth clipping
    spec = QuantSpec(3, 128)
    diag = group_errors(w, clip_fake_quantize(w, spec, refine=False), 128)
    full = group_errors(w, clip_fake_quantize(w, spec), 128)
    assert close_or_below(full, diag) and full.sum() < 0.95 * diag.sum()


@pytest.mark.parametrize("refine", (False, True))
def test_importance_protects_the_important_columns(refine):
    spec = QuantSpec(3, 64)
    w = outlier_weight(out_features=32, in_features=256, seed=6)
    imp = torch.zeros(256)
    hot = torch.tensor([3, 17, 70, 71, 130, 200, 255])
    imp[hot] = 1.0
    weighted = clip_fake_quantize(w, spec, imp, refine=refine)
    plain = clip_fake_quantize(w, spec, refine=refine)
    err_w = group_errors(w, weighted, 64, imp)
    err_p = group_errors(w, plain, 64, imp)
    if refine:  # coordinate descent paths differ: guaranteed only through the shared diagonal
        assert err_w.sum() <= err_p.sum()
    else:  # the weighted search saw every candidate the plain one did
        assert close_or_below(err_w, err_p)
    assert err_w.sum() < err_p.sum()


def test_result_is_storable_and_round_trips():
    from mixbits.quant.qlinear import QuantLinear

    w = outlier_weight(seed=7)
    for spec in (QuantSpec(3, 64), QuantSpec(4, None, True), QuantSpec(2, 32)):
        qp = search_qparams(w, spec)
        assert torch.equal(qp.scale, qp.scale.half().float()) and bool((qp.scale >= FP16_TINY).all())
        assert torch.equal(qp.zero, qp.zero.round()) and int(qp.zero.max()) <= spec.maxq
        codes = quantize(w, qp, spec)
        layer = QuantLinear.from_weight(w, None, spec, qparams=qp)
        assert torch.equal(layer.dequantized_weight(), dequantize(codes, qp, spec))
        assert torch.equal(layer.dequantized_weight(), clip_fake_quantize(w, spec))


def test_degenerate_groups_and_dtypes():
    w = outlier_weight(seed=8)
    w[1] = 0.0
    spec = QuantSpec(4, 64)
    fq = clip_fake_quantize(w, spec)
    assert bool((fq[1] == 0).all()) and bool(torch.isfinite(fq).all())
    wb = w.bfloat16()
    out = clip_fake_quantize(wb, spec)
    assert out.dtype == torch.bfloat16 and torch.equal(out, clip_fake_quantize(wb.float(), spec).bfloat16())
    assert torch.equal(clip_fake_quantize(wb, KEEP), wb)


def test_errors_name_the_bad_value():
    w = outlier_weight(seed=9)
    spec = QuantSpec(4, 64)
    with pytest.raises(ValueError, match=r"expected \[200\]"):
        search_qparams(w, spec, importance=torch.ones(100))
    with pytest.raises(ValueError, match=">= 0"):
        search_qparams(w, spec, importance=-torch.ones(200))
    with pytest.raises(ValueError, match="grid=0"):
        search_qparams(w, spec, grid=0)
    with pytest.raises(ValueError, match="max_shrink=1.0"):
        search_qparams(w, spec, max_shrink=1.0)
    with pytest.raises(ValueError, match="fp16"):
        search_qparams(w, KEEP)


def test_rows_maxq_searches_each_row_as_with_its_own_spec():
    """Rows bound for several bit-widths searched in one pass give each bit-width's own result."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(12, 128, generator=g)
    imp = torch.rand(128, generator=g)
    bits = [2, 3, 4, 8]
    rows_maxq = torch.tensor([[float((1 << b) - 1)] for b in bits for _ in range(3)])
    joint = search_qparams(w, QuantSpec(2, 64), importance=imp, rows_maxq=rows_maxq)
    for k, b in enumerate(bits):
        alone = search_qparams(w[3 * k:3 * k + 3], QuantSpec(b, 64), importance=imp)
        assert torch.equal(joint.scale[3 * k:3 * k + 3], alone.scale)
        assert torch.equal(joint.zero[3 * k:3 * k + 3], alone.zero)
    with pytest.raises(ValueError, match="rows_maxq"):
        search_qparams(w, QuantSpec(2, 64, True), rows_maxq=rows_maxq)
