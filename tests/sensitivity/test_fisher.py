import pytest
import torch

from mixbits.model.arch import find_linears, get_weight
from mixbits.quant.affine import fake_quantize
from mixbits.quant.spec import KEEP, QuantSpec
from mixbits.sensitivity.fisher import empirical_fisher, fisher_damage, fisher_table
from tests.conftest import tiny_gpt2, tiny_llama


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_fisher_is_mean_of_squared_per_window_gradients(build):
    model = build()
    windows = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(0))
    linears = find_linears(model)
    fisher = empirical_fisher(model, windows, linears, device=torch.device("cpu"), progress=False)
    name = next(iter(linears))
    module = model.get_submodule(name)
    ref = torch.zeros_like(get_weight(module))
    for w in windows:
        loss = model(input_ids=w[None], labels=w[None]).loss
        (grad,) = torch.autograd.grad(loss, module.weight)
        ref += (grad.t() if linears[name].transposed else grad) ** 2
    assert torch.allclose(fisher[name], ref / 3, rtol=1e-4, atol=1e-12)
    assert not any(p.requires_grad is False for p in model.parameters())  # restored


def test_damage_is_half_fisher_weighted_squared_error():
    torch.manual_seed(0)
    w, f = torch.randn(8, 64), torch.rand(8, 64)
    configs = (QuantSpec(2, 32), QuantSpec(4, 64), KEEP)
    dmg = fisher_damage(w, f, configs)
    for j, c in enumerate(configs[:2]):
        q = fake_quantize(w, c)
        naive = sum(0.5 * f[r, k].item() * (w[r, k] - q[r, k]).item() ** 2 for r in range(8) for k in range(64))
        assert dmg[j] == pytest.approx(naive, rel=1e-5)
    assert dmg[2] == 0.0 and dmg[0] > dmg[1] > 0


def test_table_has_one_row_per_linear():
    model = tiny_llama()
    linears = find_linears(model)
    configs = (QuantSpec(2, 64), QuantSpec(8, 64), KEEP)
    damage, scores = fisher_table(model, torch.randint(0, 256, (2, 16)), linears, configs, device=torch.device("cpu"), progress=False)
    assert damage.shape == (len(linears), 3) and (damage[:, 0] > damage[:, 1]).all()
    assert (scores["fisher_trace"] > 0).all()
