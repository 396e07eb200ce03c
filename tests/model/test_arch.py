import pytest
import torch

from mixbits.model.arch import find_blocks, find_linears, get_weight, set_weight, tied_groups
from tests.conftest import tiny_bert, tiny_distilbert, tiny_gpt2, tiny_llama


def tiny_decoder(config_name: str):
    """A 2-block random decoder of another Llama-like family (Mistral, Qwen2/3, Gemma)."""
    import transformers

    config = getattr(transformers, config_name)(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
    )
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize(
    "build, blocks, per_block, fused",
    [
        (tiny_llama, "model.layers", 7, [3, 2]),
        (tiny_gpt2, "transformer.h", 4, []),
        (tiny_bert, "bert.encoder.layer", 6, [3]),
        (tiny_distilbert, "distilbert.transformer.layer", 6, [3]),
        (lambda: tiny_decoder("MistralConfig"), "model.layers", 7, [3, 2]),
        (lambda: tiny_decoder("Qwen2Config"), "model.layers", 7, [3, 2]),
        (lambda: tiny_decoder("Qwen3Config"), "model.layers", 7, [3, 2]),
        (lambda: tiny_decoder("GemmaConfig"), "model.layers", 7, [3, 2]),
    ],
)
def test_blocks_linears_and_fused_groups(build, blocks, per_block, fused):
    model = build()
    path, layers = find_blocks(model)
    assert path == blocks and len(layers) == 2
    linears = find_linears(model)
    assert len(linears) == 2 * per_block
    assert not any("embed" in n or "lm_head" in n or "classifier" in n for n in linears)
    groups = tied_groups(model, linears)
    assert sorted(m for g in groups for m in g) == sorted(linears)
    sizes = sorted((len(g) for g in groups if len(g) > 1), reverse=True)
    assert sizes == sorted(fused * 2, reverse=True)


def test_conv1d_weight_is_read_and_written_as_out_in():
    model = tiny_gpt2()
    name = "transformer.h.0.mlp.c_fc"
    info = find_linears(model)[name]
    module = model.get_submodule(name)
    w = get_weight(module)
    assert tuple(w.shape) == (info.out_features, info.in_features) == (256, 64)
    x = torch.randn(3, 64)
    assert torch.allclose(module(x), x @ w.t() + module.bias, atol=1e-6)
    set_weight(module, torch.zeros_like(w))
    assert module.weight.abs().sum() == 0


def test_unsupported_model_type_is_named():
    with pytest.raises(ValueError, match="not supported"):
        find_linears(torch.nn.Linear(2, 2))
