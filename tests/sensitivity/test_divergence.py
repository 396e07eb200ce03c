import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mixbits.model.arch import find_linears, get_weight, set_weight
from mixbits.quant.affine import fake_quantize
from mixbits.quant.spec import KEEP, QuantSpec
from mixbits.sensitivity.divergence import divergence_table
from mixbits.sensitivity.units import block_units, measured_labels
from tests.conftest import tiny_gpt2, tiny_llama

CPU = torch.device("cpu")
W2, W4 = QuantSpec(2, 64), QuantSpec(4, 64)
CONFIGS = (W2, W4, KEEP)


def windows(n=3, seqlen=12):
    return torch.randint(0, 256, (n, seqlen), generator=torch.Generator().manual_seed(0))


def hand_quantized(model, names, spec):
    q = copy.deepcopy(model)
    for name in names:
        module = q.get_submodule(name)
        set_weight(module, fake_quantize(get_weight(module).detach(), spec))
    return q


def plain_kl_js(a, b, wins):
    """Mean per-position KL(p_a || p_b) and JS, by the textbook formulas, in float64."""
    with torch.no_grad():
        p = torch.cat([F.softmax(a(input_ids=w[None]).logits[0, :-1].double(), -1) for w in wins])
        q = torch.cat([F.softmax(b(input_ids=w[None]).logits[0, :-1].double(), -1) for w in wins])
    m = (p + q) / 2
    kl = (p * (p / q).log()).sum(-1).mean()
    js = 0.5 * (p * (p / m).log()).sum(-1).mean() + 0.5 * (q * (q / m).log()).sum(-1).mean()
    return kl.item(), js.item()


def test_kl_and_js_match_a_plain_reference_and_weights_are_restored():
    model, wins = tiny_llama(), windows()
    names = list(find_linears(model))[:2]
    units = {n: (n,) for n in names}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    damage, scores = divergence_table(model, wins, units, CONFIGS, device=CPU, progress=False, batch_size=2)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert damage.shape == (2, 3) and (damage[:, -1] == 0).all()
    kl, js = plain_kl_js(model, hand_quantized(model, [names[1]], W2), wins)
    assert damage[1, 0] == pytest.approx(kl, rel=1e-3)
    assert scores["kl"][1] == damage[1, 0] and scores["js"][1] == pytest.approx(js, rel=1e-3)
    assert (damage[:, 0] > damage[:, 1]).all() and (damage[:, 1] > 0).all()  # 2 bits hurt more than 4


def test_block_unit_equals_quantizing_all_its_linears_by_hand():
    model, wins = tiny_gpt2(), windows(2)
    blocks = block_units(find_linears(model))
    first = dict(list(blocks.items())[:1])
    damage, _ = divergence_table(model, wins, first, (W2,), device=CPU, progress=False, max_cache_bytes=1)
    kl, _ = plain_kl_js(model, hand_quantized(model, next(iter(first.values())), W2), wins)
    assert damage[0, 0] == pytest.approx(kl, rel=1e-3)


def test_a_config_subset_leaves_nan_and_says_which():
    model, wins = tiny_llama(), windows(1)
    units = {n: (n,) for n in list(find_linears(model))[:2]}
    damage, scores = divergence_table(model, wins, units, CONFIGS, device=CPU, progress=False, measure_configs=[W4])
    assert np.isnan(damage[:, [0, 2]]).all() and np.isfinite(damage[:, 1]).all()
    assert measured_labels(damage, CONFIGS) == ["w4g64"]
    assert (scores["kl"] == damage[:, 1]).all()
    with pytest.raises(ValueError, match="at least one quantizing"):
        divergence_table(model, wins, units, CONFIGS, device=CPU, progress=False, measure_configs=[KEEP])
    with pytest.raises(ValueError, match="w3g64"):
        divergence_table(model, wins, units, CONFIGS, device=CPU, progress=False, measure_configs=[QuantSpec(3, 64)])
