import logging

import pytest
import torch

from mixbits.eval.perplexity import evaluate_models
from mixbits.model.apply import fake_quantize_model
from mixbits.model.arch import find_linears, get_bias, get_weight
from mixbits.model.quantize import quantize_model
from mixbits.plan import Plan
from mixbits.quant.affine import dequantize, minmax_qparams, quantize
from mixbits.quant.clip import search_qparams
from mixbits.quant.gptq import GPTQConfig
from mixbits.quant.qlinear import QuantLinear
from mixbits.quant.spec import KEEP, QuantSpec
from mixbits.sensitivity.capture import collect_gram
from tests.conftest import tiny_gpt2, tiny_llama

CPU = torch.device("cpu")
W3 = QuantSpec(3, 64)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def windows(n=8, seqlen=32):
    # 256 tokens: more than the widest input (128), so every H has full rank
    return torch.randint(0, 256, (n, seqlen), generator=torch.Generator().manual_seed(1))


def uniform(model, spec=W3):
    return Plan.uniform(find_linears(model), spec)


@pytest.fixture(scope="module")
def llama_runs():
    model, wins = tiny_llama(), windows()
    plan = uniform(model)
    runs = {q: quantize_model(model, plan, quantizer=q, windows=wins, device=CPU, progress=False)
            for q in ("rtn", "clip", "gptq")}
    return model, wins, plan, runs


def test_gptq_beats_rtn_on_every_layer(llama_runs):
    _, _, plan, runs = llama_runs
    report = runs["gptq"][1]
    assert report.quantizer == "gptq" and report.tokens == 256 and set(report.layers) == set(plan.quantized())
    for name, layer in report.layers.items():
        assert layer.spec == "w3g64" and layer.seconds >= 0
        assert layer.error <= layer.rtn_error, name
    total = sum(r.error for r in report.layers.values()) / sum(r.rtn_error for r in report.layers.values())
    assert total < 0.9


def test_rtn_report_is_the_rtn_error(llama_runs):
    for layer in llama_runs[3]["rtn"][1].layers.values():
        assert layer.error == layer.rtn_error > 0


def test_gptq_diverges_less_than_rtn_on_calibration_windows(llama_runs):
    # KL to the original, not perplexity: a random model predicts near-uniformly (ppl ~ vocab),
    # so its perplexity moves by noise under quantization; KL measures the damage itself.
    model, wins, _, runs = llama_runs
    evals = evaluate_models({"original": model, **{q: m for q, (m, _) in runs.items()}}, wins,
                            device=CPU, reference="original", progress=False)
    assert evals["gptq"].kl < 0.8 * evals["rtn"].kl
    assert evals["clip"].kl < evals["rtn"].kl


def assert_reproduced(model, report, plan):
    """The written weights are exactly (codes - z) * s for the returned qparams."""
    for name, spec in plan.quantized().items():
        module = model.get_submodule(name)
        w, qp = get_weight(module).detach().float(), report.qparams[name]
        assert torch.equal(dequantize(quantize(w, qp, spec), qp, spec), w), name
        packed = QuantLinear.from_weight(w, get_bias(module), spec, qparams=qp)
        assert torch.equal(packed.dequantized_weight(), w), name


def test_returned_qparams_reproduce_written_weights_llama(llama_runs):
    _, _, plan, runs = llama_runs
    for quantized, report in runs.values():
        assert not report.g_idx
        assert_reproduced(quantized, report, plan)


@pytest.mark.parametrize("quantizer", ["clip", "gptq"])
def test_returned_qparams_reproduce_written_weights_gpt2(quantizer):
    model = tiny_gpt2()
    plan = uniform(model, QuantSpec(4, 32))
    quantized, report = quantize_model(model, plan, quantizer=quantizer, windows=windows(4), device=CPU, progress=False)
    assert_reproduced(quantized, report, plan)
    assert all(r.error <= r.rtn_error for r in report.layers.values())


def test_rtn_without_windows_is_fake_quantize_model_and_original_is_untouched():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = uniform(model)
    quantized, report = quantize_model(model, plan, device=CPU, progress=False)
    expected = fake_quantize_model(model, plan).state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in quantized.state_dict().items())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert report.tokens == 0 and all(r.error is None for r in report.layers.values())
    assert_reproduced(quantized, report, plan)


def test_clip_beats_rtn_on_its_objective():
    model, wins = tiny_llama(), windows()
    plan = uniform(model)
    # no windows: plain weight MSE; never worse than min-max per layer
    plain, report = quantize_model(model, plan, quantizer="clip", device=CPU, progress=False)
    for name, spec in plan.quantized().items():
        w = get_weight(model.get_submodule(name)).detach()
        rtn = dequantize(quantize(w, minmax_qparams(w, spec), spec), minmax_qparams(w, spec), spec)
        clipped = get_weight(plain.get_submodule(name)).detach()
        assert float((clipped - w).square().sum()) <= float((rtn - w).square().sum()), name
    # with windows: weighted by diag H; block 0 sees the original model's inputs (no storage rounding)
    weighted, _ = quantize_model(model, plan, quantizer="clip", windows=wins, device=CPU, progress=False,
                                 storage_dtype=None)
    block0 = {n: i for n, i in find_linears(model).items() if i.block == 0}
    grams, _ = collect_gram(model, wins, block0, device=CPU, progress=False)
    for name in block0:
        w, a = get_weight(model.get_submodule(name)).detach(), torch.diagonal(grams[name])
        qp = search_qparams(w, W3, importance=a)
        assert torch.equal(get_weight(weighted.get_submodule(name)).detach(), dequantize(quantize(w, qp, W3), qp, W3))
        rtn_qp = minmax_qparams(w, W3)
        rtn = dequantize(quantize(w, rtn_qp, W3), rtn_qp, W3)
        clipped = get_weight(weighted.get_submodule(name)).detach()
        assert float(((clipped - w).square() * a).sum()) <= float(((rtn - w).square() * a).sum()), name


def test_true_sequential_matches_on_the_first_stage_and_still_beats_rtn(llama_runs):
    model, wins, plan, runs = llama_runs
    _, seq = quantize_model(model, plan, quantizer="gptq", windows=wins, device=CPU, progress=False,
                            true_sequential=True)
    plain = runs["gptq"][1].layers
    for proj in ("q_proj", "k_proj", "v_proj"):
        name = f"model.layers.0.self_attn.{proj}"
        assert seq.layers[name].error == pytest.approx(plain[name].error, rel=1e-6)  # same H: nothing quantized yet
    assert seq.layers["model.layers.0.mlp.down_proj"].rtn_error != plain["model.layers.0.mlp.down_proj"].rtn_error
    assert all(r.error <= r.rtn_error for r in seq.layers.values())


def test_kept_layers_stay_and_are_not_reported():
    model, wins = tiny_llama(), windows(4)
    linears = list(find_linears(model))
    kept = [n for n in linears if n.endswith("down_proj")]
    plan = Plan({n: KEEP if n in kept else W3 for n in linears})
    quantized, report = quantize_model(model, plan, quantizer="gptq", windows=wins, device=CPU, progress=False)
    assert set(report.layers) == set(report.qparams) == set(linears) - set(kept)
    for name in kept:
        original = get_weight(model.get_submodule(name)).detach()
        assert torch.equal(get_weight(quantized.get_submodule(name)), original.half().float())


def test_act_order_returns_g_idx_unless_static_groups(caplog):
    model, wins = tiny_llama(), windows(4)
    plan = uniform(model, QuantSpec(4, 32))
    with caplog.at_level(logging.WARNING):
        _, report = quantize_model(model, plan, quantizer="gptq", windows=wins, device=CPU, progress=False,
                                   gptq=GPTQConfig(act_order=True))
    assert set(report.g_idx) == set(plan.quantized()) and "g_idx" in caplog.text
    static, report = quantize_model(model, plan, quantizer="gptq", windows=wins, device=CPU, progress=False,
                                    gptq=GPTQConfig(act_order=True, static_groups=True))
    assert not report.g_idx
    assert_reproduced(static, report, plan)


def test_bad_arguments_are_named():
    model = tiny_llama()
    with pytest.raises(ValueError, match="windows"):
        quantize_model(model, uniform(model), quantizer="gptq", device=CPU)
    with pytest.raises(ValueError, match="rtn, clip, gptq"):
        quantize_model(model, uniform(model), quantizer="awq", device=CPU)
