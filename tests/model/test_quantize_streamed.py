"""The streamed quantizer against the whole-model reference (quantize_model + evaluate_models)."""

import hashlib

import pytest
import torch
from safetensors.torch import load_file, save_file

from mixbits.eval.perplexity import evaluate_models
from mixbits.eval.streamed import Scorer, score_reference
from mixbits.model.arch import find_linears, get_weight
from mixbits.model.lazy import open_checkpoint
from mixbits.model.quantize import quantize_model
from mixbits.model.quantize_streamed import dequantized_block, quantize_streamed
from mixbits.model.stream import LoadedModel
from mixbits.plan import Plan
from mixbits.quant.spec import QuantSpec
from tests.conftest import tiny_gpt2, tiny_llama
from tests.model.test_stream import tiny_qwen2

CPU = torch.device("cpu")


class FolderSink:
    """A stand-in for the native writer: one safetensors file per block, written whole."""

    def __init__(self, folder):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.rest = None

    def done_blocks(self):
        return {int(p.stem.split("-")[1]) for p in self.folder.glob("block-*.safetensors")}

    def write_block(self, index, tensors):
        save_file(tensors, str(self.folder / f"block-{index:05d}.safetensors"))

    def read_block(self, index):
        return load_file(str(self.folder / f"block-{index:05d}.safetensors"))

    def write_rest(self, tensors, tied):
        self.rest, self.tied = tensors, tied

    def sha256(self):
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(self.folder.glob("*.safetensors"))}


def tokens(n, seqlen=24, seed=0):
    return torch.randint(0, 256, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def mixed_plan(model):
    """Every config kind on one model: 3-bit g32, 4-bit g64 symmetric, 2-bit g32, and kept layers."""
    specs = [QuantSpec(3, 32), QuantSpec(4, 64, symmetric=True), QuantSpec(2, 32), QuantSpec(16, None)]
    linears = list(find_linears(model))
    return Plan({name: specs[i % len(specs)] for i, name in enumerate(linears)})


def whole_model(model, plan, quantizer, calib, test):
    q_model, report = quantize_model(model, plan, quantizer=quantizer, windows=calib, device=CPU, progress=False)
    evals = evaluate_models({"original": model, "v": q_model}, test, device=CPU, reference="original", progress=False)
    return q_model, report, evals


def streamed(source, plan, quantizer, calib, test, sink=None, after_block=None):
    scorer = Scorer(test, topk=None, device=source.device)
    original = score_reference(source, scorer, progress=False)
    result = quantize_streamed(source, plan, quantizer=quantizer, windows=calib, scorer=scorer, sink=sink,
                               after_block=after_block, progress=False)
    return original, result


def assert_same_evaluation(got, want):
    for field in ("ppl", "kl", "top1"):
        assert getattr(got, field) == pytest.approx(getattr(want, field), rel=1e-4, abs=1e-9), field


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2, tiny_qwen2])  # Qwen2: biases on q/k/v
@pytest.mark.parametrize("quantizer", ["rtn", "clip", "gptq"])
def test_same_weights_and_numbers_as_the_whole_model_path(build, quantizer, tmp_path):
    model = build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan, calib, test = mixed_plan(model), tokens(4, seed=1), tokens(3, seed=2)
    windows = None if quantizer == "rtn" else calib
    q_model, report, evals = whole_model(model, plan, quantizer, windows, test)
    sink = FolderSink(tmp_path / "blocks")
    original, result = streamed(LoadedModel(model, CPU), plan, quantizer, windows, test, sink=sink)
    assert_same_evaluation(original, evals["original"])
    assert_same_evaluation(result.evaluation, evals["v"])
    assert result.evaluation.kl > 1e-4
    linears = find_linears(model)
    for i in range(model.config.num_hidden_layers):
        names = {n: s for n, s in plan.quantized().items() if linears[n].block == i}
        stored = dequantized_block(sink.read_block(i), names, linears)
        for name, (weight, qp) in stored.items():
            # GPTQ runs the same float32 operations on the same inputs in both paths: exact as well
            assert torch.equal(weight, get_weight(q_model.get_submodule(name)).float()), name
            assert torch.equal(qp.scale, report.qparams[name].scale) and torch.equal(qp.zero, report.qparams[name].zero)
    assert set(result.report.layers) == set(plan.quantized())
    for name, layer in result.report.layers.items():
        assert layer.error == report.layers[name].error and layer.rtn_error == report.layers[name].rtn_error
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the model is left as it was
    embeddings = "transformer.wte.weight" if build is tiny_gpt2 else "model.embed_tokens.weight"
    tied = {"lm_head.weight": embeddings} if model.config.tie_word_embeddings else {}
    assert sink.tied == tied  # a tied head is left out, named
    assert set(sink.rest) | set(tied) == {k for k in before if ".h." not in k and ".layers." not in k}
    if build is tiny_qwen2:  # biases of quantized layers are stored with them, in fp16
        q_proj = next(n for n, s in plan.quantized().items() if n.endswith("q_proj"))
        block = sink.read_block(linears[q_proj].block)
        assert torch.equal(block[f"{q_proj}.bias"], model.get_submodule(q_proj).bias.half())


@pytest.mark.parametrize("quantizer", ["rtn", "gptq"])
def test_lazy_checkpoint_gives_the_same_numbers(quantizer, tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path / "ckpt", max_shard_size="100KB")
    plan, calib, test = mixed_plan(model), tokens(4, seed=1), tokens(3, seed=2)
    windows = None if quantizer == "rtn" else calib
    _, _, evals = whole_model(model, plan, quantizer, windows, test)
    original, result = streamed(open_checkpoint(tmp_path / "ckpt"), plan, quantizer, windows, test)
    assert_same_evaluation(original, evals["original"])
    assert_same_evaluation(result.evaluation, evals["v"])


class Killed(Exception):
    pass


def test_a_run_killed_midway_resumes_to_the_same_shards(tmp_path):
    model = tiny_llama()  # two blocks: killed after the first
    model.save_pretrained(tmp_path / "ckpt")
    plan, calib, test = mixed_plan(model), tokens(4, seed=1), tokens(3, seed=2)
    full = FolderSink(tmp_path / "full")
    _, uninterrupted = streamed(open_checkpoint(tmp_path / "ckpt"), plan, "gptq", calib, test, sink=full)

    def kill_after_first(i):
        if i == 0:
            raise Killed

    again = FolderSink(tmp_path / "again")
    with pytest.raises(Killed):
        streamed(open_checkpoint(tmp_path / "ckpt"), plan, "gptq", calib, test, sink=again,
                 after_block=kill_after_first)
    assert again.done_blocks() == {0}
    seen = []
    _, resumed = streamed(open_checkpoint(tmp_path / "ckpt"), plan, "gptq", calib, test, sink=again,
                          after_block=seen.append)
    assert resumed.resumed == (0,) and seen == list(range(len(seen)))
    assert again.sha256() == full.sha256() and len(full.sha256()) == len(seen)
    assert resumed.evaluation.ppl == uninterrupted.evaluation.ppl
    assert resumed.evaluation.kl == uninterrupted.evaluation.kl
    assert torch.equal(resumed.report.qparams["model.layers.0.self_attn.q_proj"].scale,
                       uninterrupted.report.qparams["model.layers.0.self_attn.q_proj"].scale)


def test_one_block_is_materialized_at_a_time(tmp_path, materialized):
    model = tiny_llama()
    model.save_pretrained(tmp_path / "ckpt")
    live, peak = materialized
    plan = mixed_plan(model)
    _, result = streamed(open_checkpoint(tmp_path / "ckpt"), plan, "gptq", tokens(2, seed=1), tokens(2, seed=2))
    assert max(peak) == 1 and not live  # never two pieces (two blocks, or a block and the embeddings) at once
    assert len(peak) == 2 * (2 + 2)  # two passes (reference, variant), each: 2 blocks + capture + head
    assert result.evaluation.kl > 0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_from_a_bfloat16_checkpoint(tmp_path):
    """Blocks computed on the GPU in the checkpoint's dtype (bf16; Gram matrices and losses in float32):
    close to the CPU float32 numbers, and the same codes' shapes."""
    model = tiny_llama().to(torch.bfloat16)
    model.save_pretrained(tmp_path / "ckpt")
    plan, calib, test = mixed_plan(model), tokens(4, seed=1), tokens(3, seed=2)
    _, on_cpu = streamed(open_checkpoint(tmp_path / "ckpt"), plan, "gptq", calib, test)
    gpu = open_checkpoint(tmp_path / "ckpt", device="cuda")
    assert gpu.compute_dtype == torch.bfloat16
    _, on_gpu = streamed(gpu, plan, "gptq", calib, test, sink=FolderSink(tmp_path / "blocks"))
    assert on_gpu.evaluation.ppl == pytest.approx(on_cpu.evaluation.ppl, rel=5e-2)
    assert 0 < on_gpu.evaluation.kl < 10 * on_cpu.evaluation.kl + 1e-3
    assert set(on_gpu.report.qparams) == set(plan.quantized())
