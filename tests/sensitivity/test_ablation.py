import copy

import numpy as np
import pytest
import torch

from mixbits.eval.perplexity import evaluate_models
from mixbits.model.arch import find_linears, get_weight, set_weight
from mixbits.quant.affine import fake_quantize
from mixbits.quant.spec import KEEP, QuantSpec
from mixbits.sensitivity.ablation import ablation_table, classifier_ablation
from mixbits.sensitivity.units import block_units
from tests.conftest import tiny_bert, tiny_distilbert, tiny_llama

CPU = torch.device("cpu")
W2 = QuantSpec(2, 64)


def test_delta_ppl_matches_evaluating_a_hand_quantized_model():
    model = tiny_llama()
    wins = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    blocks = block_units(find_linears(model))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    damage, scores = ablation_table(model, wins, blocks, (W2, KEEP), device=CPU, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert (damage[:, 1] == 0).all()
    hand = copy.deepcopy(model)
    for name in blocks["model.layers.1"]:
        module = hand.get_submodule(name)
        set_weight(module, fake_quantize(get_weight(module).detach(), W2))
    res = evaluate_models({"orig": model, "q": hand}, wins, device=CPU, progress=False)
    assert damage[1, 0] == pytest.approx(res["q"].ppl - res["orig"].ppl, rel=1e-3)
    assert scores["delta_nll"][1] == pytest.approx(res["q"].nll - res["orig"].nll, rel=1e-3)


@pytest.mark.parametrize("build", [tiny_bert, tiny_distilbert])
def test_classifier_ablation_returns_accuracy_drops_and_restores(build):
    model = build()
    gen = torch.Generator().manual_seed(0)
    inputs = {"input_ids": torch.randint(0, 256, (16, 10), generator=gen), "attention_mask": torch.ones(16, 10, dtype=torch.long)}
    labels = torch.randint(0, 2, (16,), generator=gen)
    units = dict(list(block_units(find_linears(model)).items()))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    damage, scores = classifier_ablation(model, inputs, labels, units, (W2, KEEP), device=CPU, progress=False, batch_size=8)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert damage.shape == (2, 2) and np.isfinite(damage).all() and (damage[:, 1] == 0).all()
    assert ((damage >= -1) & (damage <= 1)).all()
    with torch.no_grad():
        base = (model(**inputs).logits.argmax(-1) == labels).float().mean().item()
    np.testing.assert_allclose(scores["accuracy"] + scores["accuracy_drop"], base)
    with pytest.raises(ValueError, match="same number"):
        classifier_ablation(model, inputs, labels[:3], units, (W2,), device=CPU, progress=False)
