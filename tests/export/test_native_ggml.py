"""The native folder stores layers planned as ggml types as their GGUF blocks: a round trip is exact
(the loaded layer's codes and grid are the quantizer's, its weight is the quantizer's bit for bit),
the blocks decode back to what `encode` packed for every type, and a GGUF file written from the
folder is byte-identical to the one written from the in-memory model (no re-quantization, no layer
moved). Formats without ggml types refuse such a folder, naming its layers."""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType as Q

from mixbits.export.formats import export
from mixbits.export.from_native import stored_source
from mixbits.export.gguf import write_gguf, write_gguf_from
from mixbits.export.native import load_native, native_size_bytes, save_native
from mixbits.export.rules import ExportError
from mixbits.export.streamed import export_stored
from mixbits.model.quantize import quantize_model
from mixbits.quant import ggml_packing, kquant
from mixbits.quant.ggml_linear import GGMLLinear
from mixbits.quant.spec import GGML_TYPES
from tests.conftest import make_text, make_tokenizer
from tests.export.test_gguf_kquant import gguf_name, mixed_plan, read_tensors, wide_llama


@pytest.mark.parametrize("name", list(GGML_TYPES))
def test_blocks_decode_to_the_codes_and_grid_that_were_packed(name):
    spec = GGML_TYPES[name]
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 512, generator=g) * torch.rand(512, generator=g) * 3
    params = kquant.choose_params(w, spec, importance=torch.rand(512, generator=g))
    codes = kquant.quantize(w, params)
    blocks = ggml_packing.encode(codes, params)
    back, got = ggml_packing.decode(blocks, spec)
    assert torch.equal(back, codes)
    for field in ("d", "dmin", "sc", "mn"):
        assert torch.equal(getattr(got, field), getattr(params, field)), field
    # random bytes with finite fp16 super scales read and re-pack to the same bytes (the layout is dense)
    raw = torch.randint(0, 256, blocks.shape, dtype=torch.uint8, generator=g)
    q, p = ggml_packing.decode(raw, spec)
    if torch.isfinite(p.d).all() and torch.isfinite(p.dmin).all():
        assert torch.equal(ggml_packing.encode(q, p), raw)


@pytest.fixture(scope="module")
def quantized():
    tokenizer = make_tokenizer(make_text())
    model = wide_llama(len(tokenizer))
    plan = mixed_plan()
    windows = torch.randint(0, len(tokenizer), (2, 32), generator=torch.Generator().manual_seed(0))
    q_model, report = quantize_model(model, plan, quantizer="gptq", windows=windows, device="cpu", progress=False)
    return q_model, plan, report, tokenizer


def test_native_round_trip_of_ggml_layers_is_exact(quantized, tmp_path):
    q_model, plan, report, tokenizer = quantized
    size = save_native(q_model, plan, tmp_path / "m", tokenizer, qparams=report.qparams)
    assert size == native_size_bytes(q_model, plan)  # sizes from shapes hold for ggml layers too
    loaded = load_native(tmp_path / "m")
    for name, spec in plan.quantized().items():
        layer = loaded.get_submodule(name)
        want = q_model.get_submodule(name).weight.detach().float()
        assert torch.equal(layer.dequantized_weight(), want), name  # the quantizer's weight, bit for bit
        if name in report.qparams and hasattr(spec, "type_size"):
            assert isinstance(layer, GGMLLinear)
            assert layer.qweight.shape == (want.shape[0], want.shape[1] // spec.block * spec.type_size)
            params = layer.qparams()
            for field in ("d", "dmin", "sc", "mn"):
                assert torch.equal(getattr(params, field), getattr(report.qparams[name], field)), (name, field)
    x = torch.randint(0, len(tokenizer), (1, 16))
    with torch.no_grad():
        assert torch.allclose(loaded(x).logits, q_model(x).logits, atol=1e-4)


def test_gguf_from_the_folder_equals_gguf_from_the_model(quantized, tmp_path):
    q_model, plan, report, tokenizer = quantized
    save_native(q_model, plan, tmp_path / "m", tokenizer, qparams=report.qparams)
    direct = write_gguf(q_model, plan, tmp_path / "direct" / "model.gguf", tokenizer, qparams=report.qparams)
    folder = write_gguf_from(stored_source(tmp_path / "m"), tmp_path / "folder" / "model.gguf")
    assert folder.read_bytes() == direct.read_bytes()
    tensors = read_tensors(folder)
    loaded = load_native(tmp_path / "m")
    for name, spec in plan.quantized().items():
        kind, _, w = tensors[gguf_name(name)]
        if hasattr(spec, "type_size"):
            assert kind == Q[spec.name], name  # no layer moved
            assert torch.equal(w, loaded.get_submodule(name).dequantized_weight()), name


def test_formats_without_ggml_types_refuse_the_folder_naming_its_layers(quantized, tmp_path):
    q_model, plan, report, tokenizer = quantized
    save_native(q_model, plan, tmp_path / "m", tokenizer, qparams=report.qparams)
    with pytest.raises(ExportError, match=r"(?s)q2_k.*has no ggml type Q2_K.*nearest"):
        export_stored(stored_source(tmp_path / "m"), tmp_path / "gptq", "gptq")
    assert not (tmp_path / "gptq").exists()
    export(q_model, plan, tmp_path / "again", "native", tokenizer, report.qparams)  # native stores them
    assert torch.equal(load_native(tmp_path / "again").get_submodule("model.layers.0.self_attn.q_proj").qweight,
                       load_native(tmp_path / "m").get_submodule("model.layers.0.self_attn.q_proj").qweight)
