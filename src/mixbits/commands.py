"""The jobs of the command line as Python functions; each `mixbits <command>` is a thin layer over one.

    from mixbits import commands
    from mixbits.config import RunConfig

    results = commands.run("recipe.yaml", {"data.seqlen": 256, "output_dir": "runs/x"})  # = mixbits run --recipe ...
    results = commands.run(RunConfig(model="path/to/llama", output_dir=Path("runs/y")))   # streamed, to a folder
    qm = mixbits.load("runs/y/model")                                                  # the packed model back

`run` streams a local checkpoint block by block (`RunConfig.stream`), so it is the way to quantize a
model whose float32 copy would not fit in memory; `mixbits.quantize` (api.py) holds the model and
its quantized copy in memory and returns them for a notebook. Each function claims its output folder
before loading anything (`mixbits.outdir`: a new or empty folder, or an earlier output of the same
command with `overwrite`), runs the job in `mixbits.jobs` / `mixbits.pipeline`, and returns what the
command prints and writes (results.json's content). Bad settings raise `mixbits.errors.UserError`
naming the config field; the CLI shows the field as its flag (`cli/options.flags_in`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from mixbits.errors import UserError

if TYPE_CHECKING:  # the jobs import torch and transformers: `import mixbits` stays cheap
    from mixbits.classify.config import ClassifyConfig
    from mixbits.config import RunConfig, TrainConfig
    from mixbits.jobs.analyze_config import AnalyzeConfig

__all__ = ["analyze", "classify", "run", "train", "zeroshot"]


def run(config: RunConfig | str | Path | None = None, fields: Mapping[str, object] | None = None) -> dict:
    """`mixbits run`: sensitivity, allocation, quantization, evaluation and save into `output_dir`.

    config: a RunConfig, a recipe file (YAML/JSON, `mixbits.recipe`), or None for the defaults.
    fields: field paths -> values applied on top (`{"data.seqlen": 256, "quantizer": "rtn"}`),
    as flags are applied on top of a recipe. Returns results.json's content."""
    from mixbits.config import RunConfig
    from mixbits.pipeline import run as run_pipeline
    from mixbits.recipe import load_recipe, with_fields

    cfg = config if isinstance(config, RunConfig) else (
        load_recipe(config) if config is not None else RunConfig())
    if fields:
        cfg = with_fields(cfg, dict(fields))
    return run_pipeline(cfg)


def analyze(config: AnalyzeConfig, *, overwrite: bool = False) -> dict:
    """`mixbits analyze`: sensitivity tables by several methods, validated, with plots, in
    `config.output_dir`. Returns analysis.json's content (with the files written)."""
    from mixbits.jobs.analyze import analyze as run_analyze
    from mixbits.outdir import claim

    with claim(config.output_dir, "analyze", overwrite=overwrite, command="mixbits analyze"):
        return run_analyze(config)


def train(plan: str | Path, config: TrainConfig, *, model: str = "smollm2-135m", output_dir: str | Path = "runs/train",
          sensitivity_file: str | Path | None = None, device: str = "auto", resume: bool = False,
          eval_windows: int = 24, overwrite: bool = False, progress: bool = True) -> dict:
    """`mixbits train`: Block-AP (then E2E-QP with config.e2e) of `model` quantized by `plan`, the
    packed model in output_dir/model (streamed block by block from a local checkpoint when E2E-QP is
    off); `resume` continues a killed run after its last finished block. Returns train_report.json's content."""
    from mixbits.jobs.train import train_command
    from mixbits.outdir import claim

    output_dir = Path(output_dir)
    with claim(output_dir, "train", overwrite=overwrite, resume=resume, command="mixbits train"):
        return train_command(model=model, plan=Path(plan), output_dir=output_dir, cfg=config,
                             sensitivity_file=None if sensitivity_file is None else Path(sensitivity_file),
                             device=device, resume=resume, eval_windows=eval_windows, progress=progress)


def classify(config: ClassifyConfig, *, overwrite: bool = False) -> dict:
    """`mixbits classify`: per-layer 4-bit accuracy drops of a sentence classifier and fixed-tier
    plans, in `config.output_dir`. Returns classify.json's content."""
    from mixbits.jobs.classify import run_classify
    from mixbits.outdir import claim

    with claim(config.output_dir, "classify", overwrite=overwrite, command="mixbits classify"):
        return run_classify(config)


def zeroshot(tasks, *, run_dir: str | Path | None = None, model: str | None = None, output: str | Path | None = None,
             limit: int | None = 200, batch_size: int = 8, device: str = "auto", original: bool = True, seed: int = 0,
             max_memory: str | None = None, offload_dir: str | Path | None = None, progress: bool = True) -> dict:
    """`mixbits zeroshot`: zero-shot accuracy (lm-eval) of a run's original and quantized models
    (`run_dir`), or of one `model`, each loaded alone and placed by accelerate within `max_memory`
    (blocks beyond it on disk). Writes `output` (default RUN_DIR/zeroshot.json) and returns the results."""
    from mixbits.eval.zeroshot import check_options, split_task_names
    from mixbits.io import atomic_write_json
    from mixbits.jobs.zeroshot import zeroshot_job
    from mixbits.outdir import refresh

    names = list(tasks)
    check_options(names, limit=limit, batch_size=batch_size)
    split_task_names(names)
    run_dir = None if run_dir is None else Path(run_dir)
    target = Path(output) if output is not None else (run_dir / "zeroshot.json" if run_dir is not None else None)
    if target is None:
        raise UserError("output= (--output FILE.json) is needed with model=: where to write the results")
    result = zeroshot_job(run_dir=run_dir, model=model, tasks=names, limit=limit, batch_size=batch_size,
                          device=device, original=original, seed=seed, max_memory=max_memory,
                          offload_dir=None if offload_dir is None else Path(offload_dir), progress=progress)
    atomic_write_json(target, result)
    if run_dir is not None:
        refresh(run_dir)  # zeroshot.json goes with the run when it is replaced (--overwrite)
    return result
