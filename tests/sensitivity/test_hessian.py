"""Hutchinson trace and power iteration against exact Hessians of tiny models."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import LlamaConfig, LlamaForCausalLM

from mixbits.model.arch import LinearInfo, find_linears
from mixbits.quant.affine import fake_quantize
from mixbits.quant.spec import KEEP, QuantSpec
from mixbits.sensitivity.hessian import hessian_damage, hessian_table, hutchinson_trace, top_eigenvalues
from tests.conftest import tiny_llama

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py; many small ops


class MlpLM(nn.Module):
    """Embedding -> residual tanh MLP -> head, next-token loss: three linears, cheap HVPs."""

    def __init__(self, vocab: int = 16, dim: int = 8, hidden: int = 4, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab, dim)
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, input_ids, labels=None):
        h = self.embed(input_ids)
        logits = self.head(h + self.down(torch.tanh(self.up(h))))
        loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
        return SimpleNamespace(loss=loss, logits=logits)

    def linears(self) -> dict[str, LinearInfo]:
        named = (("up", self.up), ("down", self.down), ("head", self.head))
        return {n: LinearInfo(n, 0, m.out_features, m.in_features, False) for n, m in named}


def small_llama() -> LlamaForCausalLM:
    """A 1-block Llama with hidden 8 (units of 32-64 weights), so exact Hessians are cheap."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=4, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                      tie_word_embeddings=True, initializer_range=0.5)
    return LlamaForCausalLM(cfg).eval()


def mean_loss_fn(model, names, windows, batched=False):
    """Mean window loss as a function of the flat concatenation of the named weights."""
    shapes = [model.get_submodule(n).weight.shape for n in names]

    def loss(flat):
        params, i = {}, 0
        for n, s in zip(names, shapes):
            params[f"{n}.weight"] = flat[i:i + s.numel()].reshape(s)
            i += s.numel()
        if batched:
            return functional_call(model, params, kwargs={"input_ids": windows, "labels": windows}, strict=False).loss
        losses = [functional_call(model, params, kwargs={"input_ids": w[None], "labels": w[None]}, strict=False).loss
                  for w in windows]
        return torch.stack(losses).mean()

    flat = torch.cat([model.get_submodule(n).weight.detach().reshape(-1) for n in names])
    return loss, flat


def blocks(names, model):
    sizes = [model.get_submodule(n).weight.numel() for n in names]
    starts = np.cumsum([0] + sizes)
    return {n: slice(int(a), int(b)) for n, a, b in zip(names, starts[:-1], starts[1:])}


@pytest.fixture(scope="module")
def mlp_exact():
    model = MlpLM()
    windows = torch.randint(0, 16, (2, 10), generator=torch.Generator().manual_seed(1))
    names = list(model.linears())
    loss, flat = mean_loss_fn(model, names, windows)
    H = torch.autograd.functional.hessian(loss, flat).double()
    return model, windows, H, blocks(names, model)


def hutchinson_sd(H, sl):
    """Exact standard deviation of one sample v_uᵀ(Hv)_u with v Rademacher over ALL units."""
    rows = H[sl]
    inside = rows[:, sl]
    off_diag_inside = inside.square().sum() - inside.diagonal().square().sum()
    outside = rows.square().sum() - inside.square().sum()
    return math.sqrt(float(2 * off_diag_inside + outside))


def test_hutchinson_converges_to_exact_block_trace(mlp_exact):
    """Within 4 standard errors (computed from the exact H) for every unit; within 5% where that
    error is small. The inner layers' blocks are indefinite at random init, so their standard
    error is several times their trace, and percent accuracy would take ~10⁴ samples there."""
    model, windows, H, sl = mlp_exact
    probes = 400
    est = hutchinson_trace(model, windows, model.linears(), device=CPU, probes=probes, progress=False,
                           generator=torch.Generator().manual_seed(0))
    m = len(windows) * probes
    for name, s in sl.items():
        exact, se = float(H[s, s].trace()), hutchinson_sd(H, s) / math.sqrt(m)
        assert abs(est[name] - exact) <= 4 * se, name
        if 4 * se < 0.05 * abs(exact):
            assert est[name] == pytest.approx(exact, rel=0.05), name
    assert 4 * hutchinson_sd(H, sl["head"]) / math.sqrt(m) < 0.05 * abs(float(H[sl["head"], sl["head"]].trace()))


def test_one_sample_estimate_is_unbiased_over_seeds(mlp_exact):
    model, windows, H, sl = mlp_exact
    seeds = 300
    runs = [hutchinson_trace(model, windows[:1], model.linears(), device=CPU, probes=1, progress=False,
                             generator=torch.Generator().manual_seed(s)) for s in range(seeds)]
    H1 = torch.autograd.functional.hessian(*mean_loss_fn(model, list(sl), windows[:1])).double()
    for name, s in sl.items():
        mean = np.mean([r[name] for r in runs])
        assert abs(mean - float(H1[s, s].trace())) <= 4 * hutchinson_sd(H1, s) / math.sqrt(seeds), name


def test_llama_trace_is_the_mean_of_shared_hvp_samples():
    """Replays the generator: the estimate is exactly (1/m) Σ v_uᵀ(Hv)_u with the same v's."""
    model = small_llama()
    linears = find_linears(model)
    names = list(linears)
    windows = torch.randint(0, 32, (2, 12), generator=torch.Generator().manual_seed(1))
    probes = 2
    est = hutchinson_trace(model, windows, linears, device=CPU, probes=probes, progress=False,
                           generator=torch.Generator().manual_seed(7))
    gen = torch.Generator().manual_seed(7)
    sl = blocks(names, model)
    ref = dict.fromkeys(names, 0.0)
    with sdpa_kernel(SDPBackend.MATH):
        for w in windows:
            loss, flat = mean_loss_fn(model, names, w[None])
            for _ in range(probes):
                v = torch.cat([(torch.randint(0, 2, model.get_submodule(n).weight.shape, generator=gen) * 2 - 1)
                               .float().reshape(-1) for n in names])
                _, hv = torch.autograd.functional.hvp(loss, flat, v)
                for n in names:
                    ref[n] += float(v[sl[n]] @ hv[sl[n]]) / (len(windows) * probes)
    for n in names:
        assert est[n] == pytest.approx(ref[n], rel=1e-4, abs=1e-6), n


def test_power_iteration_finds_largest_magnitude_eigenvalue():
    model = small_llama()
    linears = find_linears(model)
    windows = torch.randint(0, 32, (2, 12), generator=torch.Generator().manual_seed(1))
    for name in ("model.layers.0.mlp.up_proj", "model.layers.0.self_attn.k_proj"):
        with sdpa_kernel(SDPBackend.MATH):
            loss, flat = mean_loss_fn(model, [name], windows, batched=True)
            exact = torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss, flat).double())
        top = float(exact[exact.abs().argmax()])
        eig = top_eigenvalues(model, windows, {name: linears[name]}, device=CPU, iters=400, tol=1e-7,
                              progress=False, generator=torch.Generator().manual_seed(0))
        assert eig[name] == pytest.approx(top, rel=1e-3), name


def test_power_iteration_on_mlp_blocks(mlp_exact):
    model, windows, _, _ = mlp_exact
    eig = top_eigenvalues(model, windows, model.linears(), device=CPU, iters=500, tol=1e-8, progress=False,
                          generator=torch.Generator().manual_seed(0))
    for name in model.linears():
        loss, flat = mean_loss_fn(model, [name], windows, batched=True)
        exact = torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss, flat).double())
        assert eig[name] == pytest.approx(float(exact[exact.abs().argmax()]), rel=1e-3), name


def test_damage_is_half_mean_trace_times_squared_error():
    torch.manual_seed(0)
    w = torch.randn(8, 64)
    configs = (QuantSpec(2, 32), QuantSpec(4, 32), KEEP)
    dmg = hessian_damage(w, 0.3, configs)
    for j, c in enumerate(configs[:2]):
        assert dmg[j] == pytest.approx(0.5 * 0.3 * float((fake_quantize(w, c) - w).square().sum()), rel=1e-6)
    assert dmg[2] == 0.0 and dmg[0] > dmg[1] > 0
    assert (hessian_damage(w, -1.0, configs) == 0).all()  # negative curvature predicts nothing


def test_table_keep_is_zero_and_damage_falls_with_bits():
    model = tiny_llama()
    linears = find_linears(model)
    configs = (QuantSpec(2, 64), QuantSpec(3, 64), QuantSpec(4, 64), QuantSpec(8, 64), KEEP)
    windows = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    damage, scores = hessian_table(model, windows, linears, configs, device=CPU, progress=False, probes=2,
                                   top_eigen=True, max_units=3, eig_windows=1, eig_iters=5,
                                   generator=torch.Generator().manual_seed(0))
    assert damage.shape == (len(linears), len(configs)) and (damage[:, -1] == 0).all()
    positive = scores["hessian_trace"] > 0
    assert positive.any()
    assert (np.diff(damage[positive], axis=1) < 0).all()
    assert (damage[~positive] == 0).all()
    eig = scores["hessian_top_eig"]
    assert np.isfinite(eig).sum() == 3 and np.isnan(eig).sum() == len(linears) - 3
    chosen = np.argsort(-scores["hessian_trace"])[:3]
    assert np.isfinite(eig[chosen]).all()
    assert all(p.requires_grad for p in model.parameters())  # flags restored
