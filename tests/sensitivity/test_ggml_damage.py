"""Damage functions measure ggml types with kquant, and mark a type a row cannot take as NaN."""

import numpy as np
import pytest
import torch

from mixbits.allocate.optimal import allocate_optimal
from mixbits.config import AllocationConfig
from mixbits.quant import affine, kquant
from mixbits.quant.spec import GGML_TYPES, QuantSpec
from mixbits.sensitivity.fisher import fisher_damage
from mixbits.sensitivity.gradient import gradient_damage
from mixbits.sensitivity.hessian import hessian_damage
from mixbits.sensitivity.output_error import output_damage
from mixbits.sensitivity.seedfile import relative_weight_mse
from mixbits.sensitivity.table import DamageTable

CONFIGS = AllocationConfig(target_bpw=4.0, candidates="both", bits=(4,), group_sizes=(128,)).configs()
Q4K, Q8 = CONFIGS.index(GGML_TYPES["Q4_K"]), CONFIGS.index(GGML_TYPES["Q8_0"])
AFF = CONFIGS.index(QuantSpec(4, 128))


def weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 256, generator=g), torch.randn(8, 576, generator=g)


def test_fisher_damage_uses_kquant_and_nan_where_the_row_cannot_take_the_type():
    wide, odd = weights()
    fisher = torch.rand(8, 256, generator=torch.Generator().manual_seed(1))
    dmg = fisher_damage(wide, fisher, CONFIGS)
    expected = 0.5 * float((fisher * (kquant.fake_quantize(wide, GGML_TYPES["Q4_K"]) - wide).square()).sum())
    assert dmg[Q4K] == pytest.approx(expected, rel=1e-6)
    assert dmg[AFF] == pytest.approx(
        0.5 * float((fisher * (affine.fake_quantize(wide, QuantSpec(4, 128)) - wide).square()).sum()), rel=1e-6)
    assert dmg[Q8] < dmg[Q4K] and dmg[-1] == 0.0
    odd_dmg = fisher_damage(odd, torch.ones_like(odd), CONFIGS)
    ks = [j for j, c in enumerate(CONFIGS) if getattr(c, "block", 0) == 256]
    assert len(ks) == 6 and np.isnan(odd_dmg[ks]).all()  # the five K-quants and IQ4_XS
    assert np.isfinite(np.delete(odd_dmg, ks)).all()


def test_other_damage_functions_agree_on_which_entries_are_nan():
    _, odd = weights()
    gram = torch.eye(576)
    rows = [gradient_damage(odd, torch.ones_like(odd), CONFIGS), hessian_damage(odd, 1.0, CONFIGS),
            output_damage(odd, gram, 1, CONFIGS)]
    for row in rows:
        assert np.isnan(row[Q4K]) and np.isfinite(row[Q8]) and np.isfinite(row[AFF])
    # output damage with an identity Gram is the squared weight error of the kquant round trip
    assert rows[2][Q8] == pytest.approx(float((kquant.fake_quantize(odd, GGML_TYPES["Q8_0"]) - odd).square().sum()),
                                        rel=1e-5)
    wide, _ = weights(2)
    mse = relative_weight_mse({"wide": wide, "odd": odd}, CONFIGS)
    expected = float((kquant.fake_quantize(wide, GGML_TYPES["Q4_K"]) - wide).square().sum() / wide.square().sum())
    assert mse[Q4K] == pytest.approx(expected, rel=1e-5)  # the mean over the layers that can take it


def test_a_fisher_table_with_nan_entries_allocates_without_them():
    wide, odd = weights(3)
    units = ("wide", "odd")
    damage = np.stack([fisher_damage(w, torch.ones_like(w), CONFIGS) for w in (wide, odd)])
    table = DamageTable(units, ((8, 256), (8, 576)), CONFIGS, damage, "fisher")
    numel = 8 * 256 + 8 * 576
    for bpw in (4.6, 5.0, 6.0):
        specs, sol = allocate_optimal(table, [(u,) for u in units], bpw * numel)
        assert getattr(specs["odd"], "block", 32) != 256 and np.isfinite(sol.damage) and sol.cost <= bpw * numel


def test_quantizer_errors_measure_ggml_types_with_the_quantizer_and_skip_rows_that_cannot_take_them():
    from mixbits.sensitivity.quantizer_damage import quantizer_errors, quantizer_gain

    wide, odd = weights(4)
    x = torch.randn(512, 256, generator=torch.Generator().manual_seed(5)) * torch.rand(256).add(0.1)
    H = x.T @ x
    err, rtn = quantizer_errors(wide, H, CONFIGS, quantizer="gptq")
    res = kquant.gptq_ggml(wide, H, GGML_TYPES["Q4_K"])
    assert err[Q4K] == pytest.approx(res.error, rel=1e-6) and err[Q4K] < rtn[Q4K]
    err, rtn = quantizer_errors(odd, torch.eye(576), CONFIGS, quantizer="clip")
    assert np.isnan(err[Q4K]) and np.isnan(rtn[Q4K]) and np.isfinite(err[Q8])
    assert quantizer_gain(err, rtn)[Q4K] == 1.0  # Fisher's NaN stays NaN in the follow table
