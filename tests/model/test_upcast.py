"""Embedding and head held in 16 bits, computed in float32: the numbers of the float32 model, half the bytes."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from mixbits.eval.perplexity import evaluate_models
from mixbits.eval.streamed import evaluate_streamed, Variant
from mixbits.model.arch import find_linears
from mixbits.model.lazy import open_checkpoint
from mixbits.model.upcast import _ChunkedHead, held_names, upcasting
from mixbits.sensitivity.fisher_streamed import streamed_fisher
from tests.conftest import tiny_llama

CPU = torch.device("cpu")


def windows(n=3, seqlen=20):
    return torch.randint(0, 256, (n, seqlen), generator=torch.Generator().manual_seed(0))


def untied_llama():
    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def bf16_checkpoint(model, folder):
    """`model` saved in bfloat16 (as hub checkpoints are) and its float32 twin holding the same values."""
    model.to(torch.bfloat16).save_pretrained(folder, max_shard_size="100KB")
    return model.float()


@pytest.mark.parametrize("build", [tiny_llama, untied_llama])
def test_held_in_bf16_while_resident_and_computing_in_float32(build, tmp_path):
    bf16_checkpoint(build(), tmp_path)
    ckpt = open_checkpoint(tmp_path)
    assert ckpt.compute_dtype == torch.float32
    outside_f32 = sum(p.numel() * 4 for n, p in build().named_parameters() if not n.startswith("model.layers."))
    held = {n: p.numel() for n, p in build().named_parameters() if n in set(held_names(build()))}
    assert ckpt.nbytes(None) == outside_f32 - 2 * sum(held.values())  # 16-bit embedding/head: half their bytes
    with ckpt.resident() as model:
        assert model.get_input_embeddings().weight.dtype == torch.bfloat16
        assert model.get_output_embeddings().weight.dtype == torch.bfloat16
        assert model.model.norm.weight.dtype == torch.float32
        assert model.get_input_embeddings()(torch.tensor([[1, 2]])).dtype == torch.float32
    assert "forward" not in vars(ckpt.model.get_output_embeddings())  # the class's forward is back
    assert ckpt.model.get_output_embeddings().weight.device.type == "meta"


@pytest.mark.parametrize("build", [tiny_llama, untied_llama])
def test_evaluation_equals_the_float32_model(build, tmp_path):
    reference = bf16_checkpoint(build(), tmp_path)
    whole = evaluate_models({"original": reference}, windows(), device=CPU, reference="original", progress=False)
    streamed = evaluate_streamed(open_checkpoint(tmp_path), windows(), [Variant("original")], reference="original",
                                 topk=None, progress=False)
    assert streamed["original"].ppl == pytest.approx(whole["original"].ppl, rel=1e-6)


@pytest.mark.parametrize("build", [tiny_llama, untied_llama])
def test_fisher_through_a_held_head_equals_the_float32_checkpoint(build, tmp_path):
    """The same values stored in float32 (nothing held) and in bfloat16 (embedding and head held)."""
    bf16_checkpoint(build(), tmp_path / "bf16").save_pretrained(tmp_path / "f32")
    tables = {}
    for kind in ("bf16", "f32"):
        ckpt = open_checkpoint(tmp_path / kind)
        tables[kind] = streamed_fisher(ckpt, windows(), find_linears(ckpt.model), progress=False)
    for name, ref in tables["f32"].items():
        assert torch.allclose(tables["bf16"][name], ref, rtol=1e-6, atol=1e-7 * float(ref.abs().max())), name


@pytest.mark.parametrize("rows", [1, 7, 256])
def test_chunked_head_values_and_input_gradient(rows):
    torch.manual_seed(0)
    weight = torch.randn(50, 16).to(torch.bfloat16)
    bias = torch.randn(50).to(torch.bfloat16)
    x = torch.randn(2, 5, 16, requires_grad=True)
    y = _ChunkedHead.apply(x, weight, bias, rows)
    (gx,) = torch.autograd.grad((y.sin()).sum(), x)
    x2 = x.detach().clone().requires_grad_(True)
    y2 = F.linear(x2, weight.float(), bias.float())
    (gx2,) = torch.autograd.grad((y2.sin()).sum(), x2)
    assert y.dtype == torch.float32
    assert torch.allclose(y, y2, rtol=1e-6, atol=1e-6) and torch.allclose(gx, gx2, rtol=1e-5, atol=1e-6)


def test_head_weight_with_grad_is_refused():
    model = untied_llama()
    model.lm_head.weight.data = model.lm_head.weight.data.to(torch.bfloat16)
    model.lm_head.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="requires grad"), upcasting(model, torch.float32):
        pass


def test_scaled_embedding_subclass_is_not_taken_over():
    class Scaled(nn.Embedding):
        def forward(self, ids):
            return super().forward(ids) * 8.0

    model = untied_llama()
    model.model.embed_tokens = Scaled(256, 64)
    assert held_names(model) == ["lm_head.weight"]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("build", [tiny_llama, untied_llama])
def test_on_cuda_held_in_bf16_and_equal_to_the_float32_model(build, tmp_path):
    """float32 compute on the GPU with the embedding and head held in bfloat16 on the device: the
    float32 model's perplexity (TF32 off, so both sides run true float32 matmuls)."""
    cuda = torch.device("cuda")
    reference = bf16_checkpoint(build(), tmp_path)
    matmul = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        whole = evaluate_models({"original": reference}, windows(), device=cuda, reference="original", progress=False)
        ckpt = open_checkpoint(tmp_path, device=cuda, compute_dtype=torch.float32)
        with ckpt.resident() as model:
            assert model.get_output_embeddings().weight.dtype == torch.bfloat16
            assert model.get_output_embeddings().weight.device.type == "cuda"
        streamed = evaluate_streamed(ckpt, windows(), [Variant("original")], reference="original", topk=None,
                                     progress=False)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul
    assert streamed["original"].ppl == pytest.approx(whole["original"].ppl, rel=1e-5)
