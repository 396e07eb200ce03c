"""The run's memory check: settings validated, the peak predicted from shapes, refusals before any
weight is read, and the prediction never more than 10 % below the measured peak on tiny models; the
same for `mixbits analyze` and `mixbits export` (model/budget_stages.py)."""

import dataclasses
import re

import pytest
import torch
from typer.testing import CliRunner

from mixbits.cli import app
from mixbits.config import DataConfig, RunConfig, TrainConfig
from mixbits.devices import compute_torch_dtype, parse_max_memory
from mixbits.errors import UserError
from mixbits.export.footprint import stored_parts
from mixbits.export.from_native import stored_source
from mixbits.export.native import save_native
from mixbits.export.streamed import export_stored
from mixbits.eval.streamed import Scorer
from mixbits.model.arch import find_linears
from mixbits.model.blockwise import capture_block_inputs
from mixbits.model.budget import RUNTIME_BYTES, check_run_memory, predict_run, skeleton_of
from mixbits.model.budget_stages import EXPORT_RUNTIME_BYTES, predict_analyze, predict_export
from mixbits.model.lazy import LazyCheckpoint, open_checkpoint
from mixbits.model.memory import model_shapes
from mixbits.model.quantize_streamed import quantize_streamed
from mixbits.model.stream import call_block
from mixbits.plan import Plan
from mixbits.quant.spec import QuantSpec
from mixbits.sensitivity.fisher_streamed import streamed_fisher_table
from mixbits.sensitivity.hessian_streamed import streamed_hessian_table
from mixbits.sensitivity.output_error_streamed import streamed_output_error_table
from tests.conftest import tiny_llama
from tests.model.test_memory import measured_peak

CPU = torch.device("cpu")
MIB = 2**20


def config(**change) -> RunConfig:
    data = DataConfig(calib_windows=change.pop("calib", 4), seqlen=change.pop("seqlen", 64),
                      eval_windows=change.pop("evals", 4))
    return RunConfig(data=data, **change)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().to(torch.bfloat16).save_pretrained(path, max_shard_size="100KB")
    return path


@pytest.fixture
def no_weights(monkeypatch):
    """Any read of a weight fails the test: the check must run on config.json and shapes alone."""
    def refuse(*args, **kwargs):
        raise AssertionError("a weight was read before the memory check")

    monkeypatch.setattr(LazyCheckpoint, "materialize", refuse)
    monkeypatch.setattr("safetensors.safe_open", refuse)
    monkeypatch.setattr("safetensors.torch.load_file", refuse)


# --- settings -------------------------------------------------------------------------------------------

def test_max_memory_is_read_in_accelerates_format():
    assert parse_max_memory("cpu=16GiB") == {"cpu": 16 * 2**30}
    assert parse_max_memory(" cpu = 1.5GB ") == {"cpu": 1_500_000_000}
    assert parse_max_memory("cpu=4096") == {"cpu": 4096}


@pytest.mark.parametrize("text, words", [
    ("cpu", "not DEVICE=SIZE"), ("cpu=0GiB", "not a positive size"), ("cpu=lots", "'lots'"),
    ("tpu=1GiB", "device 'tpu' is not known"), ("cpu=1GiB,cpu=2GiB", "twice"), ("disk=10GB", "--offload-dir"),
])
def test_bad_max_memory_is_refused_naming_the_value(text, words):
    with pytest.raises(UserError, match="max_memory") as err:
        config(max_memory=text)
    assert words in str(err.value) and repr(text) in str(err.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_cuda_budget_needs_a_cuda_device():
    with pytest.raises(UserError, match="cuda:0 does not exist on this machine"):
        parse_max_memory("cuda:0=20GiB,cpu=16GiB")


def test_compute_dtype_and_offload_dir(tmp_path):
    assert compute_torch_dtype("bfloat16") is torch.bfloat16 and compute_torch_dtype(None) is None
    with pytest.raises(UserError, match=r"compute_dtype \(--compute-dtype\) 'fp8'.*float32, bfloat16, float16"):
        config(compute_dtype="fp8")
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        config(offload_dir=tmp_path / "file")
    cfg = config(offload_dir=tmp_path / "new", compute_dtype="float16", max_memory="cpu=8GiB", stream=False)
    assert cfg.to_dict()["offload_dir"] == str(tmp_path / "new") and cfg.to_dict()["stream"] is False


def test_cli_flags_reach_the_config(tmp_path):
    runner = CliRunner()
    bad = runner.invoke(app, ["run", "--no-verbose", "--max-memory", "cpu=nothing", "--output-dir", str(tmp_path)])
    assert bad.exit_code == 2 and "max_memory (--max-memory) 'cpu=nothing'" in bad.output
    bad = runner.invoke(app, ["run", "--no-verbose", "--compute-dtype", "int4", "--output-dir", str(tmp_path)])
    assert bad.exit_code == 2 and "--compute-dtype" in bad.output and "bfloat16" in bad.output


# --- prediction and refusals ----------------------------------------------------------------------------

def test_the_check_reads_config_json_only(folder, no_weights):
    model, stored = skeleton_of(folder)
    assert stored is torch.bfloat16 and next(model.parameters()).device.type == "meta"
    memory = check_run_memory(config(), folder, device=CPU)
    assert memory.block_name == "model.layers.0" and memory.total > RUNTIME_BYTES
    largest = max([o * i for blk in model_shapes(model).block_linears for o, i in blk]
                  + [model_shapes(model).vocab * model_shapes(model).hidden])
    assert memory.held["read buffer"] == largest * 2 and memory.held["allocator slack"] == 0  # bf16, pinned


def test_a_budget_below_one_block_is_refused_naming_the_block(folder, no_weights):
    with pytest.raises(UserError) as err:
        check_run_memory(config(max_memory="cpu=64KiB"), folder, device=CPU)
    text = str(err.value)
    assert "too small for one block: model.layers.0 alone takes" in text and "float32" in text
    block_mib = re.search(r"alone takes ([\d.]+) MiB", text).group(1)
    assert float(block_mib) == pytest.approx(model_shapes(skeleton_of(folder)[0]).block_params[0] * 4 / MIB, abs=0.05)
    assert "--compute-dtype bfloat16" in text and "another device" in text


def test_a_run_over_budget_is_refused_with_fixes_that_fit(folder, no_weights):
    cfg = config(calib=64, seqlen=256, evals=2, quantizer="rtn")
    shapes = model_shapes(skeleton_of(folder)[0])
    need = predict_run(cfg, shapes, device=CPU, checkpoint_dtype=torch.bfloat16)
    assert need.peak.stage == "fisher"  # 64 windows' boundaries at every block
    on_disk = predict_run(dataclasses.replace(cfg, offload_dir="x"), shapes, device=CPU, checkpoint_dtype=torch.bfloat16)
    limit = (need.total + on_disk.total) // 2  # boundaries on disk fit; in memory they do not
    with pytest.raises(UserError) as err:
        check_run_memory(dataclasses.replace(cfg, max_memory=f"cpu={limit}"), folder, device=CPU)
    text = str(err.value)
    assert "the peak is fisher during" in text and "at model.layers.0 (the largest block" in text
    assert "--offload-dir FOLDER" in text and "another device" in text
    windows = int(re.search(r"--calib-windows (\d+)", text).group(1))
    fixed = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, calib_windows=windows))
    assert predict_run(fixed, shapes, device=CPU, checkpoint_dtype=torch.bfloat16).total <= limit
    half = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, calib_windows=windows * 2))
    assert predict_run(half, shapes, device=CPU, checkpoint_dtype=torch.bfloat16).total > limit  # the mildest fix
    check_run_memory(dataclasses.replace(cfg, max_memory=f"cpu={need.total}"), folder, device=CPU)  # fits exactly


def test_a_budget_must_name_the_runs_device(folder, no_weights):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device to name one in --max-memory")
    with pytest.raises(UserError, match="gives no budget for cpu"):
        check_run_memory(config(max_memory="cuda:0=1GiB"), folder, device=CPU)


def test_prediction_follows_the_settings(folder):
    shapes = model_shapes(skeleton_of(folder)[0])
    predict = lambda **change: predict_run(config(**change), shapes, device=CPU, checkpoint_dtype=torch.bfloat16)
    base = predict(calib=32, seqlen=128)
    assert [s.stage for s in base.stages] == ["fisher", "gain table", "quantize+evaluate"]
    assert [s.stage for s in predict(quantizer="rtn").stages] == ["fisher", "quantize+evaluate"]
    assert [s.stage for s in predict(damage="rtn").stages] == ["fisher", "quantize+evaluate"]
    assert predict(calib=32, seqlen=128, offload_dir="x").stages[0].total < base.stages[0].total
    assert predict(calib=32, seqlen=128, compute_dtype="bfloat16").total < base.total
    assert predict(calib=64, seqlen=128).stages[0].total > base.stages[0].total
    whole = predict(calib=32, seqlen=128, stream=False)
    assert whole.stages[-1].parts["quantized copies"] == 3 * shapes.total_params * 4  # mixed + 2 baselines
    assert predict(calib=32, seqlen=128, stream=False, baselines=False).stages[-1].parts["quantized copies"] == \
        shapes.total_params * 4
    qat = predict(calib=32, seqlen=128, train=TrainConfig(init="gptq"))  # --qat still loads the whole model
    assert qat.stages[-1].stage == "train" and qat.stages[-1].parts["original model"] == shapes.total_params * 4
    assert qat.held["read buffer"] == 0 and base.held["read buffer"] > 0
    assert qat.held["allocator slack"] > 0 and base.held["allocator slack"] == 0  # pinned only when streamed
    assert "predicted peak" in base.describe() and base.peak.stage in base.describe()
    preloaded = predict(calib=32, seqlen=128, preload=True)
    assert preloaded.total - base.total == preloaded.held["checkpoint held in RAM (--preload)"] == \
        (shapes.total_params - shapes.held_params) * 2  # the bf16 checkpoint; its held embedding counted once
    assert shapes.held_params > 0
    assert base.held["checkpoint held in RAM (--preload)"] == 0


def test_zero_shot_is_a_streamed_stage_capped_by_the_budget(folder):
    shapes = model_shapes(skeleton_of(folder)[0])
    tasks = predict_run(config(tasks=("bb_winowhy_cloze",)), shapes, device=CPU, checkpoint_dtype=torch.bfloat16)
    assert [s.stage for s in tasks.stages][-1] == "zeroshot"
    whole = tasks.stages[-1].parts["model weights (accelerate's share)"]
    assert whole == shapes.total_params * 4  # no budget: the whole model in float32
    capped = predict_run(config(tasks=("bb_winowhy_cloze",), max_memory=f"cpu={RUNTIME_BYTES + 4096}"), shapes,
                         device=CPU, checkpoint_dtype=torch.bfloat16).stages[-1].parts["model weights (accelerate's share)"]
    assert capped < whole and capped >= shapes.outside_params * 4  # accelerate's share, or the packed model first


def test_a_preloaded_run_over_budget_names_dropping_the_preload(folder, no_weights):
    cfg = config(quantizer="rtn", preload=True)
    shapes = model_shapes(skeleton_of(folder)[0])
    need = predict_run(cfg, shapes, device=CPU, checkpoint_dtype=torch.bfloat16).total
    with pytest.raises(UserError) as err:
        check_run_memory(dataclasses.replace(cfg, max_memory=f"cpu={need - 1024}"), folder, device=CPU)
    assert "without --preload (weights read from disk block by block)" in str(err.value)


# --- prediction against measured peaks --------------------------------------------------------------------

def _reference(ckpt, windows) -> Scorer:
    """The original scored through the blocks (what a streamed run does before its variants)."""
    scorer = Scorer(windows, device=ckpt.device)
    with ckpt.resident() as model:
        inputs = capture_block_inputs(model, windows, batch_size=1, store=CPU, progress=False)
    hidden, as_tuple = list(inputs.hidden), False
    for i in range(ckpt.n_blocks):
        with ckpt.block(i) as block:
            outs = [call_block(block, h.to(ckpt.device), a, k) for h, a, k in zip(hidden, inputs.args, inputs.kwargs)]
        hidden, as_tuple = [o for o, _ in outs], outs[0][1]
    with ckpt.resident() as model:
        scorer.score(model, hidden, as_tuple, "original", reference=True)
    return scorer


@pytest.mark.parametrize("quantizer, n, seqlen", [("rtn", 4, 64), ("gptq", 4, 64), ("gptq", 8, 128)])
def test_run_prediction_is_not_below_the_measured_peak(folder, tmp_path, quantizer, n, seqlen):
    cfg = config(calib=n, seqlen=seqlen, evals=n, quantizer=quantizer)
    ckpt = open_checkpoint(folder)
    gen = torch.Generator().manual_seed(0)
    calib, test = (torch.randint(0, 256, (n, seqlen), generator=gen) for _ in range(2))
    linears = find_linears(ckpt.model)
    shapes = {k: (i.out_features, i.in_features) for k, i in linears.items()}
    specs = cfg.allocation.configs()

    def fisher():
        streamed_fisher_table(ckpt, calib, linears, specs, progress=False)

    def variants():  # the original, then mixed and two uniform baselines, as a streamed run scores them
        scorer = _reference(ckpt, test)
        for plan in (Plan.uniform(shapes, QuantSpec(3, 64)), Plan.uniform(shapes, QuantSpec(4, 64)),
                     Plan.uniform(shapes, QuantSpec(2, 64))):
            quantize_streamed(ckpt, plan, quantizer=quantizer, windows=None if quantizer == "rtn" else calib,
                              scorer=scorer, progress=False)

    predicted = predict_run(cfg, model_shapes(ckpt.model), device=CPU, checkpoint_dtype=torch.bfloat16)
    stage = {s.stage: s for s in predicted.stages}
    for name, run in (("fisher", fisher), ("quantize+evaluate", variants)):
        measured = measured_peak(run, folder, tmp_path)
        assert stage[name].total >= 0.9 * measured, (name, measured, stage[name])
        assert stage[name].total <= 3 * measured, (name, measured, stage[name])  # not a blanket over-estimate


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_prediction_covers_the_device_peak(folder):
    """On CUDA the blocks run in the checkpoint's dtype; the stages' tensors are compared with the
    device's peak (boundaries wait on the host here, so the prediction is an upper bound)."""
    n, seqlen, cuda = 4, 64, torch.device("cuda")
    cfg = config(calib=n, seqlen=seqlen, evals=n, quantizer="gptq", max_memory="cuda:0=8GiB,cpu=8GiB")
    ckpt = open_checkpoint(folder, device=cuda)
    gen = torch.Generator().manual_seed(0)
    calib, test = (torch.randint(0, 256, (n, seqlen), generator=gen) for _ in range(2))
    shapes = {k: (i.out_features, i.in_features) for k, i in find_linears(ckpt.model).items()}
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    scorer = _reference(ckpt, test)
    quantize_streamed(ckpt, Plan.uniform(shapes, QuantSpec(4, 64)), quantizer="gptq", windows=calib, scorer=scorer,
                      progress=False)
    measured = torch.cuda.max_memory_allocated() - start
    predicted = predict_run(cfg, model_shapes(ckpt.model), device=cuda, checkpoint_dtype=torch.bfloat16)
    assert predicted.dtype == torch.bfloat16 and predicted.budget_device == "cuda:0"
    stage = {s.stage: s for s in predicted.stages}["quantize+evaluate"]
    assert stage.total >= 0.9 * measured, (measured, stage)
    memory = check_run_memory(cfg, folder, device=cuda)  # fits: no refusal
    assert memory.on("cpu") == sum(memory.held.values()) and memory.on("cuda:0") > memory.peak.total


# --- analyze and export (model/budget_stages.py) ----------------------------------------------------------

def test_analyze_prediction_follows_the_methods(folder):
    shapes = model_shapes(skeleton_of(folder)[0])
    predict = lambda methods, **kw: predict_analyze(methods, shapes, windows=8, seqlen=128, device=CPU,
                                                    checkpoint_dtype=torch.bfloat16, **kw)
    assert [s.stage for s in predict(("fisher", "gradient", "output_error")).stages] == ["fisher", "output error"]
    both = predict(("gradient", "hessian"))
    assert [s.stage for s in both.stages] == ["fisher", "hessian"] and both.held["runtime"] == RUNTIME_BYTES
    hessian = {s.stage: s for s in both.stages}["hessian"]
    assert predict(("hessian",), offload=True).stages[0].total < hessian.total  # boundaries on disk
    assert predict(("hessian",), probes=4).stages[0].total > hessian.total  # a tangent per probe
    fisher = predict(("fisher",))  # the same count as run's Fisher stage
    run = predict_run(config(calib=8, seqlen=128, quantizer="rtn"), shapes, device=CPU, checkpoint_dtype=torch.bfloat16)
    assert fisher.total == run.stages[0].total + sum(run.held.values())
    with pytest.raises(ValueError, match="none is streamed"):
        predict(("divergence",))


@pytest.mark.parametrize("method, n, seqlen", [("hessian", 2, 64), ("hessian", 4, 128), ("output_error", 4, 128)])
def test_analyze_prediction_is_not_below_the_measured_peak(folder, tmp_path, method, n, seqlen):
    ckpt = open_checkpoint(folder)
    windows = torch.randint(0, 256, (n, seqlen), generator=torch.Generator().manual_seed(0))
    linears, specs = find_linears(ckpt.model), [QuantSpec(4, 32), QuantSpec(8, 32)]
    table = streamed_hessian_table if method == "hessian" else streamed_output_error_table
    measured = measured_peak(lambda: table(ckpt, windows, linears, specs, progress=False), folder, tmp_path)
    predicted = predict_analyze((method,), model_shapes(ckpt.model), windows=n, seqlen=seqlen, device=CPU,
                                checkpoint_dtype=torch.bfloat16).peak
    assert predicted.total >= 0.9 * measured, (method, measured, predicted)
    assert predicted.total <= 3 * measured, (method, measured, predicted)  # not a blanket over-estimate


def _wide_run_folder(path):
    """A native folder of a Llama wider than the tiny one (blocks outweigh the embeddings), mixed plan."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    labels = {"q_proj": "w4g32", "k_proj": "w4g32", "v_proj": "w4g32", "o_proj": "fp16", "gate_proj": "w4g64s",
              "up_proj": "w4g64s", "down_proj": "w8g32s"}
    plan = Plan({n: QuantSpec.parse(labels[n.rsplit(".", 1)[1]]) for n in find_linears(model)})
    save_native(model, plan, path)
    return path


@pytest.mark.parametrize("fmt", ["gptq", "gguf"])
def test_export_prediction_is_not_below_the_measured_peak(tmp_path, fmt):
    run = _wide_run_folder(tmp_path / "run")
    source = stored_source(run)
    parts = stored_parts(source)
    assert sum(p.stored_bytes for p in parts) == sum(f.stat().st_size for f in run.glob("*.safetensors")) - sum(
        8 + int.from_bytes(f.read_bytes()[:8], "little") for f in run.glob("*.safetensors"))  # headers aside
    assert [p.index for p in parts] == [None, 0, 1, None] and parts[1].planned_weights == \
        sum(o * i for o, i in model_shapes(source.structure).block_linears[0]) - 256 * 256  # o_proj kept in fp16
    measured = measured_peak(lambda: export_stored(source, tmp_path / "out", fmt), run, tmp_path)
    predicted = predict_export(parts, fmt)
    assert predicted.peak.phase.startswith("block") and predicted.held["runtime"] == EXPORT_RUNTIME_BYTES
    assert predicted.peak.total >= 0.9 * measured, (measured, predicted.describe())
    assert predicted.peak.total <= 3 * measured, (measured, predicted.describe())
