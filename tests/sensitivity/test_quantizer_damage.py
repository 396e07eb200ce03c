import numpy as np
import pytest
import torch

from mixbits.model.arch import find_linears, get_weight
from mixbits.model.quantize import quantize_model
from mixbits.plan import Plan
from mixbits.quant.spec import KEEP, QuantSpec
from mixbits.sensitivity.capture import collect_gram
from mixbits.sensitivity.output_error import output_error_table
from mixbits.sensitivity.quantizer_damage import quantizer_damage, quantizer_damage_table
from tests.conftest import tiny_llama

CPU = torch.device("cpu")
CONFIGS = (QuantSpec(2, 64), QuantSpec(3, 64), QuantSpec(4, 64), QuantSpec(8, 64), KEEP)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def windows(n=8, seqlen=32):
    return torch.randint(0, 256, (n, seqlen), generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def tables():
    model, wins = tiny_llama(), windows()
    linears = find_linears(model)
    out = {q: quantizer_damage_table(model, wins, linears, CONFIGS, quantizer=q, device=CPU, progress=False)
           for q in ("rtn", "clip", "gptq")}
    return model, wins, linears, out


def test_keep_is_zero_and_damage_falls_with_bits(tables):
    for quantizer, (damage, scores) in tables[3].items():
        assert damage.shape == (14, len(CONFIGS))
        assert np.all(damage[:, -1] == 0), quantizer
        assert np.all(np.diff(damage[:, :-1], axis=1) < 0), quantizer
        assert np.array_equal(scores[f"output_error_{quantizer}"], damage[:, 0])


def test_gptq_damage_is_at_most_rtn_damage(tables):
    rtn, gptq = tables[3]["rtn"][0], tables[3]["gptq"][0]
    assert np.all(gptq <= rtn * (1 + 1e-6))
    assert gptq[:, 1].sum() < 0.9 * rtn[:, 1].sum()


def test_rtn_damage_is_the_output_error_table(tables):
    model, wins, linears, out = tables
    expected, _ = output_error_table(model, wins, linears, CONFIGS, device=CPU, progress=False)
    assert np.allclose(out["rtn"][0], expected, rtol=1e-5, atol=0)


def test_gptq_damage_is_what_quantize_model_reports(tables):
    # block 0 sees the original model's inputs in both (no storage rounding), so the errors agree
    model, wins, linears, out = tables
    quantized, report = quantize_model(model, Plan.uniform(linears, CONFIGS[1]), quantizer="gptq", windows=wins,
                                       device=CPU, progress=False, storage_dtype=None)
    for u, (name, info) in enumerate(linears.items()):
        if info.block == 0:
            assert out["gptq"][0][u, 1] == pytest.approx(report.layers[name].error, rel=1e-5), name


def test_quantizer_damage_of_one_layer_and_reference_outside_configs():
    model, wins = tiny_llama(), windows(4)
    linears = {n: i for n, i in find_linears(model).items() if n.endswith("o_proj")}
    grams, tokens = collect_gram(model, wins, linears, device=CPU, progress=False)
    name = next(iter(linears))
    row = quantizer_damage(get_weight(model.get_submodule(name)), grams[name], tokens, CONFIGS, quantizer="clip")
    assert row[-1] == 0 and np.all(row[:-1] > 0)
    damage, scores = quantizer_damage_table(model, wins, linears, CONFIGS[2:], quantizer="clip", device=CPU,
                                            progress=False, reference=CONFIGS[0])
    assert scores["output_error_clip"][0] == pytest.approx(row[0], rel=1e-6)
    assert damage[0] == pytest.approx(row[2:], rel=1e-6)
    with pytest.raises(ValueError, match="rtn, clip, gptq"):
        quantizer_damage(get_weight(model.get_submodule(name)), grams[name], tokens, CONFIGS, quantizer="hqq")
