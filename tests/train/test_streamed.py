"""Block-AP streamed from a lazy checkpoint against `train_model` on the loaded model."""

import hashlib

import pytest
import torch

from mixbits.config import TrainConfig
from mixbits.export.native import save_native
from mixbits.export.native_shards import NativeWriter, block_file
from mixbits.model.arch import find_linears, get_weight
from mixbits.model.lazy import open_checkpoint
from mixbits.model.quantize_streamed import dequantized_block
from mixbits.train.checkpoint import BlockCheckpoint
from mixbits.train.run import train_model
from mixbits.train.streamed import finish_streamed, train_fingerprint, train_streamed
from tests.conftest import tiny_llama
from tests.train.test_run import CFG, mixed_plan, windows

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: exact sums

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny Llama (two blocks) saved as safetensors in several shards, its plan and its windows."""
    model = tiny_llama()
    folder = tmp_path_factory.mktemp("ckpt")
    model.save_pretrained(folder, max_shard_size="100KB")
    assert len(list(folder.glob("*.safetensors"))) > 1
    return model, folder, mixed_plan(model), windows(8, 1), windows(4, 2)


def streamed(folder, plan, calib, val, cfg, out, *, sensitivity=None, resume=False, on_block_done=None, device="cpu"):
    """train_streamed on `device` into a NativeWriter at `out` with its checkpoint at out.parent/checkpoint;
    (source, writer, report)."""
    source = open_checkpoint(folder, device=device, compute_dtype=torch.float32)
    fingerprint = train_fingerprint(source, plan, calib, val, cfg, model="tiny", sensitivity=sensitivity)
    writer = NativeWriter(out, plan, source.model.config, n_blocks=source.n_blocks, block_path=source.block_path,
                          resume=resume, provenance=fingerprint)
    ckpt = BlockCheckpoint(out.parent / "checkpoint", fingerprint, resume=resume)
    report = train_streamed(source, plan, calib, val, cfg, sink=writer, checkpoint=ckpt, sensitivity=sensitivity,
                            progress=False, on_block_done=on_block_done)
    return source, writer, report


def sha256(folder):
    """Every file the native folder holds but the manifest (which records times), by name."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.is_file() and not p.name.startswith(".mixbits")}


@pytest.mark.parametrize("init", ["rtn", "clip", "gptq"])
def test_same_trained_weights_and_shards_as_train_model(saved, init, tmp_path):
    model, folder, plan, calib, val = saved
    # learning rates at which training beats the start of both blocks for every init (a GPTQ start is the
    # hardest to beat): the weights compared are trained ones, and block 1's clip / gptq init is
    # calibrated on the outputs of a block 0 whose init and trained weights differ
    cfg = TrainConfig(**{**CFG.to_dict(), "init": init, "schedule": "sqrt", "quant_lr": 1e-5, "weight_lr": 1e-4})
    sens = {0: 0.3, 1: 1.2}
    whole, report = train_model(model, plan, calib, val, cfg, device=CPU, sensitivity=sens, progress=False)
    _, writer, got = streamed(folder, plan, calib, val, cfg, tmp_path / "model", sensitivity=sens)
    # Exact, not within a tolerance: the same float32 operations on the same inputs in the same order
    # (one thread), so every trained weight, scale and zero-point is bit for bit train_model's.
    linears, changed = find_linears(model), 0
    for i in range(model.config.num_hidden_layers):
        specs = {n: s for n, s in plan.quantized().items() if linears[n].block == i}
        for name, (weight, qp) in dequantized_block(writer.read_block(i), specs, linears).items():
            assert torch.equal(weight, get_weight(whole.get_submodule(name))), name
            assert torch.equal(qp.scale, report.qparams[name].scale) and torch.equal(qp.zero, report.qparams[name].zero)
            assert torch.equal(got.qparams[name].scale, report.qparams[name].scale), name
            changed += not torch.equal(weight, get_weight(model.get_submodule(name)))
    assert changed == len(plan.quantized())
    assert [s.to_dict() | {"seconds": 0} for s in got.blocks] == [s.to_dict() | {"seconds": 0} for s in report.blocks]
    assert all(s.best_epoch > 0 for s in got.blocks)  # every block trained: not a comparison of inits
    # the shards the whole-model save writes from train_model's result, byte for byte
    save_native(whole, plan, tmp_path / "whole", qparams=report.qparams)
    for i in range(model.config.num_hidden_layers):
        assert sha256(tmp_path / "model")[block_file(i)] == sha256(tmp_path / "whole")[block_file(i)], i


class Killed(Exception):
    pass


def test_a_run_killed_after_block_0_resumes_to_identical_files(saved, tmp_path):
    model, folder, plan, calib, val = saved
    cfg = TrainConfig(**{**CFG.to_dict(), "init": "gptq"})
    source, writer, report = streamed(folder, plan, calib, val, cfg, tmp_path / "full" / "model")
    finish_streamed(source, plan, writer, progress=False)
    writer.finish()

    def kill(index):
        if index == 0:
            raise Killed

    with pytest.raises(Killed):
        streamed(folder, plan, calib, val, cfg, tmp_path / "again" / "model", on_block_done=kill)
    seen = []
    source, writer, resumed = streamed(folder, plan, calib, val, cfg, tmp_path / "again" / "model", resume=True,
                                       on_block_done=seen.append)
    assert resumed.resumed_blocks == (0,) and seen == [0, 1]
    finish_streamed(source, plan, writer, progress=False)
    writer.finish()
    full, again = sha256(tmp_path / "full" / "model"), sha256(tmp_path / "again" / "model")
    assert again == full and {block_file(0), block_file(1), "config.json", "progress.json"} <= set(full)
    assert [s.loss_end for s in resumed.blocks] == [s.loss_end for s in report.blocks]
    for name, qp in report.qparams.items():
        assert torch.equal(resumed.qparams[name].scale, qp.scale) and torch.equal(resumed.qparams[name].zero, qp.zero)


def test_one_block_is_materialized_at_a_time(saved, tmp_path, materialized):
    model, folder, plan, calib, val = saved
    live, peak = materialized
    cfg = TrainConfig(**{**CFG.to_dict(), "init": "gptq", "epochs": 0.5})
    _, writer, report = streamed(folder, plan, calib, val, cfg, tmp_path / "model")
    assert max(peak) == 1 and not live  # never two blocks, nor a block and the embeddings, at once
    assert len(peak) == 2 + model.config.num_hidden_layers  # capture (original, then rounded) + each block once
    assert writer.done_blocks() == {0, 1} and len(report.blocks) == 2


def test_a_used_checkpoint_is_refused(saved, tmp_path):
    model, folder, plan, calib, val = saved
    cfg = TrainConfig(**{**CFG.to_dict(), "epochs": 0.5})
    streamed(folder, plan, calib, val, cfg, tmp_path / "model")
    with pytest.raises(ValueError, match="config.epochs"):  # another run's blocks are never trusted
        streamed(folder, plan, calib, val, TrainConfig(**{**cfg.to_dict(), "epochs": 1.0}), tmp_path / "model",
                 resume=True)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_close_to_the_cpu(saved, tmp_path):
    """Blocks materialized and trained on the GPU (float32): the same start losses as on the CPU up to
    float32 rounding, every block written, training never worse than its start."""
    model, folder, plan, calib, val = saved
    cfg = TrainConfig(**{**CFG.to_dict(), "init": "gptq"})
    _, _, on_cpu = streamed(folder, plan, calib, val, cfg, tmp_path / "cpu" / "model")
    gpu, writer, on_gpu = streamed(folder, plan, calib, val, cfg, tmp_path / "gpu" / "model", device="cuda")
    assert writer.done_blocks() == set(range(gpu.n_blocks)) and set(on_gpu.qparams) == set(plan.quantized())
    for a, b in zip(on_gpu.blocks, on_cpu.blocks):
        assert a.loss_start == pytest.approx(b.loss_start, rel=1e-3) and a.loss_end <= a.loss_start


@pytest.mark.parametrize("train_size", [4, 16])
def test_the_predicted_training_peak_is_not_below_the_measured_one(train_size, tmp_path):
    """On a 256-wide Llama (the block, not Python's fixed costs, is most of the peak)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from mixbits.model.budget import predict_train
    from mixbits.model.memory import model_shapes
    from tests.model.test_memory import measured_peak

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    model.save_pretrained(tmp_path / "ckpt", max_shard_size="1MB")
    calib, val = windows(train_size, 1), windows(4, 2)
    cfg = TrainConfig(**{**CFG.to_dict(), "train_size": train_size, "val_size": len(val), "seqlen": calib.shape[1]})
    source = open_checkpoint(tmp_path / "ckpt")
    predicted = predict_train(cfg, model_shapes(source.model), device=CPU, checkpoint_dtype=source.checkpoint_dtype,
                              eval_windows=4)
    assert [s.stage for s in predicted.stages] == ["train", "quantize+evaluate"]
    run = lambda: streamed(tmp_path / "ckpt", mixed_plan(model), calib, val, cfg, tmp_path / "out" / "model")  # noqa: E731
    measured, train = measured_peak(run, tmp_path / "ckpt", tmp_path), predicted.stages[0].total
    assert 0.9 * measured <= train <= 2 * measured, (train, measured)
