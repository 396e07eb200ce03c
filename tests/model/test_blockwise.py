import pytest
import torch

from mixbits.model.arch import find_blocks
from mixbits.model.blockwise import block_forward, block_on, capture_block_inputs, run_blocks
from tests.conftest import tiny_gpt2, tiny_llama

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def windows(n=3, seqlen=16):
    return torch.randint(0, 256, (n, seqlen), generator=torch.Generator().manual_seed(0))


def head(model, hidden):
    """Final norm + lm_head: what the model does after its last block."""
    norm = model.model.norm if hasattr(model, "model") else model.transformer.ln_f
    return model.lm_head(norm(hidden))


def hook_count(model):
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize("batch_size", [1, 2])
def test_blocks_one_by_one_reproduce_logits(build, batch_size):
    model, wins = build(), windows()
    with torch.no_grad():
        expected = model(input_ids=wins).logits
    inputs = capture_block_inputs(model, wins, batch_size=batch_size, progress=False)
    assert hook_count(model) == 0
    assert len(inputs) == -(-len(wins) // batch_size) and inputs.n_tokens == wins.numel()
    assert all(h.device == CPU and h.shape[1:] == (16, 64) for h in inputs.hidden)
    out = run_blocks(model, inputs, device=CPU, progress=False)
    with torch.no_grad():
        logits = head(model, torch.cat(out.hidden))
    assert torch.allclose(logits, expected, atol=1e-5, rtol=0)


def test_block_inputs_are_the_embeddings_and_block_forward_chains():
    model, wins = tiny_llama(), windows(2)
    inputs = capture_block_inputs(model, wins, progress=False)
    assert torch.equal(torch.cat(inputs.hidden), model.model.embed_tokens(wins).detach())
    _, blocks = find_blocks(model)
    with block_on(blocks[0], CPU):
        first = block_forward(blocks[0], inputs, device=CPU)
    assert [h.shape for h in first] == [h.shape for h in inputs.hidden]
    assert not any(torch.equal(a, b) for a, b in zip(first, inputs.hidden))


def test_equal_arguments_are_stored_once():
    inputs = capture_block_inputs(tiny_llama(), windows(3), progress=False)
    a, b = inputs.kwargs[0], inputs.kwargs[2]
    assert a["position_ids"] is b["position_ids"]
    assert a["position_embeddings"][0] is b["position_embeddings"][0]


def test_bad_windows_and_batch_size_are_named():
    model = tiny_llama()
    with pytest.raises(ValueError, match="LongTensor"):
        capture_block_inputs(model, torch.zeros(2, 8), progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        capture_block_inputs(model, windows(2), batch_size=0, progress=False)
    with pytest.raises(ValueError, match="batches"):
        capture_block_inputs(model, windows(2), progress=False).with_hidden([])
    assert hook_count(model) == 0
