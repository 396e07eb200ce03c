"""The iterative walk: rollback, stop reasons and the kept model, on a tiny Llama with a scripted evaluator."""

import pytest
import torch

from mixbits.config import IterativeConfig
from mixbits.jobs.iterative import iterative_quantize
from mixbits.model.apply import fake_quantize_model, layer_shapes
from mixbits.model.arch import get_weight
from mixbits.plan import Plan
from mixbits.quant.spec import QuantSpec
from tests.conftest import tiny_llama

W4 = QuantSpec(4, 32)


@pytest.fixture(scope="module")
def pair():
    model = tiny_llama()
    shapes = layer_shapes(model)
    quantized = fake_quantize_model(model, Plan.uniform(shapes, W4), storage_dtype=None)
    return model, quantized, shapes


def _changed(model, original) -> int:
    """Linears whose weight differs from the original's: what the scripted evaluator counts."""
    return sum(not torch.equal(get_weight(model.get_submodule(n)), get_weight(original.get_submodule(n)))
               for n in layer_shapes(original))


def _scripted(original, per_layer: float):
    calls = []

    def evaluate(model) -> float:
        calls.append(1)
        return 10.0 * (1 + per_layer * _changed(model, original))

    return evaluate, calls


def test_rolls_back_the_step_that_crosses_the_limit(pair):
    model, quantized, shapes = pair
    order = [(n,) for n in shapes]  # 14 linears
    evaluate, calls = _scripted(model, per_layer=0.01)  # each quantized linear costs 1 %
    cfg = IterativeConfig(spec=W4, layers_per_iteration=3, max_ppl_increase=0.075)
    out, result = iterative_quantize(model, quantized, order, cfg, shapes, evaluate)
    assert result.stopped == "threshold"
    assert [s.accepted for s in result.steps] == [True, True, False]  # 3 and 6 linears ok, 9 over 7.5 %
    assert len(calls) == 1 + len(result.steps)
    assert set(result.plan.quantized()) == {n for (n,) in order[:6]}
    assert _changed(out, model) == 6  # the rolled-back linears hold their original weights again
    for (n,) in order[:6]:
        assert torch.equal(get_weight(out.get_submodule(n)), get_weight(quantized.get_submodule(n)))
    assert result.steps[1].increase == pytest.approx(0.06) and result.steps[2].increase == pytest.approx(0.09)
    assert result.final.quantized_units == 6 and result.final.bpw == pytest.approx(result.plan.bits_per_weight(shapes))
    assert _changed(model, quantized) == 14  # the inputs are untouched


def test_max_iterations_and_all_quantized(pair):
    model, quantized, shapes = pair
    order = [(n,) for n in shapes]
    evaluate, _ = _scripted(model, per_layer=0.0)
    _, capped = iterative_quantize(model, quantized, order, IterativeConfig(spec=W4, layers_per_iteration=2,
                                                                           max_iterations=3), shapes, evaluate)
    assert capped.stopped == "max_iterations" and len(capped.plan.quantized()) == 6
    _, whole = iterative_quantize(model, quantized, order, IterativeConfig(spec=W4, layers_per_iteration=4),
                                  shapes, evaluate)
    assert whole.stopped == "all_quantized" and len(whole.steps) == 4 and len(whole.plan.quantized()) == 14
    assert whole.plan.bits_per_weight(shapes) == pytest.approx(Plan.uniform(shapes, W4).bits_per_weight(shapes))
