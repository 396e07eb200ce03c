"""The train job (`mixbits train`): a saved plan + a model -> a trained quantized model, evaluated and saved.

One function for the CLI to call. It cuts calibration and validation windows from their own document
splits, reads an optional per-block sensitivity file (`{"sensitivity_scores": [...]}`, the format of
EfficientQAT-style scripts; `sensitivity.seedfile.write_seed_file` writes one), trains, scores the
original, the init (the untrained starting point) and the trained model on the same test windows,
and writes output_dir/model (native packed format), train_report.json and train_statistics.json.
Finished blocks are recorded under output_dir/checkpoint, so `--resume` continues a killed run.

Two paths, the first whenever it can serve; the job logs which it took, and why:
* streamed (a local safetensors folder or cached snapshot): the checkpoint is opened lazily and
  read one block at a time, in float32 (`train.streamed.train_streamed`); each trained block is
  packed into output_dir/model as it finishes (those shards are what a resume continues from; the
  checkpoint folder holds only the blocks' statistics). With E2E-QP (--e2e) the folder is then
  completed and the step sizes trained end to end one block at a time from the packed codes
  (`train.e2e_streamed.train_e2e_streamed`; the kept scales are saved in the checkpoint folder, then
  each block's shard is rewritten atomically). The evaluation pushes the test windows through the
  original, the init and the trained blocks one block at a time (`eval.streamed`). Peak: about one
  block three times plus the activations at a block boundary (E2E-QP: one batch's activations at
  every boundary, and every block's scales with their AdamW moments).
* whole model (a pickle-only checkpoint, or `stream=False`): the model is loaded (kept on the CPU;
  blocks visit the device one at a time), `train_model` trains a quantized copy and checkpoints
  every block (weights and scales) under output_dir/checkpoint, E2E-QP trains the whole quantized
  model, and the three models are evaluated whole.
Both give the same trained weights, bit for bit in float32 (tests/train/test_streamed.py,
tests/train/test_e2e_streamed.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from mixbits.config import TrainConfig, resolve_device
from mixbits.data.text import load_text
from mixbits.data.windows import eval_windows, text_fingerprint
from mixbits.errors import UserError
from mixbits.eval.perplexity import CONVENTION, evaluate_models
from mixbits.eval.streamed import Scorer, score_reference
from mixbits.export.native import save_native
from mixbits.export.native_shards import NativeWriter
from mixbits.io import atomic_write_json
from mixbits.jobs.run_streamed import local_folder, open_streamed
from mixbits.model.apply import layer_shapes
from mixbits.model.arch import find_blocks
from mixbits.model.budget import predict_train
from mixbits.model.checkpoint_files import SAFE_INDEX, SAFE_SINGLE
from mixbits.model.load import load_model, resolve_model_source
from mixbits.model.memory import model_shapes
from mixbits.model.quantize import quantize_model
from mixbits.model.quantize_streamed import quantize_streamed
from mixbits.plan import Plan
from mixbits.quant.spec import GGMLSpec
from mixbits.sensitivity.seedfile import read_seed_file
from mixbits.train.checkpoint import BlockCheckpoint
from mixbits.train.e2e_streamed import E2E_FILE, step_size_count, train_e2e_streamed
from mixbits.train.report import TrainReport
from mixbits.train.run import train_model
from mixbits.train.streamed import finish_streamed, train_fingerprint, train_streamed
from mixbits.train.windows import training_windows

log = logging.getLogger(__name__)

REPORT_FORMAT = "mixbits.train-report/1"


def _windows(tokenizer, cfg: TrainConfig, eval_count: int) -> dict[str, torch.Tensor]:
    test = eval_windows(tokenizer, load_text(cfg.dataset, "test"), cfg.seqlen, eval_count or None)
    return training_windows(tokenizer, cfg) | {"test": test}


def _sensitivity(path: Path | None, n_blocks: int) -> dict[int, float] | None:
    return None if path is None else dict(enumerate(float(x) for x in read_seed_file(path, n_blocks)))


def _streamable(model: str, source: str, cfg: TrainConfig, stream: bool) -> tuple[Path | None, str | None]:
    """(the local checkpoint folder to stream from, None) or (None, why the whole model is loaded)."""
    if not stream:
        return None, "stream=False"
    folder = local_folder(source, model)
    if not ((folder / SAFE_INDEX).is_file() or (folder / SAFE_SINGLE).is_file()):
        return None, f"{folder} holds no safetensors weights (a pickle checkpoint is loaded whole)"
    return folder, None


def _checkpoint_identity(model: str, folder: Path) -> str:
    """The model as a resume sees it without reading its weights: the name, config.json, the index
    and every shard's name and size."""
    h = hashlib.sha256(model.encode())
    for name in ("config.json", SAFE_INDEX):
        if (folder / name).is_file():
            h.update((folder / name).read_bytes())
    h.update(json.dumps({p.name: p.stat().st_size for p in sorted(folder.glob("*.safetensors"))}).encode())
    return h.hexdigest()


def _evaluate(models: dict, test: torch.Tensor, device: torch.device, progress: bool) -> dict:
    for m in models.values():
        m.to(device)
    try:
        results = evaluate_models(models, test, device=device, reference="original", progress=progress)
    finally:
        for m in models.values():
            m.to("cpu")
    return {name: r.to_dict() for name, r in results.items()}


def _train_whole(model: str, source: str, plan: Plan, output_dir: Path, cfg: TrainConfig, sensitivity_file,
                 device: torch.device, resume: bool, eval_count: int, progress: bool):
    """The whole-model path (module docstring): (windows, evaluation, bytes on disk, report)."""
    original, tokenizer = load_model(source, device="cpu")
    sensitivity = _sensitivity(sensitivity_file, len(find_blocks(original)[1]))
    windows = _windows(tokenizer, cfg, eval_count)
    trained, report = train_model(original, plan, windows["calibration"], windows["validation"], cfg,
                                  device=device, sensitivity=sensitivity,
                                  checkpoint_dir=output_dir / "checkpoint", resume=resume, progress=progress)
    init, _ = quantize_model(original, plan, quantizer=cfg.init, device=device, progress=progress,
                             windows=None if cfg.init == "rtn" else windows["calibration"],
                             batch_size=cfg.batch_size)
    evaluation = _evaluate({"original": original, "init": init, "trained": trained}, windows["test"], device,
                           progress)
    size = save_native(trained, plan, output_dir / "model", tokenizer, qparams=report.qparams)
    return windows, evaluation, size, report


def _train_streamed(model: str, folder: Path, plan: Plan, output_dir: Path, cfg: TrainConfig, sensitivity_file,
                    device: torch.device, resume: bool, eval_count: int, progress: bool):
    """The streamed path (module docstring): (windows, evaluation, bytes on disk, report)."""
    if resume and not cfg.e2e and (output_dir / "checkpoint" / E2E_FILE).is_file():
        raise UserError(f"--resume: {output_dir} holds E2E-QP's trained scales (checkpoint/{E2E_FILE}), which its "
                        "model's shards may already hold; resume with --e2e and the same settings, or choose an empty "
                        "output folder")
    source, tokenizer = open_streamed(model, str(folder), device, "float32")
    plan.validate(layer_shapes(source.model))  # shapes from the skeleton: before any weight is read
    memory = predict_train(cfg, model_shapes(source.model), device=device, checkpoint_dtype=source.checkpoint_dtype,
                           eval_windows=eval_count, e2e_scales=step_size_count(plan, layer_shapes(source.model)))
    log.info("memory: %s", memory.describe())
    sensitivity = _sensitivity(sensitivity_file, source.n_blocks)
    windows = _windows(tokenizer, cfg, eval_count)
    calib, val = windows["calibration"], windows["validation"]
    fingerprint = train_fingerprint(source, plan, calib, val, cfg, model=_checkpoint_identity(model, folder),
                                    sensitivity=sensitivity)
    checkpoint = BlockCheckpoint(output_dir / "checkpoint", fingerprint, resume=resume)  # refuses another run's
    writer = NativeWriter(output_dir / "model", plan, source.model.config, tokenizer, n_blocks=source.n_blocks,
                          block_path=source.block_path, resume=resume, provenance=fingerprint)
    report = train_streamed(source, plan, calib, val, cfg, sink=writer, checkpoint=checkpoint,
                            sensitivity=sensitivity, progress=progress)
    if cfg.e2e:
        report = train_e2e_streamed(source, plan, calib, val, cfg, sink=writer, report=report, checkpoint=checkpoint,
                                    progress=progress)
    scorer = Scorer(windows["test"], device=device)
    evaluation = {"original": score_reference(source, scorer, progress=progress)}
    evaluation["init"] = quantize_streamed(source, plan, quantizer=cfg.init, scorer=scorer, name="init",
                                           windows=None if cfg.init == "rtn" else calib,
                                           batch_size=cfg.batch_size, progress=progress).evaluation
    evaluation["trained"] = finish_streamed(source, plan, writer, scorer=scorer, progress=progress)
    return windows, {name: r.to_dict() for name, r in evaluation.items()}, writer.finish(), report


def train_command(*, model: str, plan: Path, output_dir: Path, cfg: TrainConfig, sensitivity_file: Path | None = None,
                  device: str = "auto", resume: bool = False, eval_windows: int = 24,
                  progress: bool = True, stream: bool = True) -> dict:
    """Everything `mixbits train` does (module docstring); returns what train_report.json holds.
    `stream=False` loads the whole model even where the streamed path could serve."""
    output_dir = Path(output_dir)
    if cfg.schedule != "fixed" and sensitivity_file is None:
        raise UserError(f"schedule {cfg.schedule!r} needs a sensitivity score per block; pass --sensitivity-file "
                         "(a {\"sensitivity_scores\": [one per block]} file) or use --schedule fixed")
    the_plan = Plan.load(plan)
    ggml = [n for n, s in the_plan.quantized().items() if isinstance(s, GGMLSpec)]
    if cfg.e2e and ggml:
        raise UserError(f"--e2e: E2E-QP trains affine step sizes, and {plan} plans {len(ggml)} layer(s) as ggml types "
                        f"(e.g. {ggml[0]}: {the_plan.specs[ggml[0]].name}); Block-AP trains those grids: drop --e2e")
    torch_device = resolve_device(device)
    source = resolve_model_source(model)
    folder, why = _streamable(model, source, cfg, stream)
    if folder is None:
        log.info("training loads the whole model in memory: %s", why)
        done = _train_whole(model, source, the_plan, output_dir, cfg, sensitivity_file, torch_device, resume,
                            eval_windows, progress)
    else:
        log.info("training streams %s block by block: Block-AP%s", folder,
                 ", then E2E-QP's step sizes end to end (--e2e)" if cfg.e2e else "")
        done = _train_streamed(model, folder, the_plan, output_dir, cfg, sensitivity_file, torch_device, resume,
                               eval_windows, progress)
    windows, evaluation, size, report = done
    return _write_results(model, plan, output_dir, cfg, torch_device, folder is not None, windows, evaluation, size,
                          report)


def _write_results(model: str, plan: Path, output_dir: Path, cfg: TrainConfig, device: torch.device, streamed: bool,
                   windows: dict, evaluation: dict, size: int, report: TrainReport) -> dict:
    results = {
        "format": REPORT_FORMAT, "model": model, "plan": str(plan), "device": str(device), "streamed": streamed,
        "data": {k: {"windows": len(w), "seqlen": w.shape[1], "sha256": text_fingerprint(w)}
                 for k, w in windows.items()},
        "evaluation": {"convention": CONVENTION.format(seqlen=cfg.seqlen), "models": evaluation},
        "bytes_on_disk": size, "training": report.to_dict(),
    }
    atomic_write_json(output_dir / "train_report.json", results)
    atomic_write_json(output_dir / "train_statistics.json", [b.to_dict() for b in report.blocks])
    log.info("perplexity: original %.3f, %s init %.3f, trained %.3f", evaluation["original"]["ppl"], cfg.init,
             evaluation["init"]["ppl"], evaluation["trained"]["ppl"])
    return results
