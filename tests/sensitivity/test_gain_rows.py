"""The quantizer's gain measured on a sample of output rows (`gain_rows`) and with one factor of H per layer."""

import numpy as np
import pytest
import torch

from mixbits.config import RunConfig
from mixbits.errors import UserError
from mixbits.model.arch import find_linears
from mixbits.model.quantize import quantize_weight
from mixbits.quant.affine import fake_quantize
from mixbits.quant.gptq import GPTQConfig, gptq_quantize
from mixbits.quant.gram import output_error
from mixbits.quant.spec import KEEP, QuantSpec
from mixbits.sensitivity.cache import cache_key_parts
from mixbits.sensitivity.follow import gain_cache_options, gain_table
from mixbits.sensitivity.quantizer_damage import quantizer_errors, sample_rows
from tests.conftest import tiny_llama

CPU = torch.device("cpu")
CONFIGS = (QuantSpec(2, 32), QuantSpec(3, 32), QuantSpec(4, 64), QuantSpec(3, None), KEEP)
SETTINGS = [("rtn", GPTQConfig()), ("clip", GPTQConfig()), ("gptq", GPTQConfig()), ("gptq", GPTQConfig(clip=True)),
            ("gptq", GPTQConfig(act_order=True, clip=True)),
            ("gptq", GPTQConfig(act_order=True, static_groups=True, clip=True))]


def layer(out=96, inp=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(512, inp, generator=g) * torch.rand(inp, generator=g) * 3
    x[:, 5] = 0.0  # a dead input
    return torch.randn(out, inp, generator=g) * 0.05, x.T @ x


def test_sample_rows_are_evenly_strided_and_every_row_when_not_fewer():
    assert sample_rows(10, 4).tolist() == [0, 2, 5, 7]
    assert sample_rows(1536, 128).unique().numel() == 128
    assert sample_rows(10, None) is None and sample_rows(10, 0) is None and sample_rows(10, 10) is None
    assert sample_rows(10, 11) is None
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="non-negative integer"):
            sample_rows(10, bad)


@pytest.mark.parametrize("quantizer,cfg", SETTINGS)
def test_sampled_rows_are_the_full_quantization_restricted_to_them(quantizer, cfg):
    w, H = layer()
    idx = sample_rows(w.shape[0], 20)
    err, rtn = quantizer_errors(w, H, CONFIGS, quantizer=quantizer, gptq=cfg, rows=20)
    for j, spec in enumerate(CONFIGS[:-1]):
        full = quantize_weight(w, spec, quantizer, H=H, gptq=cfg)
        part = quantize_weight(w[idx], spec, quantizer, H=H, gptq=cfg)
        assert torch.equal(part.weight, full.weight[idx])  # the same codes and scales, row by row
        assert err[j] == pytest.approx(output_error(w[idx], full.weight[idx], H), rel=1e-6)
        assert rtn[j] == pytest.approx(output_error(w[idx], fake_quantize(w, spec)[idx], H), rel=1e-6)
    assert err[-1] == rtn[-1] == 0.0


@pytest.mark.parametrize("cfg", [c for q, c in SETTINGS if q == "gptq"])
def test_every_row_reproduces_one_gptq_run_per_config(cfg):
    """rows=None (and 0) gives what quantizing each config on its own gave before the factor was shared."""
    w, H = layer(seed=1)
    for rows in (None, 0, 96):
        err, rtn = quantizer_errors(w, H, CONFIGS, quantizer="gptq", gptq=cfg, rows=rows)
        for j, spec in enumerate(CONFIGS[:-1]):
            alone = gptq_quantize(w, H, spec, cfg)
            assert (err[j], rtn[j]) == (alone.error, alone.rtn_error)


def test_sampled_gain_table_on_a_model_records_its_rows():
    model = tiny_llama()
    wins = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(3))
    linears = find_linears(model)
    configs = CONFIGS[:3] + (KEEP,)
    full = gain_table(model, wins, linears, configs, quantizer="gptq", device=CPU, progress=False)
    part = gain_table(model, wins, linears, configs, quantizer="gptq", device=CPU, progress=False, rows=16)
    assert part.meta["gain_rows"] == 16 and "gain_rows" not in full.meta
    outs = np.array([i.out_features for i in linears.values()])
    assert np.any(outs > 16)
    small = outs <= 16
    np.testing.assert_array_equal(part.damage[small], full.damage[small])  # every row of a small layer
    big = ~small
    assert not np.array_equal(part.damage[big], full.damage[big])  # an estimate elsewhere, close to it
    np.testing.assert_allclose(part.damage[big], full.damage[big], rtol=0.25)
    est, ref = np.array(part.meta["output_error_per_token"]), np.array(full.meta["output_error_per_token"])
    np.testing.assert_allclose(est[:, :-1], ref[:, :-1], rtol=0.5)  # scaled by out / rows: the whole layer's


def test_cache_key_differs_by_gain_rows_and_keeps_the_old_key_for_every_row():
    model = tiny_llama()
    linears = find_linears(model)

    def key(rows, quantizer="gptq"):
        return cache_key_parts(model_name="tiny", model=model, linears=linears, calibration_sha256="0" * 64,
                               configs=CONFIGS, method=f"gain_{quantizer}", granularity="layer",
                               options=gain_cache_options(quantizer, GPTQConfig(clip=True), rows))

    old = cache_key_parts(model_name="tiny", model=model, linears=linears, calibration_sha256="0" * 64,
                          configs=CONFIGS, method="gain_gptq", granularity="layer",
                          options={"gptq": {"damp": 0.01, "block_size": 128, "act_order": False, "clip": True,
                                            "static_groups": False}})
    assert key(None) == key(0) == old
    assert key(128) != key(None) and key(128) != key(64)
    assert key(128, "clip") != key(None, "clip")


@pytest.mark.parametrize("bad", [-1, 2.5, "128", True])
def test_bad_gain_rows_is_refused_naming_the_field(bad):
    with pytest.raises(UserError, match="`gain_rows`"):
        RunConfig(gain_rows=bad)
    assert RunConfig(gain_rows=0).gain_rows == 0 and RunConfig(gain_rows=None).gain_rows is None


def test_the_flag_sets_the_field_and_a_bad_value_names_the_flag(tmp_path):
    from typer.testing import CliRunner

    from mixbits.cli import app

    r = CliRunner().invoke(app, ["run", "--no-verbose", "--gain-rows", "-1", "--output-dir", str(tmp_path / "o")])
    assert r.exit_code != 0 and "--gain-rows -1" in r.output and "0: every row" in r.output
    assert not (tmp_path / "o").exists()  # refused before any work


@pytest.mark.parametrize("rows", [None, 20])
@pytest.mark.parametrize("quantizer,cfg", [("gptq", GPTQConfig(clip=True)), ("gptq", GPTQConfig(act_order=True)),
                                           ("clip", GPTQConfig())])
def test_layers_sharing_an_input_give_each_its_own_errors(rows, quantizer, cfg):
    """q/k/v (one H) swept together: each layer's errors are exactly what it gets alone."""
    from mixbits.sensitivity.quantizer_damage import shared_input_errors

    w, H = layer(out=96)
    others = [w, layer(out=32, seed=2)[0], layer(out=64, seed=3)[0]]
    together = shared_input_errors(others, H, CONFIGS, quantizer=quantizer, gptq=cfg, rows=rows)
    for weight, (err, rtn) in zip(others, together):
        alone = quantizer_errors(weight, H, CONFIGS, quantizer=quantizer, gptq=cfg, rows=rows)
        np.testing.assert_array_equal(err, alone[0])
        np.testing.assert_array_equal(rtn, alone[1])
