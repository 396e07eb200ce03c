"""E2E-QP streamed block by block against `train_model`'s whole-model E2E-QP."""

import json

import pytest
import torch
from typer.testing import CliRunner

from mixbits.cli import app
from mixbits.config import TrainConfig
from mixbits.errors import UserError
from mixbits.export.native import load_native, save_native
from mixbits.export.native_shards import block_file
from mixbits.jobs.train import train_command
from mixbits.model.arch import find_linears
from mixbits.model.load import load_model
from mixbits.plan import Plan
from mixbits.quant.spec import QuantSpec
from mixbits.train import e2e_streamed as module
from mixbits.train.e2e_streamed import E2E_FILE, train_e2e_streamed
from mixbits.train.checkpoint import BlockCheckpoint
from mixbits.train.run import train_model
from mixbits.train.streamed import finish_streamed, train_fingerprint
from tests.conftest import tiny_gpt2
from tests.train.test_run import CFG, mixed_plan, windows

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: exact sums
from tests.train.test_streamed import Killed, sha256, streamed
from tests.train.test_streamed import saved as sharded  # noqa: F401  (a fixture)

CPU = torch.device("cpu")
# Block-AP short, E2E-QP with an lr at which the step sizes move and validation improves
E2E = TrainConfig(**{**CFG.to_dict(), "epochs": 0.5, "e2e": True, "e2e_epochs": 2.0, "e2e_lr": 1e-3,
                     "e2e_batch_size": 2})


@pytest.fixture(scope="module")
def saved(sharded):
    """test_streamed's tiny Llama in several shards, its plan and its training windows; validation on
    training windows: random tokens teach nothing that carries to other random windows, and the
    comparisons must be of trained scales (best epoch > 0), not of the start kept."""
    model, folder, plan, calib, _ = sharded
    return model, folder, plan, calib, calib[:3]


def e2e_streamed(folder, plan, calib, val, cfg, out, *, resume=False, after_block=None, block_ap=None, device="cpu"):
    """Streamed Block-AP then streamed E2E-QP on `device` into a NativeWriter at `out`; (source, writer,
    report). block_ap: a list that receives Block-AP's report."""
    source, writer, report = streamed(folder, plan, calib, val, cfg, out, resume=resume, device=device)
    if block_ap is not None:
        block_ap.append(report)
    ckpt = BlockCheckpoint(out.parent / "checkpoint", train_fingerprint(source, plan, calib, val, cfg, model="tiny"),
                           resume=True)
    report = train_e2e_streamed(source, plan, calib, val, cfg, sink=writer, report=report, checkpoint=ckpt,
                                progress=False, after_block=after_block)
    return source, writer, report


def finished(source, plan, writer):
    finish_streamed(source, plan, writer, progress=False)
    writer.finish()
    return sha256(writer.out_dir)


def test_same_scales_and_shards_as_the_whole_model_e2e(saved, tmp_path):
    model, folder, plan, calib, val = saved
    whole, want = train_model(model, plan, calib, val, E2E, device=CPU, progress=False)
    block_ap = []
    source, writer, got = e2e_streamed(folder, plan, calib, val, E2E, tmp_path / "s" / "model", block_ap=block_ap)
    assert want.e2e["best_epoch"] > 0 and want.e2e["loss_end"] < want.e2e["loss_start"]  # E2E moved the scales
    # Exact: the same float32 operations on the same values in the same order (one thread); the
    # backward runs block by block, and each block's gradient is the whole graph's for that block
    assert {k: v for k, v in got.e2e.items() if k != "seconds"} == {k: v for k, v in want.e2e.items()
                                                                   if k != "seconds"}
    moved = 0
    for name, qp in want.qparams.items():
        assert torch.equal(got.qparams[name].scale, qp.scale), name
        assert torch.equal(got.qparams[name].zero, qp.zero), name
        moved += not torch.equal(qp.scale, block_ap[0].qparams[name].scale)
    assert moved > 0  # not Block-AP's scales
    files = finished(source, plan, writer)
    save_native(whole, plan, tmp_path / "whole", qparams=want.qparams)
    reference = sha256(tmp_path / "whole")
    for i in range(model.config.num_hidden_layers):  # codes and scales: the whole-model export's bytes
        assert files[block_file(i)] == reference[block_file(i)], i
    assert load_native(tmp_path / "s" / "model") is not None


def test_one_block_is_materialized_at_a_time(saved, tmp_path, materialized):
    model, folder, plan, calib, val = saved
    live, peak = materialized
    cfg = TrainConfig(**{**E2E.to_dict(), "e2e_epochs": 1.0})
    _, writer, report = e2e_streamed(folder, plan, calib, val, cfg, tmp_path / "model")
    assert max(peak) == 1 and not live  # never two blocks, nor a block and the embeddings, at once
    steps, blocks = report.e2e["steps"], model.config.num_hidden_layers
    # per step: capture, L blocks forward, the head, L blocks backward; per validation: capture, L, head
    e2e = steps * (2 + 2 * blocks) + len(report.e2e["val_history"]) * (2 + blocks)
    # Block-AP's capture (original, rounded) and blocks, then the rest written before E2E-QP (one more)
    assert len(peak) == 2 + blocks + 1 + e2e and writer.done_blocks() == set(range(blocks))


def test_a_run_killed_in_the_rewrite_leaves_a_loadable_folder_and_resumes(saved, tmp_path, monkeypatch):
    model, folder, plan, calib, val = saved
    cfg = TrainConfig(**{**E2E.to_dict(), "e2e_epochs": 1.0})
    source, writer, report = e2e_streamed(folder, plan, calib, val, cfg, tmp_path / "full" / "model")
    full = finished(source, plan, writer)

    def kill(index):
        if index == 0:
            raise Killed

    out = tmp_path / "again" / "model"
    with pytest.raises(Killed):  # after block 0's shard holds the new scales, before block 1's
        e2e_streamed(folder, plan, calib, val, cfg, out, after_block=kill)
    assert (out.parent / "checkpoint" / E2E_FILE).is_file()
    assert sha256(out)[block_file(0)] == full[block_file(0)] and sha256(out)[block_file(1)] != full[block_file(1)]
    load_native(out)  # complete before E2E-QP started: every moment after, it loads
    with pytest.raises(UserError, match="e2e_lr"):  # its scales may be in the shards: other settings are refused
        e2e_streamed(folder, plan, calib, val, TrainConfig(**{**cfg.to_dict(), "e2e_lr": 2e-3}), out, resume=True)
    monkeypatch.setattr(module, "_train", lambda *a, **k: pytest.fail("the saved scales are trained again"))
    source, writer, resumed = e2e_streamed(folder, plan, calib, val, cfg, out, resume=True)
    assert finished(source, plan, writer) == full
    assert {k: v for k, v in resumed.e2e.items() if k != "seconds"} == {k: v for k, v in report.e2e.items()
                                                                       if k != "seconds"}


def test_a_run_killed_while_training_starts_e2e_again_from_block_ap(saved, tmp_path, monkeypatch):
    model, folder, plan, calib, val = saved
    cfg = TrainConfig(**{**E2E.to_dict(), "e2e_epochs": 1.0})
    source, writer, report = e2e_streamed(folder, plan, calib, val, cfg, tmp_path / "full" / "model")
    full = finished(source, plan, writer)
    steps = []
    real = module._Trainer.step

    def dying(self, opt, ids):
        steps.append(1)
        if len(steps) == 2:
            raise Killed
        return real(self, opt, ids)

    monkeypatch.setattr(module._Trainer, "step", dying)
    out = tmp_path / "again" / "model"
    with pytest.raises(Killed):
        e2e_streamed(folder, plan, calib, val, cfg, out)
    monkeypatch.setattr(module._Trainer, "step", real)
    assert not (out.parent / "checkpoint" / E2E_FILE).exists()
    load_native(out)  # the Block-AP model, untouched by the killed E2E-QP
    source, writer, resumed = e2e_streamed(folder, plan, calib, val, cfg, out, resume=True)
    assert finished(source, plan, writer) == full
    assert {k: v for k, v in resumed.e2e.items() if k != "seconds"} == {k: v for k, v in report.e2e.items()
                                                                       if k != "seconds"}
    assert json.loads((out / "progress.json").read_text())["shards"].keys() >= {block_file(0), block_file(1)}


def test_mixbits_train_e2e_streams_a_local_folder(tiny_model_dir, tiny_text_file, tmp_path, monkeypatch):
    """`mixbits train --e2e` on a local safetensors folder takes the streamed path (train_report.json says
    so) and writes the shards the whole-model path (stream=False) writes, byte for byte."""
    monkeypatch.setattr("mixbits.model.memory.fix_mmap_threshold", lambda nbytes: True)  # not this test process's
    model, _ = load_model(str(tiny_model_dir))
    Plan.uniform(find_linears(model), QuantSpec(3, 32)).save(tmp_path / "plan.json")
    flags = {"dataset": str(tiny_text_file), "train_size": 4, "val_size": 2, "seqlen": 32, "epochs": 0.5,
             "e2e_epochs": 1.0, "e2e_lr": 1e-3}
    args = ["train", str(tmp_path / "plan.json"), "--model", str(tiny_model_dir), "--output-dir", str(tmp_path / "cli"),
            "--e2e", "--device", "cpu", "--eval-windows", "2", "--no-verbose"]
    args += [x for k, v in flags.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "cli" / "train_report.json").read_text())
    assert report["streamed"] is True and report["training"]["e2e"]["steps"] == 2
    whole = train_command(model=str(tiny_model_dir), plan=tmp_path / "plan.json", output_dir=tmp_path / "whole",
                          cfg=TrainConfig(**flags, e2e=True), device="cpu", eval_windows=2, progress=False,
                          stream=False)
    assert whole["streamed"] is False
    assert {k: v for k, v in whole["training"]["e2e"].items() if k != "seconds"} == {
        k: v for k, v in report["training"]["e2e"].items() if k != "seconds"}
    a, b = sha256(tmp_path / "cli" / "model"), sha256(tmp_path / "whole" / "model")
    assert all(a[f] == b[f] for f in a if f.endswith(".safetensors"))
    assert report["bytes_on_disk"] == whole["bytes_on_disk"]
    load_native(tmp_path / "cli" / "model")


@pytest.mark.parametrize("batch_size", [1, 4])
def test_the_predicted_e2e_peak_is_not_below_the_measured_one(batch_size, tmp_path):
    """On a 256-wide Llama (the block, not Python's fixed costs, is most of the peak): E2E-QP's stage
    of `predict_train` against the live tensors of `train_e2e_streamed` (Block-AP done before)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from mixbits.model.apply import layer_shapes
    from mixbits.model.budget import predict_train
    from mixbits.model.memory import model_shapes
    from mixbits.train.e2e_streamed import step_size_count
    from tests.model.test_memory import measured_peak

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    model.save_pretrained(tmp_path / "ckpt", max_shard_size="1MB")
    calib, val = windows(8, 1, seqlen=64), windows(4, 2, seqlen=64)
    cfg = TrainConfig(**{**E2E.to_dict(), "train_size": 8, "val_size": 4, "seqlen": 64, "e2e_epochs": 0.5,
                         "e2e_batch_size": batch_size})
    plan = mixed_plan(model)
    source, writer, report = streamed(tmp_path / "ckpt", plan, calib, val, cfg, tmp_path / "out" / "model")
    predicted = predict_train(cfg, model_shapes(source.model), device=CPU, checkpoint_dtype=source.checkpoint_dtype,
                              eval_windows=4, e2e_scales=step_size_count(plan, layer_shapes(source.model)))
    assert [s.stage for s in predicted.stages] == ["train", "e2e", "quantize+evaluate"]
    run = lambda: train_e2e_streamed(source, plan, calib, val, cfg, sink=writer, report=report,  # noqa: E731
                                     progress=False)
    measured, e2e = measured_peak(run, tmp_path / "ckpt", tmp_path), predicted.stages[1].total
    print(f"E2E-QP streamed, batch {batch_size}: predicted {e2e / 2**20:.2f} MiB, measured {measured / 2**20:.2f} MiB")
    assert 0.9 * measured <= e2e <= 2 * measured, (e2e, measured)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_close_to_the_cpu(saved, tmp_path):
    """Blocks materialized and E2E-QP run on the GPU (float32, boundaries kept on the CPU): the same start
    loss as on the CPU up to float32 rounding, never worse than the start, every block rewritten."""
    model, folder, plan, calib, val = saved
    _, _, on_cpu = e2e_streamed(folder, plan, calib, val, E2E, tmp_path / "cpu" / "model")
    gpu, writer, on_gpu = e2e_streamed(folder, plan, calib, val, E2E, tmp_path / "gpu" / "model", device="cuda")
    assert on_gpu.e2e["loss_start"] == pytest.approx(on_cpu.e2e["loss_start"], rel=1e-3)
    assert on_gpu.e2e["loss_end"] <= on_gpu.e2e["loss_start"] and writer.done_blocks() == set(range(gpu.n_blocks))
    assert all(on_gpu.qparams[n].scale.device.type == "cpu" for n in plan.quantized())


def test_boundaries_offloaded_to_disk_give_the_same_scales(saved, tmp_path, monkeypatch):
    """cfg.offload: the batch's boundaries wait on disk (one safetensors file each, the Fisher's
    `Boundaries`), deleted as the backward takes them and with their folder at the end."""
    model, folder, plan, calib, val = saved
    cfg = TrainConfig(**{**E2E.to_dict(), "e2e_epochs": 1.0})
    offloaded = TrainConfig(**{**cfg.to_dict(), "offload": True, "offload_dir": str(tmp_path / "spill")})
    (tmp_path / "spill").mkdir()
    _, _, want = e2e_streamed(folder, plan, calib, val, cfg, tmp_path / "memory" / "model")
    written, put = [], module.Boundaries.put
    monkeypatch.setattr(module.Boundaries, "put", lambda self, i, h: written.append(self._path(i)) or put(self, i, h))
    _, _, got = e2e_streamed(folder, plan, calib, val, offloaded, tmp_path / "disk" / "model")
    assert written and all(p.parent.parent == tmp_path / "spill" for p in written)  # on disk, in the folder given
    assert all(torch.equal(got.qparams[n].scale, qp.scale) for n, qp in want.qparams.items())
    assert {k: v for k, v in got.e2e.items() if k != "seconds"} == {k: v for k, v in want.e2e.items()
                                                                   if k != "seconds"}
    assert not any((tmp_path / "spill").iterdir())


def test_gpt2_conv1d_layout_same_scales_as_the_whole_model(tmp_path):
    """GPT-2: Conv1D weights stored transposed ([in, out]), W_hat handed over in that layout."""
    model = tiny_gpt2()
    model.save_pretrained(tmp_path / "ckpt", max_shard_size="100KB")
    plan, calib = mixed_plan(model), windows(6, 1)
    _, want = train_model(model, plan, calib, calib[:3], E2E, device=CPU, progress=False)
    _, _, got = e2e_streamed(tmp_path / "ckpt", plan, calib, calib[:3], E2E, tmp_path / "s" / "model")
    assert want.e2e["best_epoch"] > 0
    assert all(torch.equal(got.qparams[n].scale, qp.scale) for n, qp in want.qparams.items())


def test_nonfinite_steps_fall_back_to_block_ap(saved, tmp_path, monkeypatch):
    """NaN only where gradients are recorded (the recompute of the backward): every step is skipped by the
    guard, and after max_nonfinite of them the shards keep Block-AP's scales."""
    model, folder, plan, calib, val = saved
    cfg = TrainConfig(**{**E2E.to_dict(), "max_nonfinite": 2})
    real = module.step_weight
    monkeypatch.setattr(module, "step_weight",
                        lambda *a: real(*a) * float("nan") if torch.is_grad_enabled() else real(*a))
    block_ap = []
    _, writer, got = e2e_streamed(folder, plan, calib, val, cfg, tmp_path / "model", block_ap=block_ap)
    assert got.e2e["fallback"] and got.e2e["nonfinite_steps"] == 2 and got.e2e["steps"] == 2
    assert got.e2e["loss_end"] == got.e2e["loss_start"] and got.e2e["kept_start"]
    assert all(torch.equal(got.qparams[n].scale, qp.scale) for n, qp in block_ap[0].qparams.items())


def test_a_resume_without_e2e_after_its_scales_were_saved_is_refused(tiny_model_dir, tiny_text_file, tmp_path):
    model, _ = load_model(str(tiny_model_dir))
    Plan.uniform(find_linears(model), QuantSpec(4, 32)).save(tmp_path / "plan.json")
    cfg = TrainConfig(dataset=str(tiny_text_file), train_size=2, val_size=1, seqlen=32, epochs=0.5, e2e=True)
    run = dict(model=str(tiny_model_dir), plan=tmp_path / "plan.json", output_dir=tmp_path / "out", device="cpu",
               eval_windows=1, progress=False)
    train_command(cfg=cfg, **run)
    with pytest.raises(UserError, match="--e2e"):  # the shards hold E2E-QP's scales: not a Block-AP-only model
        train_command(cfg=TrainConfig(**{**cfg.to_dict(), "e2e": False}), resume=True, **run)
    again = train_command(cfg=cfg, resume=True, **run)
    assert again["streamed"] and again["training"]["resumed_blocks"] == [0, 1]
