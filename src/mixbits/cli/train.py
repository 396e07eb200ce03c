"""`mixbits train`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from mixbits.cli.common import (
    user_errors,
    app, console, setup_logging, MODEL, DATASET, EVAL_WINDOWS, SEED, DEVICE, VERBOSE,
)
from mixbits.cli.common import OVERWRITE
from mixbits.config import TrainConfig
from mixbits.outdir import claim


_T = TrainConfig()


@app.command()
def train(
    plan: Path = typer.Argument(..., help="plan.json (or .yaml) written by `mixbits run` or `mixbits allocate`"),
    model: str = MODEL,
    output_dir: Path = typer.Option(Path("runs/train"), help="where model/, train_report.json, checkpoint/ go"),
    dataset: str = DATASET,
    train_size: int = typer.Option(_T.train_size, help="training windows (EfficientQAT: 4096)"),
    val_size: int = typer.Option(_T.val_size, help="validation windows that pick each block's best state (64)"),
    seqlen: int = typer.Option(_T.seqlen, help="tokens per window (2048)"),
    epochs: float = typer.Option(_T.epochs, help="base epochs per block; a schedule scales them"),
    batch_size: int = typer.Option(_T.batch_size, help="windows per step"),
    quant_lr: float = typer.Option(_T.quant_lr, help="lr of the scales and zero-points"),
    weight_lr: Optional[float] = typer.Option(None, help="lr of the weights (default 2e-5 at 2 bits, 1e-5 above)"),
    schedule: str = typer.Option(_T.schedule, help="fixed, linear, sqrt, conservative or joint (all but fixed need --sensitivity-file)"),
    total_epoch_budget: bool = typer.Option(False, help="rescale the schedule to the total epochs of fixed"),
    patience: Optional[int] = typer.Option(None, help="stop a block after this many epochs without improvement"),
    qat_init: str = typer.Option(_T.init, help="starting point of every block: rtn, clip or gptq"),
    sensitivity_file: Optional[Path] = typer.Option(None, help='{"sensitivity_scores": [one per block]}'),
    e2e: bool = typer.Option(False, help="then train the step sizes end to end (E2E-QP)"),
    e2e_epochs: float = typer.Option(_T.e2e_epochs, help="E2E-QP epochs"),
    e2e_lr: Optional[float] = typer.Option(None, help="E2E-QP lr (default 2e-5 at 2 bits, 1e-5 above)"),
    offload: bool = typer.Option(False, help="keep block activations on disk instead of in CPU memory"),
    resume: bool = typer.Option(False, help="continue a killed run from OUTPUT_DIR/checkpoint"),
    eval_windows: int = EVAL_WINDOWS,
    seed: int = SEED,
    overwrite: bool = OVERWRITE,
    device: str = DEVICE,
    verbose: bool = VERBOSE,
) -> None:
    """Block-AP (then optionally E2E-QP) of a model quantized by a plan; evaluated against its init."""
    setup_logging(verbose)
    from mixbits.jobs.train import train_command  # heavy imports only once arguments parse

    with user_errors():
        cfg = TrainConfig(
            dataset=dataset, train_size=train_size, val_size=val_size, seqlen=seqlen, epochs=epochs,
            batch_size=batch_size, quant_lr=quant_lr, weight_lr=weight_lr, patience=patience, schedule=schedule,
            total_epoch_budget=total_epoch_budget, init=qat_init, offload=offload, e2e=e2e, e2e_epochs=e2e_epochs,
            e2e_lr=e2e_lr, seed=seed)
        with claim(output_dir, "train", overwrite=overwrite, resume=resume, command="mixbits train"):
            results = train_command(model=model, plan=plan, output_dir=output_dir, cfg=cfg,
                                    sensitivity_file=sensitivity_file, device=device, resume=resume,
                                    eval_windows=eval_windows, progress=verbose)
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
