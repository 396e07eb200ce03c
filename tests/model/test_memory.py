import json

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from mixbits.eval.streamed import Variant, evaluate_streamed
from mixbits.model.arch import find_linears
from mixbits.model.lazy import open_checkpoint
from mixbits.model.memory import model_shapes, predict_evaluation, predict_fisher, predict_gptq
from mixbits.quant.affine import fake_quantize
from mixbits.quant.spec import QuantSpec
from mixbits.sensitivity.fisher_streamed import streamed_fisher_table
from tests.conftest import tiny_gpt2, tiny_llama

SPEC = QuantSpec(4, 32)


def measured_peak(run, folder, tmp_path) -> int:
    """Peak bytes of live CPU tensors allocated while `run` runs, from torch's profiler.

    The profiler books each open shard's memory map as an allocation of the whole file; a map is
    virtual (only the pages read become resident, and they go when the shard closes), so those
    events, recognised by their size, are left out.
    """
    shard_sizes = {p.stat().st_size for p in folder.glob("*.safetensors")}
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    trace = tmp_path / "trace.json"
    prof.export_chrome_trace(str(trace))
    events = sorted((e for e in json.loads(trace.read_text())["traceEvents"] if e.get("name") == "[memory]"),
                    key=lambda e: e["ts"])
    maps, live, peak = set(), 0, 0
    for event in events:
        size, addr = event["args"]["Bytes"], event["args"]["Addr"]
        if size in shard_sizes or (size < 0 and addr in maps):
            (maps.add if size > 0 else maps.discard)(addr)
            continue
        live += size
        peak = max(peak, live)
    return peak


@pytest.fixture(scope="module", params=[tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def checkpoint(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param.__name__)
    request.param().to(torch.bfloat16).save_pretrained(folder, max_shard_size="100KB")  # read as float32
    return folder


@pytest.mark.parametrize("n, seqlen", [(2, 32), (8, 128)])
@pytest.mark.parametrize("offload", [False, True])
def test_fisher_prediction_covers_the_measured_peak(checkpoint, tmp_path, n, seqlen, offload):
    ckpt = open_checkpoint(checkpoint)
    windows = torch.randint(0, 256, (n, seqlen), generator=torch.Generator().manual_seed(0))
    run = lambda: streamed_fisher_table(ckpt, windows, find_linears(ckpt.model), [SPEC], progress=False,
                                        offload_dir=tmp_path / "boundaries" if offload else None)
    measured = measured_peak(run, checkpoint, tmp_path)
    predicted = predict_fisher(model_shapes(ckpt.model), windows=n, seqlen=seqlen, offload=offload)
    assert 0.9 * measured <= predicted.total <= 1.6 * measured, (measured, predicted.describe())


@pytest.mark.parametrize("n, seqlen, topk, batch_size", [(2, 32, None, 1), (8, 128, None, 1), (8, 128, 16, 2)])
def test_evaluation_prediction_covers_the_measured_peak(checkpoint, tmp_path, n, seqlen, topk, batch_size):
    ckpt = open_checkpoint(checkpoint)
    windows = torch.randint(0, 256, (n, seqlen), generator=torch.Generator().manual_seed(0))
    variants = [Variant("original"), Variant("w4g32", lambda name, w: fake_quantize(w, SPEC))]
    run = lambda: evaluate_streamed(ckpt, windows, variants, reference="original", topk=topk, batch_size=batch_size,
                                    progress=False)
    measured = measured_peak(run, checkpoint, tmp_path)
    predicted = predict_evaluation(model_shapes(ckpt.model), windows=n, seqlen=seqlen, topk=topk,
                                   batch_size=batch_size)
    assert 0.9 * measured <= predicted.total <= 1.6 * measured, (measured, predicted.describe())


def test_shapes_of_the_skeleton_equal_those_of_the_loaded_model(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path)
    shapes = model_shapes(open_checkpoint(tmp_path).model)
    assert shapes == model_shapes(model)
    assert shapes.total_params == sum(p.numel() for p in model.parameters())  # tied embeddings once
    assert shapes.n_blocks == 2 and shapes.hidden == 64 and shapes.vocab == 256
    assert shapes.block_linears[0][0] == (64, 64)  # q_proj: (out, in)


def test_predictions_follow_the_settings():
    shapes = model_shapes(tiny_llama())
    kwargs = dict(windows=64, seqlen=256)
    in_memory, on_disk = predict_fisher(shapes, **kwargs), predict_fisher(shapes, offload=True, **kwargs)
    assert on_disk.total < in_memory.total and in_memory.parts["boundaries"] >= 2 * 64 * 256 * 64 * 4
    whole = predict_fisher(shapes, streamed=False, **kwargs)
    assert whole.total - in_memory.total >= 4 * (shapes.total_params - max(shapes.block_params) - shapes.outside_params)
    assert predict_fisher(shapes, dtype=torch.bfloat16, **kwargs).total < in_memory.total
    full, top = predict_evaluation(shapes, **kwargs), predict_evaluation(shapes, topk=8, **kwargs)
    assert full.parts["reference summary"] == 64 * 255 * 256 * 4 and top.parts["reference summary"] == 64 * 255 * 108
    gptq = predict_gptq(shapes, **kwargs)
    assert gptq.phase == "block" and gptq.parts["Hessians"] == 4 * (4 * 64 * 64 + 2 * 64 * 64 + 128 * 128)
    assert "fisher: predicted peak" in in_memory.describe() and in_memory.phase in in_memory.describe()


def test_mmap_threshold_is_fixed_in_a_child_process():
    import subprocess
    import sys

    code = ("import sys; from mixbits.model.memory import fix_mmap_threshold; "
            "sys.exit(0 if fix_mmap_threshold(1 << 20) else 3)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode == 3:
        pytest.skip("not glibc")
    assert done.returncode == 0, done.stderr
    with pytest.raises(ValueError, match="32 MiB"):
        from mixbits.model.memory import fix_mmap_threshold
        fix_mmap_threshold(0)
