"""GGUF export: the `gguf` package's reader and dequantizer (llama.cpp's block semantics in
numpy, independent of our encoder) give back the plan's weights, and transformers loads the
file (model and tokenizer) with the in-memory model's logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader
from gguf.quants import dequantize as gguf_dequantize
from transformers import AutoModelForCausalLM, AutoTokenizer

from mixbits.export.gguf import write_gguf
from mixbits.export.rules import ExportError
from mixbits.model.apply import fake_quantize_model
from mixbits.plan import Plan
from mixbits.quant.affine import minmax_qparams
from mixbits.quant.spec import QuantSpec
from tests.conftest import make_text, make_tokenizer, tiny_gpt2, tiny_llama

L = "model.layers."
HEADS = {"q_proj": 4, "k_proj": 2}  # tiny_llama: 4 query heads, 2 key-value heads


def mixed_plan() -> Plan:
    labels = {}
    for i, (qkv, o, gate_up, down) in enumerate([("w4g32s", "w4g64", "w5g32s", "w5g128"),
                                                  ("w8g64s", "w8pc", "w4pc", None)]):
        labels.update({f"{L}{i}.self_attn.{p}": qkv for p in ("q_proj", "k_proj", "v_proj")})
        labels.update({f"{L}{i}.mlp.{p}": gate_up for p in ("gate_proj", "up_proj")})
        labels[f"{L}{i}.self_attn.o_proj"] = o
        if down is not None:
            labels[f"{L}{i}.mlp.down_proj"] = down
    del labels[f"{L}1.self_attn.k_proj"]  # kept in 16 bit: GGUF stores q, k, v apart, so they need not agree
    return Plan({name: QuantSpec.parse(label) for name, label in labels.items()})


EXPECTED_TYPE = {"w4g32s": Q.Q4_0, "w4g64": Q.Q4_1, "w5g32s": Q.Q5_0, "w5g128": Q.Q5_1, "w8g64s": Q.Q8_0,
                 "w8pc": Q.Q8_0, "w4pc": Q.Q4_1}


def gguf_name(name: str) -> str:
    block, leaf = name.split(".")[2], name.rsplit(".", 1)[1]
    short = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}[leaf]
    return f"blk.{block}.{short}.weight"


def read_weights(path) -> dict[str, tuple[Q, torch.Tensor]]:
    """Every tensor of the file dequantized by gguf, q/k rows put back in Hugging Face order."""
    out = {}
    for tensor in GGUFReader(path).tensors:
        w = np.asarray(gguf_dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        for leaf, heads in (("attn_q", 4), ("attn_k", 2)):
            if f".{leaf}." in tensor.name:  # llama.cpp pairs rotary halves; undo it
                w = w.reshape(heads, w.shape[0] // heads // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)
        out[tensor.name] = (tensor.tensor_type, torch.from_numpy(w.copy()))
    return out


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer(make_text())


def test_blocks_hold_the_plan_codes(tmp_path, tokenizer):
    model, plan = tiny_llama(vocab=len(tokenizer)), mixed_plan()
    write_gguf(model, plan, tmp_path / "m.gguf", tokenizer=tokenizer)
    weights = read_weights(tmp_path / "m.gguf")
    expected = fake_quantize_model(model, plan)
    for name, spec in plan.specs.items():
        kind, got = weights[gguf_name(name)]
        want = expected.get_submodule(name).weight
        assert kind == EXPECTED_TYPE[spec.label], name
        if spec.symmetric:  # Q4_0 / Q5_0 / Q8_0 hold the very codes and scales
            assert torch.equal(got, want), name
        elif spec.bits in (4, 5):  # Q4_1 / Q5_1: only the offset -z*s is rounded to fp16
            qp = minmax_qparams(model.get_submodule(name).weight, spec)
            bound = (qp.zero * qp.scale).abs().max() * 2.0**-11 + 1e-6
            assert (got - want).abs().max() <= bound, name
        else:  # 8-bit asymmetric: exact blocks where q - z fits int8, else llama.cpp's Q8_0 (half its step d)
            blocks, got_blocks = want.detach().reshape(want.shape[0], -1, 32), got.reshape(want.shape[0], -1, 32)
            step = blocks.abs().amax(-1, keepdim=True) / 127  # d, then rounded to fp16: hence 0.56 not 0.5
            assert bool(((got_blocks - blocks).abs() <= 0.56 * step).all()), name
            exact = (got_blocks == blocks).all(-1).float().mean()
            assert 0 < exact < 1, name  # some blocks fit exactly, some do not
    for name in (f"{L}1.mlp.down_proj", f"{L}1.self_attn.k_proj"):  # not in the plan: kept in F16
        kind, got = weights[gguf_name(name)]
        assert kind == Q.F16 and torch.equal(got, model.get_submodule(name).weight.detach().half().float()), name
    assert weights["blk.0.attn_norm.weight"][0] == Q.F32
    assert "output.weight" not in weights  # tied to token_embd


def test_transformers_loads_model_and_tokenizer(tmp_path, tokenizer):
    model, plan = tiny_llama(vocab=len(tokenizer)), mixed_plan()
    write_gguf(model, plan, tmp_path / "model.gguf", tokenizer=tokenizer)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf", dtype=torch.float32)
    ids = torch.randint(0, len(tokenizer), (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = loaded(ids).logits, fake_quantize_model(model, plan)(ids).logits
    # the only differences: fp16 offsets of Q4_1/Q5_1 and the re-quantized 8-bit asymmetric layer
    torch.testing.assert_close(got, want, rtol=0, atol=5e-3)
    reread = AutoTokenizer.from_pretrained(tmp_path, gguf_file="model.gguf")
    text = "The city of music and film was the first new school."
    assert reread(text).input_ids == tokenizer(text).input_ids


def test_requantize_regroups_at_32_with_the_plan_bits(tmp_path):
    model = tiny_llama()
    plan = Plan({f"{L}0.mlp.down_proj": QuantSpec.parse("w4g128s"), f"{L}1.self_attn.o_proj": QuantSpec.parse("w5g64")})
    write_gguf(model, plan, tmp_path / "repeat.gguf")
    write_gguf(model, plan, tmp_path / "requant.gguf", regroup="requantize")
    as_32 = Plan({name: QuantSpec(s.bits, 32, s.symmetric) for name, s in plan.specs.items()})
    for fname, reference in (("repeat.gguf", plan), ("requant.gguf", as_32)):
        weights = read_weights(tmp_path / fname)
        expected = fake_quantize_model(model, reference)
        for name in plan.specs:
            torch.testing.assert_close(weights[gguf_name(name)][1], expected.get_submodule(name).weight,
                                       rtol=0, atol=1e-4)


@pytest.mark.parametrize("label, nearest", [("w3g32", "w4g32"), ("w2g64s", "w4g64s"), ("w6pc", "w8pc")])
def test_bits_without_a_legacy_type_are_refused_before_writing(tmp_path, label, nearest):
    specs = dict(mixed_plan().specs)
    specs[f"{L}1.self_attn.v_proj"] = QuantSpec.parse(label)
    with pytest.raises(ExportError) as err:
        write_gguf(tiny_llama(), Plan(specs), tmp_path / "m.gguf")
    assert f"{L}1.self_attn.v_proj {label}" in str(err.value) and f"nearest: {nearest}" in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_unsupported_architecture_is_refused_before_writing(tmp_path):
    model = tiny_gpt2()
    plan = Plan({"transformer.h.0.mlp.c_fc": QuantSpec(4, 32)})
    with pytest.raises(ExportError, match="model type 'gpt2' has no GGUF writer"):
        write_gguf(model, plan, tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


def test_llama_cpp_runs_the_file(tmp_path, tokenizer):
    """llama.cpp itself (llama-cpp-python, optional): same tokens, logits close to the in-memory
    model (llama.cpp rounds activations to 8 bits in quantized matmuls), same top-1 token."""
    llama_cpp = pytest.importorskip("llama_cpp")
    model, plan = tiny_llama(vocab=len(tokenizer)), mixed_plan()
    write_gguf(model, plan, tmp_path / "model.gguf", tokenizer=tokenizer)
    llm = llama_cpp.Llama(str(tmp_path / "model.gguf"), n_ctx=64, logits_all=True, verbose=False, n_threads=1)
    text = "The city of music and film was the first new school."
    ids = tokenizer(text).input_ids
    assert llm.tokenize(text.encode(), add_bos=False) == ids
    llm.eval(ids)
    got = torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))
    with torch.no_grad():
        want = fake_quantize_model(model, plan)(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(got, want, rtol=0, atol=2e-2)
    assert torch.equal(got.argmax(-1), want.argmax(-1))
