import numpy as np
import pytest
import torch

from mixbits.model.arch import find_linears, get_weight
from mixbits.quant.affine import fake_quantize
from mixbits.quant.spec import KEEP, QuantSpec
from mixbits.sensitivity.fisher import empirical_fisher, fisher_table
from mixbits.sensitivity.gradient import gradient_damage, gradient_fisher_tables, gradient_statistics, gradient_table
from tests.conftest import tiny_gpt2, tiny_llama

CPU = torch.device("cpu")
CONFIGS = (QuantSpec(2, 64), QuantSpec(3, 64), QuantSpec(4, 64), QuantSpec(8, 64), KEEP)


def windows(n=3):
    return torch.randint(0, 256, (n, 16), generator=torch.Generator().manual_seed(0))


def loop_gradients(model, wins, name, transposed):
    """Per-window gradients of one linear, by a plain autograd loop."""
    module = model.get_submodule(name)
    out = []
    for w in wins:
        loss = model(input_ids=w[None], labels=w[None]).loss
        (grad,) = torch.autograd.grad(loss, module.weight)
        out.append(grad.t() if transposed else grad)
    return out


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_one_pass_statistics_equal_separate_passes(build):
    model, wins = build(), windows()
    linears = find_linears(model)
    mean_grad, fisher = gradient_statistics(model, wins, linears, device=CPU, progress=False)
    ref_fisher = empirical_fisher(model, wins, linears, device=CPU, progress=False)
    for name, info in linears.items():
        assert torch.allclose(fisher[name], ref_fisher[name], rtol=1e-5, atol=1e-12), name
    name, info = list(linears.items())[-1]
    grads = loop_gradients(model, wins, name, info.transposed)
    assert torch.allclose(mean_grad[name], sum(grads) / len(grads), rtol=1e-4, atol=1e-10)
    abs_grad, _ = gradient_statistics(model, wins, {name: info}, device=CPU, progress=False, absolute=True)
    assert torch.allclose(abs_grad[name], sum(g.abs() for g in grads) / len(grads), rtol=1e-4, atol=1e-10)
    assert all(p.requires_grad for p in model.parameters())  # flags restored


def test_damage_equals_plain_loop():
    torch.manual_seed(0)
    w, g = torch.randn(4, 64), torch.randn(4, 64)
    dmg = gradient_damage(w, g, CONFIGS)
    for j, c in enumerate(CONFIGS[:-1]):
        q = fake_quantize(w, c)
        naive = sum(abs(g[r, k].item() * (w[r, k] - q[r, k]).item()) for r in range(4) for k in range(64))
        assert dmg[j] == pytest.approx(naive, rel=1e-5)
    assert dmg[-1] == 0.0


def test_table_from_precomputed_statistics_matches_one_from_its_own_pass():
    model, wins = tiny_llama(), windows(2)
    linears = find_linears(model)
    own, scores = gradient_table(model, wins, linears, CONFIGS, device=CPU, progress=False)
    mean_grad, _ = gradient_statistics(model, wins, linears, device=CPU, progress=False)
    given, _ = gradient_table(model, wins[:0], linears, CONFIGS, device=CPU, progress=False, mean_grad=mean_grad)
    np.testing.assert_allclose(own, given, rtol=1e-6)
    assert own.shape == (len(linears), len(CONFIGS)) and (own[:, -1] == 0).all()
    assert (np.diff(own, axis=1) < 0).all()  # fewer bits, more damage, every unit
    w = get_weight(model.get_submodule(next(iter(linears))))
    assert own[0, 0] == pytest.approx(gradient_damage(w, mean_grad[next(iter(linears))], CONFIGS)[0])
    assert (scores["gradient_l1"] > 0).all()


def test_combined_tables_equal_separate_tables():
    model, wins = tiny_gpt2(), windows(2)
    linears = find_linears(model)
    both = gradient_fisher_tables(model, wins, linears, CONFIGS, device=CPU, progress=False)
    f_damage, f_scores = fisher_table(model, wins, linears, CONFIGS, device=CPU, progress=False)
    g_damage, g_scores = gradient_table(model, wins, linears, CONFIGS, device=CPU, progress=False)
    np.testing.assert_allclose(both["fisher"][0], f_damage, rtol=1e-5)
    np.testing.assert_allclose(both["fisher"][1]["fisher_trace"], f_scores["fisher_trace"], rtol=1e-5)
    np.testing.assert_allclose(both["gradient"][0], g_damage, rtol=1e-5)
    np.testing.assert_allclose(both["gradient"][1]["gradient_l1"], g_scores["gradient_l1"], rtol=1e-5)


def test_missing_statistics_are_named():
    model = tiny_llama()
    linears = find_linears(model)
    with pytest.raises(ValueError, match="statistics lack"):
        gradient_table(model, windows(1), linears, CONFIGS, device=CPU, progress=False, mean_grad={})
