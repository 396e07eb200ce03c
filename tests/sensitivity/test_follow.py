"""Damage that follows the quantizer: Fisher x (the quantizer's output error / RTN's)."""

import numpy as np
import pytest
import torch

from mixbits.model.arch import find_linears, get_weight
from mixbits.quant.gram import output_error
from mixbits.quant.affine import fake_quantize
from mixbits.quant.spec import KEEP, QuantSpec
from mixbits.sensitivity.capture import collect_gram
from mixbits.sensitivity.follow import follow_quantizer, gain_table
from mixbits.sensitivity.quantizer_damage import quantizer_gain
from mixbits.sensitivity.table import DamageTable
from tests.conftest import tiny_llama

CPU = torch.device("cpu")
CONFIGS = (QuantSpec(2, 32), QuantSpec(3, 32), QuantSpec(4, 64), KEEP)


def windows(n=6, seqlen=32):
    return torch.randint(0, 256, (n, seqlen), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def gains():
    model, wins = tiny_llama(), windows()
    linears = find_linears(model)
    return model, wins, linears, {q: gain_table(model, wins, linears, CONFIGS, quantizer=q, device=CPU,
                                                progress=False) for q in ("rtn", "gptq")}


def test_rtn_gain_is_one_and_keep_is_one(gains):
    *_, tables = gains
    assert np.array_equal(tables["rtn"].damage, np.ones_like(tables["rtn"].damage))
    assert np.all(tables["gptq"].damage[:, -1] == 1.0)


def test_gptq_gain_is_its_output_error_over_rtns_computed_plainly(gains):
    model, wins, linears, tables = gains
    name = next(iter(linears))
    grams, _ = collect_gram(model, wins, {name: linears[name]}, device=CPU, progress=False)
    w, H = get_weight(model.get_submodule(name)).float(), grams[name]
    from mixbits.quant.gptq import gptq_quantize

    for j, spec in enumerate(CONFIGS[:-1]):
        expected = gptq_quantize(w, H, spec).error / output_error(w, fake_quantize(w, spec), H)
        assert tables["gptq"].damage[0, j] == pytest.approx(expected, rel=1e-5)
    assert np.all(tables["gptq"].damage[:, :-1] < 1.0)  # GPTQ leaves less output error than RTN on every layer
    assert tables["gptq"].meta["quantizer"] == "gptq"


def test_follow_multiplies_and_records_the_quantizer(gains):
    *_, tables = gains
    gain = tables["gptq"]
    rng = np.random.default_rng(0)
    fisher = DamageTable(units=gain.units, shapes=gain.shapes, configs=gain.configs,
                         damage=np.c_[rng.random((len(gain.units), 3)), np.zeros(len(gain.units))], method="fisher",
                         scores={"fisher_trace": rng.random(len(gain.units))}, meta={"quantizer": "rtn"})
    followed = follow_quantizer(fisher, gain)
    assert np.allclose(followed.damage, fisher.damage * gain.damage)
    assert followed.meta["quantizer"] == "gptq" and "gain_gptq" in followed.meta["damage_rule"]
    assert set(followed.scores) == {"fisher_trace", "gain_gptq"}
    other = DamageTable(units=gain.units[::-1], shapes=gain.shapes[::-1], configs=gain.configs,
                        damage=fisher.damage, method="fisher")
    with pytest.raises(ValueError, match="units or configs differ"):
        follow_quantizer(other, gain)


def test_gain_guards_zero_rtn_error():
    assert np.array_equal(quantizer_gain(np.array([0.5, 0.0, 2.0]), np.array([1.0, 0.0, 4.0])), [0.5, 1.0, 0.5])
    with pytest.raises(ValueError, match="one shape"):
        quantizer_gain(np.ones(2), np.ones(3))


@pytest.mark.parametrize("quantizer", ["clip", "gptq"])
def test_block_by_block_errors_equal_the_whole_model_table(quantizer, tmp_path):
    """The streamed gain (one block materialized, from a lazy checkpoint) equals the whole-model one."""
    from mixbits.model.lazy import open_checkpoint
    from mixbits.sensitivity.follow import streamed_quantizer_errors
    from mixbits.sensitivity.quantizer_damage import quantizer_errors_table

    model, wins = tiny_llama(), windows()
    linears = find_linears(model)
    model.save_pretrained(tmp_path)
    whole = quantizer_errors_table(model, wins, linears, CONFIGS, quantizer=quantizer, device=CPU, progress=False)
    streamed = streamed_quantizer_errors(open_checkpoint(tmp_path), wins, linears, CONFIGS, quantizer=quantizer,
                                         progress=False)
    assert streamed[2] == whole[2] == wins.numel()
    np.testing.assert_allclose(streamed[0], whole[0], rtol=1e-5)
    np.testing.assert_allclose(streamed[1], whole[1], rtol=1e-5)
    assert np.all(streamed[1][:, :-1] > 0)
