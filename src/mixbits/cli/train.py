"""`mixbits train`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from mixbits.cli.common import DEVICE, EVAL_WINDOWS, MODEL, OVERWRITE, VERBOSE, app, console, setup_logging, user_errors
from mixbits.cli.fields import ConfigOptions, config_options
from mixbits.cli.options import FLAGS
from mixbits.config import TrainConfig
from mixbits import commands


TRAIN_HELPS = {
    "dataset": FLAGS["dataset"].help,
    "train_size": "training windows (EfficientQAT: 4096)",
    "val_size": "validation windows that pick each block's best state (64)",
    "seqlen": "tokens per window (2048)",
    "epochs": "base epochs per block; a schedule scales them",
    "batch_size": "windows per step",
    "quant_lr": "lr of the scales and zero-points",
    "weight_lr": "lr of the weights (default 2e-5 at 2 bits, 1e-5 above)",
    "schedule": "fixed, linear, sqrt, conservative or joint (all but fixed need --sensitivity-file)",
    "total_epoch_budget": "rescale the schedule to the total epochs of fixed",
    "patience": "stop a block after this many epochs without improvement",
    "init": "starting point of every block: rtn, clip or gptq",
    "e2e": "then train the step sizes end to end (E2E-QP)",
    "e2e_epochs": "E2E-QP epochs",
    "e2e_lr": "E2E-QP lr (default 2e-5 at 2 bits, 1e-5 above)",
    "offload": "keep block activations on disk instead of in CPU memory",
    "seed": "seed of the window sampler and of each block's training",
}
# set in a recipe of `mixbits run --qat` only: the finer knobs (cli/options.py RECIPE_ONLY)
TRAIN_HIDDEN = ("min_lr_factor", "weight_decay", "grad_clip", "max_nonfinite", "offload_dir", "e2e_batch_size",
                "e2e_grad_clip")


@app.command()
@config_options(TrainConfig, TRAIN_HELPS, flags={"init": "qat_init"})
def train(
    plan: Path = typer.Argument(..., help="plan.json (or .yaml) written by `mixbits run` or `mixbits allocate`"),
    model: str = MODEL,
    output_dir: Path = typer.Option(Path("runs/train"), help="where model/, train_report.json, checkpoint/ go"),
    sensitivity_file: Optional[Path] = typer.Option(None, help='{"sensitivity_scores": [one per block]}'),
    resume: bool = typer.Option(False, help="continue a killed run in OUTPUT_DIR after its last finished block "
                                            "(same plan, model and settings; a changed setting is refused, naming it)"),
    eval_windows: int = EVAL_WINDOWS,
    overwrite: bool = OVERWRITE,
    device: str = DEVICE,
    verbose: bool = VERBOSE,
    *,
    options: ConfigOptions,
) -> None:
    """Block-AP (then optionally E2E-QP) of a model quantized by a plan; evaluated against its init."""
    setup_logging(verbose)
    with user_errors():
        cfg = options.config()
        results = commands.train(plan, cfg, model=model, output_dir=output_dir, sensitivity_file=sensitivity_file,
                                 device=device, resume=resume, eval_windows=eval_windows, overwrite=overwrite,
                                 progress=verbose)
    schedule = cfg.schedule
    table = Table(title=f"{model}: {results['training']['init']} init vs Block-AP ({schedule} schedule)")
    for col in ("model", "perplexity", "KL (nats/tok)", "top-1 agree"):
        table.add_column(col, justify="left" if col == "model" else "right", no_wrap=col == "model")
    for name, m in results["evaluation"]["models"].items():
        kl = "-" if name == "original" else f"{m['kl']:.4f}"
        top1 = "-" if name == "original" else f"{100 * m['top1']:.1f}%"
        table.add_row(name, f"{m['ppl']:.3f}", kl, top1)
    console.print(table)
    training = results["training"]
    console.print(f"blocks that kept their start: {training['kept_start_blocks'] or 'none'}; "
                  f"fell back after non-finite steps: {training['fallback_blocks'] or 'none'}")
    console.print(f"wrote {output_dir}/model, train_report.json, train_statistics.json, checkpoint/")
