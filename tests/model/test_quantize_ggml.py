"""quantize_layer on ggml types: kquant's grids for rtn / clip / gptq, and GGMLParams the GGUF
writer stores as they are (the file decodes to the quantized model's weights exactly)."""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader

from mixbits.export.gguf import gguf_data_bytes, write_gguf
from mixbits.model.quantize import quantize_layer, quantize_model
from mixbits.plan import Plan
from mixbits.quant import kquant
from mixbits.quant.gram import gram
from mixbits.quant.kquant import GGMLParams
from mixbits.quant.spec import GGML_TYPES
from tests.conftest import make_text, make_tokenizer
from tests.export.test_gguf_kquant import L, gguf_name, read_tensors, wide_llama

Q4K, Q3K = GGML_TYPES["Q4_K"], GGML_TYPES["Q3_K"]


def layer(seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(16, 512, generator=g)
    x = torch.randn(1024, 512, generator=g) * (1.5 * torch.randn(512, generator=g)).exp()  # uneven input scales
    return w, gram(x), 1024


def test_rtn_is_kquant_with_uniform_importance():
    w, H, tokens = layer()
    lq, report = quantize_layer(w, Q4K, "rtn", torch.device("cpu"), H=H, tokens=tokens)
    assert isinstance(lq.qparams, GGMLParams) and lq.qparams.spec == Q4K
    assert torch.equal(lq.weight, kquant.fake_quantize(w, Q4K))
    assert torch.equal(lq.weight, kquant.dequantize(kquant.quantize(w, lq.qparams), lq.qparams))
    assert report.spec == "q4_k" and report.error == report.rtn_error > 0


def test_clip_weights_the_grid_by_the_gram_diagonal_and_lowers_output_error():
    w, H, tokens = layer(1)
    lq, report = quantize_layer(w, Q3K, "clip", torch.device("cpu"), H=H, tokens=tokens)
    want = kquant.choose_params(w, Q3K, importance=torch.diagonal(H))
    assert torch.equal(lq.qparams.d, want.d) and torch.equal(lq.qparams.sc, want.sc)
    assert report.error < report.rtn_error


def test_gptq_keeps_the_grid_and_feeds_back_the_error():
    w, H, tokens = layer(2)
    lq, report = quantize_layer(w, Q3K, "gptq", torch.device("cpu"), H=H, tokens=tokens)
    res = kquant.gptq_ggml(w, H, Q3K)
    assert torch.equal(lq.weight, res.weight) and torch.equal(lq.qparams.sc, res.params.sc)
    assert report.error < report.rtn_error


def test_a_type_the_row_cannot_take_is_refused():
    with pytest.raises(ValueError, match="576.*Q4_K.*256"):
        quantize_layer(torch.randn(4, 576), Q4K, "rtn", torch.device("cpu"))


@pytest.mark.parametrize("quantizer", ["clip", "gptq"])
def test_quantize_model_then_gguf_stores_exactly_the_quantized_weights(tmp_path, quantizer):
    tokenizer = make_tokenizer(make_text())
    model = wide_llama(len(tokenizer), seed=3)
    labels = {"0.self_attn.q_proj": "q4_k", "0.self_attn.v_proj": "q3_k", "0.mlp.down_proj": "q2_k",
              "1.mlp.gate_proj": "q5_k", "1.mlp.up_proj": "q6_k", "1.self_attn.o_proj": "q8_0", "1.mlp.down_proj": "q4_1"}
    plan = Plan.from_dict({"layers": {L + n: v for n, v in labels.items()}})
    windows = torch.randint(0, len(tokenizer), (2, 32), generator=torch.Generator().manual_seed(0))
    quantized, report = quantize_model(model, plan, quantizer=quantizer, windows=windows, device="cpu",
                                       progress=False)
    assert all(isinstance(p, GGMLParams) for p in report.qparams.values())
    path = write_gguf(quantized, plan, tmp_path / "m.gguf", tokenizer=tokenizer, qparams=report.qparams)
    tensors = read_tensors(path)
    for name, spec in plan.specs.items():
        kind, _, got = tensors[gguf_name(name)]
        assert kind == Q[spec.name]
        assert torch.equal(got, quantized.get_submodule(name).weight.detach().float()), name
    assert gguf_data_bytes(quantized, plan) == path.stat().st_size - GGUFReader(path).data_offset
