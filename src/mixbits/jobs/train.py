"""The train job (`mixbits train`): a saved plan + a model -> a trained quantized model, evaluated and saved.

One function for the CLI to call: it loads the model (kept on the CPU; blocks visit the device
one at a time), cuts calibration and validation windows from their own document splits, reads
an optional per-block sensitivity file (`{"sensitivity_scores": [...]}`, the format of
EfficientQAT-style scripts; `sensitivity.seedfile.write_seed_file` writes one), trains
(`train_model`, checkpointing every block under output_dir/checkpoint so `--resume` continues
a killed run), scores the original, the init (the untrained starting point) and the trained
model on the same test windows, and writes output_dir/model (native packed format),
train_report.json and train_statistics.json.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from mixbits.config import TrainConfig, resolve_device
from mixbits.data.text import load_text
from mixbits.data.windows import eval_windows, text_fingerprint
from mixbits.errors import UserError
from mixbits.eval.perplexity import CONVENTION, evaluate_models
from mixbits.export.native import save_native
from mixbits.io import atomic_write_json
from mixbits.model.arch import find_blocks
from mixbits.model.load import load_model, resolve_model_source
from mixbits.model.quantize import quantize_model
from mixbits.plan import Plan
from mixbits.sensitivity.seedfile import read_seed_file
from mixbits.train.run import train_model
from mixbits.train.windows import training_windows

log = logging.getLogger(__name__)

REPORT_FORMAT = "mixbits.train-report/1"


def _windows(tokenizer, cfg: TrainConfig, eval_count: int) -> dict[str, torch.Tensor]:
    test = eval_windows(tokenizer, load_text(cfg.dataset, "test"), cfg.seqlen, eval_count or None)
    return training_windows(tokenizer, cfg) | {"test": test}


def _evaluate(models: dict, test: torch.Tensor, device: torch.device, progress: bool) -> dict:
    for m in models.values():
        m.to(device)
    try:
        results = evaluate_models(models, test, device=device, reference="original", progress=progress)
    finally:
        for m in models.values():
            m.to("cpu")
    return {name: r.to_dict() for name, r in results.items()}


def train_command(*, model: str, plan: Path, output_dir: Path, cfg: TrainConfig, sensitivity_file: Path | None = None,
                  device: str = "auto", resume: bool = False, eval_windows: int = 24,
                  progress: bool = True) -> dict:
    """Everything `mixbits train` does (module docstring); returns what train_report.json holds."""
    output_dir = Path(output_dir)
    if cfg.schedule != "fixed" and sensitivity_file is None:
        raise UserError(f"schedule {cfg.schedule!r} needs a sensitivity score per block; pass --sensitivity-file "
                         "(a {\"sensitivity_scores\": [one per block]} file) or use --schedule fixed")
    the_plan = Plan.load(plan)
    torch_device = resolve_device(device)
    original, tokenizer = load_model(resolve_model_source(model), device="cpu")
    n_blocks = len(find_blocks(original)[1])
    sensitivity = None
    if sensitivity_file is not None:
        sensitivity = dict(enumerate(float(x) for x in read_seed_file(sensitivity_file, n_blocks)))
    windows = _windows(tokenizer, cfg, eval_windows)
    trained, report = train_model(original, the_plan, windows["calibration"], windows["validation"], cfg,
                                  device=torch_device, sensitivity=sensitivity,
                                  checkpoint_dir=output_dir / "checkpoint", resume=resume, progress=progress)
    init, _ = quantize_model(original, the_plan, quantizer=cfg.init, device=torch_device, progress=progress,
                             windows=None if cfg.init == "rtn" else windows["calibration"],
                             batch_size=cfg.batch_size)
    evaluation = _evaluate({"original": original, "init": init, "trained": trained}, windows["test"],
                           torch_device, progress)
    size = save_native(trained, the_plan, output_dir / "model", tokenizer, qparams=report.qparams)
    results = {
        "format": REPORT_FORMAT, "model": model, "plan": str(plan), "device": str(torch_device),
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
