"""The streamed quantizer on ggml grids (K-quants and legacy types beside an affine layer) against the
whole-model reference: the same weights and grids bit for bit with rtn, clip and gptq, the same
evaluation, and a native folder written block by block (NativeWriter) whose shards equal those of
`save_native` of the whole-model result; a run killed after its first block resumes to the same shards."""

import hashlib

import pytest
import torch

from mixbits.export.native import save_native
from mixbits.export.native_shards import NativeWriter
from mixbits.model.arch import find_linears, get_weight
from mixbits.model.lazy import open_checkpoint
from mixbits.model.quantize_streamed import dequantized_block
from mixbits.model.stream import LoadedModel
from mixbits.plan import Plan
from mixbits.quant.kquant import GGMLParams
from mixbits.quant.spec import GGMLSpec, QuantSpec
from tests.export.test_gguf_kquant import wide_llama
from tests.model.test_quantize_streamed import CPU, Killed, assert_same_evaluation, streamed, tokens, whole_model

SPECS = ("q4_k", "q2_k", "q6_k", "q3_k", "q5_k", "q8_0", "q4_1", "w4g64", "fp16", "q5_0", "q5_1", "q4_0")


def ggml_plan(model) -> Plan:
    return Plan({name: GGMLSpec.parse(SPECS[i % len(SPECS)]) if SPECS[i % len(SPECS)].startswith("q")
                 else QuantSpec.parse(SPECS[i % len(SPECS)]) for i, name in enumerate(find_linears(model))})


def shard_hashes(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.safetensors"))}


def writer(folder, plan, model, resume=False):
    return NativeWriter(folder, plan, model.config, n_blocks=model.config.num_hidden_layers,
                        block_path="model.layers", resume=resume)


@pytest.mark.parametrize("quantizer", ["rtn", "clip", "gptq"])
def test_streamed_ggml_layers_equal_the_whole_model_path(quantizer, tmp_path):
    model = wide_llama(256)
    plan, calib, test = ggml_plan(model), tokens(3, seed=1), tokens(2, seed=2)
    windows = None if quantizer == "rtn" else calib
    q_model, report, evals = whole_model(model, plan, quantizer, windows, test)
    sink = writer(tmp_path / "streamed", plan, model)
    _, result = streamed(LoadedModel(model, CPU), plan, quantizer, windows, test, sink=sink)
    sink.finish()
    assert_same_evaluation(result.evaluation, evals["v"])
    linears = find_linears(model)
    for i in range(model.config.num_hidden_layers):
        names = {n: s for n, s in plan.quantized().items() if linears[n].block == i}
        for name, (weight, params) in dequantized_block(sink.read_block(i), names, linears).items():
            assert torch.equal(weight, get_weight(q_model.get_submodule(name)).float()), name
            if isinstance(params, GGMLParams):
                want = report.qparams[name]
                assert all(torch.equal(getattr(params, f), getattr(want, f)) for f in ("d", "dmin", "sc", "mn")), name
                assert isinstance(result.report.qparams[name], GGMLParams)
    save_native(q_model, plan, tmp_path / "whole", qparams=report.qparams)
    assert shard_hashes(tmp_path / "streamed") == shard_hashes(tmp_path / "whole")


def test_a_killed_ggml_run_resumes_to_the_same_shards(tmp_path):
    model = wide_llama(256)
    model.save_pretrained(tmp_path / "ckpt")
    plan, calib, test = ggml_plan(model), tokens(3, seed=1), tokens(2, seed=2)
    full = writer(tmp_path / "full", plan, model)
    _, first = streamed(open_checkpoint(tmp_path / "ckpt"), plan, "gptq", calib, test, sink=full)

    def kill(i):
        if i == 0:
            raise Killed

    again = writer(tmp_path / "again", plan, model)
    with pytest.raises(Killed):
        streamed(open_checkpoint(tmp_path / "ckpt"), plan, "gptq", calib, test, sink=again, after_block=kill)
    again = writer(tmp_path / "again", plan, model, resume=True)
    _, resumed = streamed(open_checkpoint(tmp_path / "ckpt"), plan, "gptq", calib, test, sink=again)
    assert resumed.resumed == (0,)
    assert resumed.evaluation.kl == first.evaluation.kl
    assert shard_hashes(tmp_path / "again") == shard_hashes(tmp_path / "full")
