import numpy as np
import pytest
import torch

from mixbits.model.arch import find_linears, get_weight
from mixbits.quant.affine import fake_quantize
from mixbits.quant.spec import KEEP, QuantSpec
from mixbits.sensitivity.capture import collect_gram
from mixbits.sensitivity.output_error import output_damage, output_error_table, reference_config
from tests.conftest import tiny_gpt2, tiny_llama

CPU = torch.device("cpu")
CONFIGS = (QuantSpec(2, 64), QuantSpec(3, 64), QuantSpec(4, 64), QuantSpec(8, 64), KEEP)


def windows(n=3):
    return torch.randint(0, 256, (n, 16), generator=torch.Generator().manual_seed(0))


def captured_inputs(model, wins, names):
    """X [tokens, in] of each named module, by hand-written hooks and plain concatenation."""
    xs = {n: [] for n in names}

    def hook(module, args, output, name):
        xs[name].append(args[0].reshape(-1, args[0].shape[-1]))

    handles = [model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: hook(m, a, o, n)) for n in names]
    with torch.no_grad():
        for w in wins:
            model(input_ids=w[None])
    for h in handles:
        h.remove()
    return {n: torch.cat(v).double() for n, v in xs.items()}


def hook_count(model):
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_gram_and_damage_equal_captured_inputs(build):
    model, wins = build(), windows()
    linears = find_linears(model)
    grams, n_tokens = collect_gram(model, wins, linears, device=CPU, progress=False)
    assert n_tokens == wins.numel() and hook_count(model) == 0
    xs = captured_inputs(model, wins, list(linears))
    for name, info in linears.items():
        x = xs[name]
        assert grams[name].shape == (info.in_features, info.in_features)
        assert torch.allclose(grams[name].double(), x.T @ x, rtol=1e-4, atol=1e-4), name
        w = get_weight(model.get_submodule(name)).detach()
        dmg = output_damage(w, grams[name], n_tokens, CONFIGS[:1])[0]
        delta = (w - fake_quantize(w, CONFIGS[0])).double()
        assert dmg == pytest.approx(float((x @ delta.T).square().sum()) / x.shape[0], rel=1e-4), name


def test_linears_reading_one_tensor_share_one_matrix():
    model = tiny_llama()
    grams, _ = collect_gram(model, windows(2), find_linears(model), device=CPU, progress=False)
    attn = "model.layers.0.self_attn."
    assert grams[attn + "q_proj"] is grams[attn + "k_proj"] is grams[attn + "v_proj"]
    assert grams["model.layers.0.mlp.gate_proj"] is grams["model.layers.0.mlp.up_proj"]
    assert grams[attn + "o_proj"] is not grams[attn + "q_proj"]


def test_hooks_removed_when_forward_fails():
    model = tiny_llama()
    bad = torch.full((1, 8), 10_000)  # token ids beyond the vocabulary: the embedding raises
    with pytest.raises(IndexError):
        collect_gram(model, bad, find_linears(model), device=CPU, progress=False)
    assert hook_count(model) == 0


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_table_keep_is_zero_and_damage_falls_with_bits(build):
    model = build()
    linears = find_linears(model)
    damage, scores = output_error_table(model, windows(2), linears, CONFIGS, device=CPU, progress=False)
    assert damage.shape == (len(linears), len(CONFIGS)) and (damage[:, -1] == 0).all()
    assert (np.diff(damage, axis=1) < 0).all()
    np.testing.assert_array_equal(scores["output_error"], damage[:, 0])


def test_chunked_passes_and_reference_score():
    model, wins = tiny_llama(), windows(2)
    linears = find_linears(model)
    whole, _ = output_error_table(model, wins, linears, CONFIGS, device=CPU, progress=False, max_gram_bytes=None)
    ref = QuantSpec(4, 32)  # not among CONFIGS: computed on its own
    chunked, scores = output_error_table(model, wins, linears, CONFIGS, device=CPU, progress=False,
                                         max_gram_bytes=4 * 128 * 128, reference=ref)
    np.testing.assert_allclose(chunked, whole, rtol=1e-5)
    grams, n = collect_gram(model, wins, linears, device=CPU, progress=False)
    direct = [output_damage(get_weight(model.get_submodule(k)), grams[k], n, (ref,))[0] for k in linears]
    np.testing.assert_allclose(scores["output_error"], direct, rtol=1e-5)
    with pytest.raises(ValueError, match="keeps the layer"):
        reference_config(CONFIGS, KEEP)
    assert reference_config((KEEP, QuantSpec(3, 64))) == QuantSpec(3, 64)
