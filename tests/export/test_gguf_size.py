"""The GGUF file size predicted without writing equals the size of the file `write_gguf` writes:
tiny random Llamas 256 wide (tied and untied output head) with a tokenizer, a plan mixing K-quants,
legacy types, an affine layer and an F16 layer; from the model or from a meta skeleton of its
config; and split as fixed bytes + each layer's weight bytes, for allocation."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mixbits.export.gguf import write_gguf
from mixbits.export.gguf_size import gguf_file_bytes, gguf_size, gguf_weight_bytes, meta_model
from mixbits.export.rules import ExportError
from mixbits.model.apply import layer_shapes
from mixbits.plan import Plan
from mixbits.quant.spec import GGML_TYPES, KEEP, GGMLSpec, QuantSpec
from tests.conftest import make_text, make_tokenizer
from tests.export.test_gguf_kquant import mixed_plan


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer(make_text())


def llama(vocab: int, tied: bool, intermediate: int = 512) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=intermediate, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=tied, architectures=["LlamaForCausalLM"])
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("tied", [True, False])
def test_predicted_bytes_are_the_written_file(tokenizer, tmp_path, tied):
    model, plan = llama(len(tokenizer) + 7, tied), mixed_plan()  # 7 [PAD] entries in the vocabulary too
    assert {type(s) for s in plan.specs.values()} == {GGMLSpec, QuantSpec}  # and 1.mlp.down_proj left in F16
    predicted = gguf_file_bytes(model, plan, tokenizer)
    path = write_gguf(model, plan, tmp_path / "model.gguf", tokenizer=tokenizer)
    assert predicted == os.path.getsize(path)
    assert gguf_file_bytes(meta_model(model.config), plan, tokenizer) == predicted  # config alone suffices
    assert gguf_size(meta_model(model.config), tokenizer).file_bytes(plan) == predicted
    long = "m" * 80  # general.name is the file's stem; 75 more bytes outlast the 32-byte padding
    other = write_gguf(model, plan, tmp_path / f"{long}.gguf", tokenizer=tokenizer)
    assert gguf_file_bytes(model, plan, tokenizer, name=long) == os.path.getsize(other) != predicted


def test_split_sizes_every_plan_exactly(tokenizer, tmp_path):
    model = llama(len(tokenizer), tied=False, intermediate=576)  # down_proj rows of 576: no K-quant
    shapes = layer_shapes(model)
    size = gguf_size(model, tokenizer, tokenizer_pre="smollm")
    plans = [Plan.uniform(shapes, KEEP), Plan.uniform(shapes, GGML_TYPES["Q8_0"]),
             Plan({n: GGML_TYPES["Q2_K"] if i == 256 else QuantSpec(5, 64) for n, (o, i) in shapes.items()})]
    for plan in plans:
        path = write_gguf(model, plan, tmp_path / "model.gguf", tokenizer=tokenizer, tokenizer_pre="smollm")
        assert size.file_bytes(plan) == os.path.getsize(path), plan.meta
        path.unlink()
    assert len({size.file_bytes(p) for p in plans}) == len(plans)


def test_weight_bytes_are_padded_and_none_where_gguf_cannot_store():
    assert gguf_weight_bytes((3, 256), GGML_TYPES["Q4_K"]) == 448  # 3 x 144 = 432, padded to 32
    assert gguf_weight_bytes((4, 64), QuantSpec(4, 128)) == 160  # Q4_1: 4 x 2 blocks x 20 bytes
    assert gguf_weight_bytes((4, 64), KEEP) == 512
    assert gguf_weight_bytes((4, 576), GGML_TYPES["Q4_K"]) is None  # 576 is no multiple of 256
    assert gguf_weight_bytes((4, 256), QuantSpec(3, 128)) is None  # no affine 3-bit type


def test_a_plan_gguf_cannot_store_is_refused_like_the_writer(tokenizer):
    model = llama(len(tokenizer), tied=True, intermediate=576)
    plan = Plan({"model.layers.0.mlp.down_proj": GGML_TYPES["Q4_K"]})
    with pytest.raises(ExportError, match="down_proj"):
        gguf_file_bytes(model, plan, tokenizer)
    with pytest.raises(ValueError, match="down_proj"):
        gguf_size(model, tokenizer).file_bytes(plan)


def test_writer_warns_when_a_plan_sized_for_a_gguf_target_comes_out_above_it(tokenizer, tmp_path, caplog):
    model = llama(len(tokenizer), tied=True)
    predicted = gguf_file_bytes(model, mixed_plan(), tokenizer)
    for target, warned in ((predicted, False), (predicted - 1, True)):
        plan = Plan(mixed_plan().specs, {"gguf": {"target_bytes": target, "general_name": "model",
                                                  "tokenizer_pre": "default"}})
        caplog.clear()
        with caplog.at_level("WARNING", logger="mixbits.export.gguf"):
            path = write_gguf(model, plan, tmp_path / "model.gguf", tokenizer=tokenizer)
        assert os.path.getsize(path) == predicted
        assert ("1 above the" in caplog.text) == warned, caplog.text
        path.unlink()
