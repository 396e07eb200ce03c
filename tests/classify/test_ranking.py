"""One layer at a time on training sentences: KL and loss change against a hand-quantized model."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mixbits.classify.ranking import kl_and_ce, one_at_a_time
from mixbits.model.arch import find_linears, get_weight, set_weight
from mixbits.quant.affine import fake_quantize
from mixbits.quant.spec import KEEP, QuantSpec
from mixbits.sensitivity.units import units_of
from tests.classify.conftest import sentiment_lines, sentiment_tokenizer
from tests.conftest import tiny_bert

CPU = torch.device("cpu")
W2 = QuantSpec(2, 64)


def test_kl_and_ce_match_their_formulas():
    gen = torch.Generator().manual_seed(0)
    a, b, y = torch.randn(5, 3, generator=gen), torch.randn(5, 3, generator=gen), torch.tensor([0, 1, 2, 0, 1])
    p, q = a.softmax(-1).double(), b.softmax(-1).double()
    kl, ce = kl_and_ce(a, b, y)
    assert kl == pytest.approx(float((p * (p / q).log()).sum(-1).mean()))
    assert ce == pytest.approx(float(F.cross_entropy(b.double(), y)))
    assert kl_and_ce(a, a, y)[0] == pytest.approx(0.0, abs=1e-12)


def test_one_at_a_time_matches_a_hand_quantized_model_and_restores():
    model, tokenizer = tiny_bert(), sentiment_tokenizer()
    inputs = dict(tokenizer([line.split(" ", 1)[1] for line in sentiment_lines(12)], padding=True, return_tensors="pt"))
    labels = torch.arange(12) % 2
    units = units_of(find_linears(model), "layer")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    got = one_at_a_time(model, inputs, labels, units, W2, device=CPU, batch_size=5)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert (got["kl"] >= 0).all() and got["kl"].max() > 0 and np.isfinite(got["loss_increase"]).all()
    name = list(units)[4]
    hand = copy.deepcopy(model)
    module = hand.get_submodule(name)
    set_weight(module, fake_quantize(get_weight(module).detach(), W2))
    with torch.no_grad():
        kl, ce = kl_and_ce(model(**inputs).logits, hand(**inputs).logits, labels)
        base = float(F.cross_entropy(model(**inputs).logits.double(), labels))
    assert got["kl"][4] == pytest.approx(kl, rel=1e-4, abs=1e-9)
    assert got["loss_increase"][4] == pytest.approx(ce - base, rel=1e-4, abs=1e-9)
    kept = one_at_a_time(model, inputs, labels, units, KEEP, device=CPU)
    assert np.allclose(kept["kl"], 0.0, atol=1e-12)
