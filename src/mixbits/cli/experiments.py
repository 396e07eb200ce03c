"""`mixbits compare` and `mixbits ablate`: the experiment jobs of `mixbits.jobs`, each flag a
config field; the work, the resume logic and the files are in that package."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from mixbits.outdir import claim, refresh
from mixbits.cli.common import (
    user_errors,
    app, console, setup_logging, run_config, CACHE, GPTQ_ACT_ORDER, GPTQ_CLIP, MODEL, DATASET, SEQLEN, CALIB_WINDOWS, DAMAGE, EVAL_WINDOWS,
    SEED, BITS, GROUP_SIZES, MIN_BITS, MAX_BITS, KEEP, PIN, TIE, QUANTIZER, DEVICE, VERBOSE, OVERWRITE,
)
from mixbits.jobs.experiment_config import ABLATE_TRAIN, DEFAULT_BUDGETS, SECTIONS, SEED_STRATEGIES
from mixbits.parsing import parse_range, split_list
from mixbits.config import SCHEDULES


def _models(given: list[str], extra: Optional[list[str]]) -> tuple[str, ...]:
    """--models a,b --models c and positional names (so `--models a b c` works) -> (a, b, c)."""
    return tuple(m for text in given for m in split_list(text)) + tuple(extra or ())


@app.command()
def compare(
    extra_models: Optional[list[str]] = typer.Argument(None, metavar="MODELS", show_default=False,
                                                       help="more models (so `--models a b c` works)"),
    models: list[str] = typer.Option([], "--models", help="models to compare: embedded names, hub ids or local HF "
                                                          "folders (repeat, comma-separate, or list after it)"),
    target_bpw: Optional[float] = typer.Option(None, help="average stored bits per weight (default 3.25)"),
    target_size_mb: Optional[float] = typer.Option(None, help="size of each whole saved model in MB (10^6 bytes)"),
    output_dir: Path = typer.Option(Path("runs/compare"), help="one folder per model, the summary and the plot"),
    resume: bool = typer.Option(False, help="skip models whose results.json exists with the same config"),
    dataset: str = DATASET,
    seqlen: int = SEQLEN,
    calib_windows: int = CALIB_WINDOWS,
    eval_windows: int = EVAL_WINDOWS,
    seed: int = SEED,
    bits: str = BITS,
    group_sizes: str = GROUP_SIZES,
    min_bits: int = MIN_BITS,
    max_bits: int = MAX_BITS,
    keep: Optional[str] = KEEP,
    pin: list[str] = PIN,
    tie: bool = TIE,
    quantizer: str = QUANTIZER,
    damage: str = DAMAGE,
    cache: bool = CACHE,
    gptq_clip: bool = GPTQ_CLIP,
    gptq_act_order: bool = GPTQ_ACT_ORDER,
    overwrite: bool = OVERWRITE,
    device: str = DEVICE,
    verbose: bool = VERBOSE,
) -> None:
    """The whole `run` job on each model, then one summary, one analysis file per model and a plot."""
    setup_logging(verbose)
    if target_bpw is None and target_size_mb is None:
        target_bpw = 3.25
    from mixbits.jobs.compare import CompareFailed, run_compare
    from mixbits.jobs.experiment_config import CompareConfig
    from mixbits.report.comparison_report import write_comparison_report
    from mixbits.report.experiment_plots import plot_comparison
    from mixbits.report.experiment_tables import print_comparison

    with user_errors():
        names = _models(models, extra_models)
        shared = run_config(
            model=names[0] if names else "", output_dir=output_dir, device=device, quantizer=quantizer,
            damage=damage, cache=cache, gptq_clip=gptq_clip, gptq_act_order=gptq_act_order, dataset=dataset,
            seqlen=seqlen, calib_windows=calib_windows, eval_windows=eval_windows, seed=seed, target_bpw=target_bpw,
            target_size_mb=target_size_mb, bits=bits, group_sizes=group_sizes, min_bits=min_bits, max_bits=max_bits,
            keep=keep, pin=pin, tie=tie)
        cfg = CompareConfig(run=shared, models=names, output_dir=output_dir, resume=resume)
        with claim(output_dir, "compare", overwrite=overwrite, resume=resume, command="mixbits compare"):
            try:
                summary, failure = run_compare(cfg), None
            except CompareFailed as err:
                summary, failure = _read_summary(output_dir), err
    if summary["models"]:
        plot_comparison(summary, output_dir / "comparison.png")
        write_comparison_report(output_dir / "comparison_summary.json")
        refresh(output_dir)  # the plot and the page belong to the comparison's output
        print_comparison(console, summary)
        console.print(f"wrote {output_dir}/comparison_summary.json, comparison.png, comparison_report.html, "
                      "<model>_analysis.json, <model>/ (each with its report.html)")
    if failure is not None:
        console.print(f"[red]error:[/red] {failure}")
        raise typer.Exit(1)


def _read_summary(output_dir: Path) -> dict:
    return json.loads((output_dir / "comparison_summary.json").read_text())


@app.command()
def ablate(
    model: str = MODEL,
    output_dir: Path = typer.Option(Path("runs/ablate"), help="where ablation.json, ablation.png, plans/ go"),
    sections: str = typer.Option(",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}"),
    strategies: str = typer.Option(",".join(SEED_STRATEGIES), help="heuristics of the strategy section, each beside "
                                   "optimal at its size (presets at the seed's 5.0 / 4.0 / 3.0 bpw)"),
    budgets: str = typer.Option(",".join(f"{b:g}" for b in DEFAULT_BUDGETS),
                                help="budget section: bpw list or LO:HI:STEP"),
    target_bpw: float = typer.Option(3.25, help="budget of the training section's plan (and of non-preset strategies)"),
    qat_schedules: str = typer.Option(",".join(SCHEDULES), help="training arms, each at fixed's total epochs "
                                      "(X+e2e: then E2E-QP)"),
    qat_init: Optional[str] = typer.Option(None, help="the start Block-AP trains from (default: --quantizer)"),
    qat_epochs: float = typer.Option(ABLATE_TRAIN.epochs, help="Block-AP base epochs per block"),
    qat_train_size: int = typer.Option(ABLATE_TRAIN.train_size, help="Block-AP training windows"),
    qat_val_size: int = typer.Option(ABLATE_TRAIN.val_size, help="validation windows that pick each block's state"),
    qat_seqlen: int = typer.Option(ABLATE_TRAIN.seqlen, help="tokens per training window"),
    resume: bool = typer.Option(False, help="keep finished sections (and training checkpoints) of OUTPUT_DIR"),
    dataset: str = DATASET,
    seqlen: int = SEQLEN,
    calib_windows: int = CALIB_WINDOWS,
    eval_windows: int = typer.Option(8, help="test windows every model is scored on; 0 = the whole split"),
    seed: int = SEED,
    bits: str = BITS,
    group_sizes: str = GROUP_SIZES,
    min_bits: int = MIN_BITS,
    max_bits: int = MAX_BITS,
    keep: Optional[str] = KEEP,
    pin: list[str] = PIN,
    tie: bool = TIE,
    quantizer: str = QUANTIZER,
    damage: str = DAMAGE,
    cache: bool = CACHE,
    gptq_clip: bool = GPTQ_CLIP,
    gptq_act_order: bool = GPTQ_ACT_ORDER,
    overwrite: bool = OVERWRITE,
    device: str = DEVICE,
    verbose: bool = VERBOSE,
) -> None:
    """The seed's ablations on one model, one calibration set, one test set, one sensitivity table."""
    setup_logging(verbose)
    from mixbits.jobs.ablate import run_ablation
    from mixbits.jobs.experiment_config import AblateConfig
    from mixbits.report.experiment_plots import plot_ablation
    from mixbits.report.experiment_tables import print_ablation
    from mixbits.config import TrainConfig

    with user_errors():
        run_cfg = run_config(
            model=model, output_dir=output_dir, device=device, quantizer=quantizer, damage=damage, cache=cache,
            gptq_clip=gptq_clip, gptq_act_order=gptq_act_order, dataset=dataset, seqlen=seqlen,
            calib_windows=calib_windows, eval_windows=eval_windows, seed=seed, target_bpw=target_bpw,
            target_size_mb=None, bits=bits, group_sizes=group_sizes, min_bits=min_bits, max_bits=max_bits,
            keep=keep, pin=pin, tie=tie)
        train = TrainConfig(dataset=dataset, train_size=qat_train_size, val_size=qat_val_size, seqlen=qat_seqlen,
                            epochs=qat_epochs, init=qat_init or quantizer, seed=seed)
        cfg = AblateConfig(run=run_cfg, output_dir=output_dir, sections=split_list(sections),
                           strategies=split_list(strategies), budgets_bpw=parse_range(budgets), train=train,
                           schedules=split_list(qat_schedules), resume=resume)
        with claim(output_dir, "ablate", overwrite=overwrite, resume=resume, command="mixbits ablate"):
            results = run_ablation(cfg)
    plot_ablation(results, output_dir / "ablation.png")
    refresh(output_dir)
    print_ablation(console, results)
    console.print(f"wrote {output_dir}/ablation.json, ablation.png, sensitivity.json, plans/")
