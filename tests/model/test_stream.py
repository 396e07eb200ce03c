import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from mixbits.model.blockwise import capture_block_inputs
from mixbits.model.lazy import LazyCheckpoint, open_checkpoint
from mixbits.model.stream import BlockSource, LoadedModel, as_source, call_block, head_forward
from tests.conftest import tiny_gpt2, tiny_llama


def tiny_qwen2(seed=0):
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return Qwen2ForCausalLM(cfg).eval()


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2, tiny_qwen2])
def test_head_forward_reproduces_the_models_logits_and_loss(build):
    model = build()
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
    source = LoadedModel(model, "cpu")
    with torch.no_grad():
        expected = model(input_ids=ids, labels=ids)
        inputs = capture_block_inputs(model, ids, progress=False)
        hidden = inputs.hidden[0]
        for i in range(source.n_blocks):
            with source.block(i) as block:
                hidden, as_tuple = call_block(block, hidden, inputs.args[0], inputs.kwargs[0])
        out = head_forward(model, hidden, ids, labels=True, as_tuple=as_tuple)
    assert torch.equal(out.logits, expected.logits) and torch.equal(out.loss, expected.loss)
    assert type(model.get_submodule(source.block_path)[0]).__name__ != "_StandIn"  # blocks put back


def test_sources(tmp_path):
    model = tiny_llama()
    loaded = as_source(model, "cpu")
    assert isinstance(loaded, LoadedModel) and isinstance(loaded, BlockSource)
    with loaded.resident() as resident:
        assert resident is model
    model.save_pretrained(tmp_path)
    lazy = open_checkpoint(tmp_path)
    assert as_source(lazy) is lazy and isinstance(lazy, LazyCheckpoint)
    with pytest.raises(ValueError, match="device"):
        as_source(model)
