"""The ggml types' Fisher and gradient damage on `damage_rows` strided rows per layer, scaled to the layer."""

import numpy as np
import pytest
import torch

from mixbits.config import AllocationConfig, RunConfig
from mixbits.errors import UserError
from mixbits.jobs.analyze_config import AnalyzeConfig
from mixbits.model.arch import find_linears
from mixbits.quant.spec import GGML_TYPES, KEEP, GGMLSpec, QuantSpec
from mixbits.sensitivity.cache import cache_key_parts
from mixbits.sensitivity.damage_rows import damage_row_options
from mixbits.sensitivity.fisher import fisher_damage
from mixbits.sensitivity.gradient import gradient_damage
from mixbits.sensitivity.methods import compute_tables
from mixbits.sensitivity.quantizer_damage import sample_rows
from tests.conftest import tiny_llama

CPU = torch.device("cpu")
CONFIGS = (QuantSpec(3, 32), GGML_TYPES["Q4_0"], GGML_TYPES["IQ4_NL"], GGML_TYPES["Q3_K"], GGML_TYPES["Q5_1"], KEEP)
GGML = [j for j, c in enumerate(CONFIGS) if isinstance(c, GGMLSpec)]
AFFINE = [j for j, c in enumerate(CONFIGS) if isinstance(c, QuantSpec) and not c.keep]


def layer(out=48, inp=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * torch.rand(out, 1, generator=g)  # rows of different scales
    return w, torch.rand(out, inp, generator=g), torch.randn(out, inp, generator=g)


@pytest.mark.parametrize("rows", [48, 49, 1000])
def test_rows_covering_the_layer_give_the_full_damage_exactly(rows):
    w, fisher, grad = layer()
    full, full_g = fisher_damage(w, fisher, CONFIGS), gradient_damage(w, grad, CONFIGS)
    np.testing.assert_array_equal(fisher_damage(w, fisher, CONFIGS, damage_rows=rows), full)
    np.testing.assert_array_equal(gradient_damage(w, grad, CONFIGS, damage_rows=rows), full_g)
    for every in (0, None):
        np.testing.assert_array_equal(fisher_damage(w, fisher, CONFIGS, damage_rows=every),
                                      fisher_damage(w, fisher, CONFIGS))


def test_sampled_ggml_damage_is_the_sampled_rows_scaled_and_affine_stays_exact():
    w, fisher, grad = layer()
    idx = sample_rows(48, 8)
    part, full = fisher_damage(w, fisher, CONFIGS, damage_rows=8), fisher_damage(w, fisher, CONFIGS)
    alone = fisher_damage(w[idx], fisher[idx], CONFIGS)  # the rows quantized on their own
    np.testing.assert_allclose(part[GGML], alone[GGML] * 48 / 8, rtol=1e-12)
    np.testing.assert_array_equal(part[AFFINE], full[AFFINE])
    assert not np.allclose(part[GGML], full[GGML], rtol=1e-3)  # an estimate: a different number
    g_part, g_alone = gradient_damage(w, grad, CONFIGS, damage_rows=8), gradient_damage(w[idx], grad[idx], CONFIGS)
    np.testing.assert_allclose(g_part[GGML], g_alone[GGML] * 6, rtol=1e-12)
    assert part[-1] == g_part[-1] == 0.0


@pytest.mark.parametrize("name", list(GGML_TYPES))
def test_every_ggml_type_quantizes_the_sampled_rows_as_the_whole_layer_does(name):
    """What makes the sampled damage exact on its rows: no ggml type's grid depends on other rows."""
    from mixbits.quant.fake import fake_quantize

    w, _, _ = layer()
    idx = sample_rows(48, 8)
    assert torch.equal(fake_quantize(w[idx], GGML_TYPES[name]), fake_quantize(w, GGML_TYPES[name])[idx])


def test_a_type_the_row_cannot_take_stays_nan_when_sampled():
    w, fisher, grad = layer(inp=96)  # 96 = 3 blocks of 32: no K-quant
    q3k = CONFIGS.index(GGML_TYPES["Q3_K"])
    for dmg in (fisher_damage(w, fisher, CONFIGS, damage_rows=8), gradient_damage(w, grad, CONFIGS, damage_rows=8)):
        assert np.isnan(dmg[q3k]) and np.isfinite(np.delete(dmg, q3k)).all()


def tables(model, rows, methods=("fisher",)):
    linears = find_linears(model)
    wins = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(3))
    configs = AllocationConfig(target_bpw=4.0, candidates="both", bits=(3, 4), group_sizes=(32,)).configs()
    return compute_tables(methods, model, wins, linears, configs, device=CPU, progress=False,
                          options=damage_row_options(methods, configs, rows)), configs


def test_scaled_sample_is_close_on_a_tiny_model_and_the_table_records_it():
    model = tiny_llama()
    full, configs = tables(model, None)
    part, _ = tables(model, 16)
    full, part = full["fisher"], part["fisher"]
    assert part.meta["options"] == {"damage_rows": 16} and full.meta["options"] == {}
    ggml = [j for j, c in enumerate(configs) if isinstance(c, GGMLSpec)]
    affine = [j for j, c in enumerate(configs) if not isinstance(c, GGMLSpec)]
    np.testing.assert_array_equal(part.damage[:, affine], full.damage[:, affine])
    est, ref = part.damage[:, ggml], full.damage[:, ggml]
    assert np.isnan(est).sum() == np.isnan(ref).sum() and not np.allclose(est, ref, equal_nan=True)
    ok = np.isfinite(ref)
    assert np.median(np.abs(est[ok] / ref[ok] - 1)) < 0.1 and np.abs(est[ok] / ref[ok] - 1).max() < 0.5
    # the types keep their order on almost every layer: the sample ranks them as every row does
    agree = np.mean([np.argsort(a[np.isfinite(a)]).tolist() == np.argsort(b[np.isfinite(b)]).tolist()
                     for a, b in zip(est, ref)])
    assert agree >= 0.7


def test_the_shared_fisher_gradient_pass_samples_both_alike():
    model = tiny_llama()
    both, _ = tables(model, 16, ("fisher", "gradient"))
    alone, _ = tables(model, 16, ("fisher",))
    np.testing.assert_allclose(both["fisher"].damage, alone["fisher"].damage, rtol=1e-5, equal_nan=True)
    assert both["gradient"].meta["options"] == {"damage_rows": 16}


def test_options_and_cache_key_name_the_rows_only_when_a_ggml_type_is_sampled():
    ggml = (QuantSpec(4, 32), GGML_TYPES["Q4_0"], KEEP)
    affine = (QuantSpec(4, 32), KEEP)
    assert damage_row_options(["fisher", "gradient", "output_error"], ggml, 64) == {
        "fisher": {"damage_rows": 64}, "gradient": {"damage_rows": 64}}
    assert damage_row_options(["fisher"], ggml, 0) == damage_row_options(["fisher"], ggml, None) == {}
    assert damage_row_options(["fisher"], affine, 64) == {}  # affine tables keep their keys
    model = tiny_llama()
    linears = find_linears(model)

    def key(rows):
        return cache_key_parts(model_name="tiny", model=model, linears=linears, calibration_sha256="0" * 64,
                               configs=ggml, method="fisher", granularity="layer",
                               options=damage_row_options(["fisher"], ggml, rows).get("fisher", {}))

    assert key(None) == key(0) and key(64) != key(None) and key(64) != key(128)


@pytest.mark.parametrize("bad", [-1, 2.5, "64", True])
def test_bad_damage_rows_is_refused_naming_the_field(bad):
    with pytest.raises(UserError, match="`damage_rows`"):
        RunConfig(damage_rows=bad)
    with pytest.raises(UserError, match="`damage_rows`"):
        AnalyzeConfig(damage_rows=bad)
    assert RunConfig(damage_rows=0).damage_rows == 0 and AnalyzeConfig(damage_rows=None).damage_rows is None


@pytest.mark.parametrize("command", ["run", "analyze"])
def test_the_flag_sets_the_field_and_a_bad_value_names_the_flag(tmp_path, command):
    from typer.testing import CliRunner

    from mixbits.cli import app

    r = CliRunner().invoke(app, [command, "--no-verbose", "--damage-rows", "-1", "--output-dir", str(tmp_path / "o")])
    assert r.exit_code != 0 and "--damage-rows -1" in r.output and "0: every row" in r.output
    assert not (tmp_path / "o").exists()  # refused before any work
