"""GGUF files with one ggml type per tensor (K-quants beside legacy types and fp16), from a tiny
random Llama 256 wide: the blocks hold exactly mixbits' weights (read by the independent `gguf`
decoder), transformers' GGUF loader gives the in-memory model's logits, the tensor bytes are the
cost model's, and a plan a type cannot store is refused before writing with the nearest plan."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader
from gguf.quants import dequantize as gguf_dequantize
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from mixbits.export.formats import expressible, nearest_plan
from mixbits.export.gguf import gguf_data_bytes, write_gguf
from mixbits.export.rules import ExportError
from mixbits.model.apply import fake_quantize_model, layer_shapes
from mixbits.plan import Plan
from mixbits.quant import kquant
from mixbits.quant.affine import fake_quantize
from mixbits.quant.cost import layer_storage_bytes
from mixbits.quant.gram import gram
from mixbits.quant.spec import GGMLSpec, QuantSpec
from tests.conftest import make_text, make_tokenizer, tiny_llama

L = "model.layers."
SHORT = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
         "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
HEADS = {"attn_q": 4, "attn_k": 2}


def wide_llama(vocab: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def mixed_plan() -> Plan:
    labels = {"0.self_attn.q_proj": "Q4_K", "0.self_attn.k_proj": "Q6_K", "0.self_attn.v_proj": "Q3_K",
              "0.self_attn.o_proj": "Q2_K", "0.mlp.gate_proj": "Q5_K", "0.mlp.up_proj": "Q4_0",
              "0.mlp.down_proj": "Q8_0",
              "1.self_attn.q_proj": "w4g32s", "1.self_attn.k_proj": "Q4_1", "1.self_attn.v_proj": "Q5_1",
              "1.self_attn.o_proj": "Q5_0", "1.mlp.gate_proj": "Q2_K", "1.mlp.up_proj": "IQ4_XS"}  # 1.mlp.down_proj: fp16
    return Plan({L + n: QuantSpec.parse(v) if v.startswith("w") else GGMLSpec.parse(v) for n, v in labels.items()})


def gguf_name(name: str) -> str:
    return f"blk.{name.split('.')[2]}.{SHORT[name.rsplit('.', 1)[1]]}.weight"


def read_tensors(path) -> dict[str, tuple[Q, int, torch.Tensor]]:
    """name -> (type, bytes, weights dequantized by gguf with q/k rows in Hugging Face order)."""
    out = {}
    for t in GGUFReader(path).tensors:
        w = np.asarray(gguf_dequantize(t.data, t.tensor_type), dtype=np.float32)
        leaf = t.name.split(".")[-2] if t.name.startswith("blk.") else ""
        if leaf in HEADS:  # llama.cpp pairs rotary halves; undo it
            h = HEADS[leaf]
            w = w.reshape(h, w.shape[0] // h // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)
        out[t.name] = (t.tensor_type, int(t.n_bytes), torch.from_numpy(w.copy()))
    return out


def expected_model(model, plan: Plan, given: dict | None = None):
    """The in-memory model mixbits means: each planned weight replaced by its dequantized value."""
    given = given or {}
    out = copy.deepcopy(model)
    for name, spec in plan.specs.items():
        module = out.get_submodule(name)
        w = module.weight.detach().float()
        if isinstance(spec, GGMLSpec):
            params = given.get(name) or kquant.choose_params(w, spec)
            new = kquant.dequantize(kquant.quantize(w, params), params)
        else:
            new = fake_quantize(w, spec)
        module.weight.data.copy_(new)
    return out


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer(make_text())


@pytest.fixture(scope="module")
def written(tmp_path_factory, tokenizer):
    """The mixed file, with one layer's grid and codes from GPTQ on the K-quant grid (as a run would)."""
    model, plan = wide_llama(len(tokenizer)), mixed_plan()
    gptq_layer = L + "0.mlp.gate_proj"
    x = torch.randn(512, 256, generator=torch.Generator().manual_seed(1))
    r = kquant.gptq_ggml(model.get_submodule(gptq_layer).weight.detach(), gram(x), plan.specs[gptq_layer])
    model.get_submodule(gptq_layer).weight.data.copy_(r.weight)  # the model holds what the quantizer wrote
    path = tmp_path_factory.mktemp("gguf") / "model.gguf"
    write_gguf(model, plan, path, tokenizer=tokenizer, qparams={gptq_layer: r.params})
    return model, plan, path, {gptq_layer: r}


def test_each_tensor_holds_its_type_and_mixbits_weights_exactly(written):
    model, plan, path, gptq = written
    tensors = read_tensors(path)
    expected = expected_model(model, plan, {n: r.params for n, r in gptq.items()})
    for name, spec in plan.specs.items():
        kind, nbytes, got = tensors[gguf_name(name)]
        want = expected.get_submodule(name).weight.detach()
        if isinstance(spec, GGMLSpec):
            assert kind == Q[spec.name], name
            assert torch.equal(got, want), name
            assert nbytes == layer_storage_bytes(*want.shape, spec), name  # the file is the cost model
        else:
            assert kind == Q.Q4_0 and torch.equal(got, want), name
    for name, r in gptq.items():
        assert torch.equal(tensors[gguf_name(name)][2], r.weight)  # GPTQ's codes, not re-rounded ones
    kind, _, got = tensors[gguf_name(L + "1.mlp.down_proj")]
    assert kind == Q.F16 and torch.equal(got, model.get_submodule(L + "1.mlp.down_proj").weight.detach().half().float())


def test_tensor_bytes_are_known_before_writing(written):
    model, plan, path, _ = written
    reader = GGUFReader(path)
    assert gguf_data_bytes(model, plan) == path.stat().st_size - reader.data_offset


def test_transformers_loads_the_mixed_file_with_the_in_memory_logits(written, tokenizer):
    model, plan, path, gptq = written
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    ids = torch.randint(0, len(tokenizer), (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = loaded(ids).logits
        want = expected_model(model, plan, {n: r.params for n, r in gptq.items()})(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=5e-3)  # the tolerance of test_gguf's round trip


def test_fake_quantize_model_applies_ggml_types_as_the_file_stores_them(tokenizer):
    model, plan = wide_llama(len(tokenizer)), mixed_plan()
    got, want = fake_quantize_model(model, plan, storage_dtype=None), expected_model(model, plan)
    for name in plan.specs:
        assert torch.equal(got.get_submodule(name).weight, want.get_submodule(name).weight), name


def test_rows_a_type_cannot_store_are_refused_before_writing_with_the_nearest_plan(tmp_path):
    model = tiny_llama()  # 64 wide, mlp 128: no row is a whole K-quant super-block
    plan = Plan({L + "0.mlp.down_proj": GGMLSpec.parse("q4_k"), L + "1.self_attn.v_proj": GGMLSpec.parse("q6_k"),
                 L + "1.mlp.up_proj": GGMLSpec.parse("q8_0"), L + "0.self_attn.o_proj": GGMLSpec.parse("iq4_xs")})
    with pytest.raises(ExportError) as err:
        write_gguf(model, plan, tmp_path / "m.gguf")
    text = str(err.value)
    assert "3 problem(s)" in text and "--nearest" in text
    assert f"{L}0.mlp.down_proj q4_k: its 128 inputs are not a multiple of 256, the Q4_K block; nearest: q4_0" in text
    assert f"{L}1.self_attn.v_proj q6_k: its 64 inputs are not a multiple of 256, the Q6_K block; nearest: q8_0" in text
    assert f"{L}0.self_attn.o_proj iq4_xs: its 64 inputs are not a multiple of 256, the IQ4_XS block; nearest: iq4_nl" in text
    assert list(tmp_path.iterdir()) == []
    nearest = nearest_plan("gguf", plan, layer_shapes(model))
    assert {n: s.label for n, s in nearest.specs.items()} == {
        L + "0.mlp.down_proj": "q4_0", L + "1.self_attn.v_proj": "q8_0", L + "1.mlp.up_proj": "q8_0",
        L + "0.self_attn.o_proj": "iq4_nl"}  # the same levels at the next size
    write_gguf(model, nearest, tmp_path / "m.gguf")
    assert read_tensors(tmp_path / "m.gguf")["blk.0.ffn_down.weight"][0] == Q.Q4_0


def test_affine_plans_below_4_bits_move_to_the_k_quant_of_their_bits_where_rows_allow(tokenizer):
    model = wide_llama(len(tokenizer))  # rows of 256 (attention, gate/up) and 512 (down)
    plan = Plan({L + "0.self_attn.q_proj": QuantSpec.parse("w3g128"), L + "0.mlp.down_proj": QuantSpec.parse("w2g64"),
                 L + "1.mlp.up_proj": QuantSpec.parse("w6pc"), L + "1.mlp.gate_proj": QuantSpec.parse("w4g128")})
    nearest = nearest_plan("gguf", plan, layer_shapes(model))
    assert {n: s.label for n, s in nearest.specs.items()} == {
        L + "0.self_attn.q_proj": "q3_k", L + "0.mlp.down_proj": "q2_k", L + "1.mlp.up_proj": "q6_k",
        L + "1.mlp.gate_proj": "w4g128"}  # storable as it is (Q4_1 blocks): unchanged
    narrow = nearest_plan("gguf", Plan({L + "0.mlp.down_proj": QuantSpec.parse("w3g128")}), layer_shapes(tiny_llama()))
    assert narrow.specs[L + "0.mlp.down_proj"].label == "w4g128"  # a 128-wide row has no K-quant: bits rounded up


@pytest.mark.parametrize("fmt", ["gptq", "compressed"])  # native stores ggml types (tests/export/test_native_ggml.py)
def test_other_formats_refuse_ggml_types_and_offer_the_affine_spec_of_their_bits(fmt):
    shapes = layer_shapes(wide_llama(256))
    found = expressible(fmt, Plan({L + "0.mlp.down_proj": GGMLSpec.parse("q4_k")}), shapes)
    assert len(found) == 1 and f"{fmt} has no ggml type Q4_K" in found[0].reason
    assert found[0].nearest.label == "w4g32"


def test_llama_cpp_runs_the_mixed_file(written, tokenizer):
    """llama.cpp itself (llama-cpp-python, optional): logits close to the in-memory model."""
    llama_cpp = pytest.importorskip("llama_cpp")
    model, plan, path, gptq = written
    llm = llama_cpp.Llama(str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=1)
    text = "The city of music and film was the first new school."
    ids = tokenizer(text).input_ids
    llm.eval(ids)
    got = torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))
    with torch.no_grad():
        want = expected_model(model, plan, {n: r.params for n, r in gptq.items()})(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(got, want, rtol=0, atol=2e-2)  # llama.cpp rounds activations to 8 bits


@pytest.mark.parametrize("name, preset", [("Q2_K", "Q2_K"), ("Q3_K", "Q3_K_S"), ("Q4_K", "Q4_K_S"), ("Q5_K", "Q5_K_S"),
                                          ("Q6_K", "Q6_K"), ("Q4_0", "Q4_0"), ("Q8_0", "Q8_0"), ("IQ4_XS", "IQ4_XS"),
                                          ("IQ4_NL", "IQ4_NL")])
def test_k_quants_have_lower_weight_error_than_llama_cpp_quantizer(tmp_path, name, preset):
    """llama.cpp's own quantizer (llama_model_quantize, no imatrix) on an F16 export of the same
    heavy-tailed weights: mixbits' grid search gives a lower squared error, tensor type by tensor type."""
    import ctypes

    llama_cpp = pytest.importorskip("llama_cpp")
    model = wide_llama(256, seed=3)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, w in model.named_parameters():
            if w.dim() == 2 and "layers" in n:  # Student-t(4): heavier tails than Gaussian, as trained weights have
                chi2 = torch.randn(*w.shape, 4, generator=gen).square().sum(-1)
                w.copy_(torch.randn(w.shape, generator=gen) / torch.sqrt(chi2 / 4.0) * 0.02)
    write_gguf(model, Plan({}), tmp_path / "f16.gguf")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{preset}"), 1
    rc = llama_cpp.llama_model_quantize(str(tmp_path / "f16.gguf").encode(), str(tmp_path / "q.gguf").encode(),
                                        ctypes.byref(params))
    assert rc == 0
    original = read_tensors(tmp_path / "f16.gguf")
    theirs = ours = total = 0.0
    for key, (kind, _, w_llama) in read_tensors(tmp_path / "q.gguf").items():
        if kind == Q[name] and key.startswith("blk."):
            w = original[key][2]
            theirs += float(((w - w_llama) ** 2).sum())
            ours += float(((w - kquant.fake_quantize(w, GGMLSpec.parse(name))) ** 2).sum())
            total += float((w**2).sum())
    assert total > 0 and ours < 0.97 * theirs, (ours / total, theirs / total)


def test_iq4_nl_layers_are_written_as_iq4_nl_and_read_back_exactly(tmp_path, tokenizer):
    """IQ4_NL (Q4_0's bytes, non-uniform levels): gguf's own decoder reads mixbits' weights, q/k rows included."""
    model = wide_llama(len(tokenizer))
    plan = Plan({L + "0.self_attn.q_proj": GGMLSpec.parse("iq4_nl"), L + "0.mlp.down_proj": GGMLSpec.parse("IQ4_NL"),
                 L + "1.mlp.up_proj": GGMLSpec.parse("q4_k")})
    path = write_gguf(model, plan, tmp_path / "m.gguf", tokenizer=tokenizer)
    tensors, expected = read_tensors(path), expected_model(model, plan)
    for name, spec in plan.specs.items():
        kind, nbytes, got = tensors[gguf_name(name)]
        assert kind == Q[spec.name] and torch.equal(got, expected.get_submodule(name).weight.detach()), name
        assert nbytes == layer_storage_bytes(*got.shape, spec), name
