"""`mixbits compare` and `mixbits ablate`: the experiment jobs of `mixbits.jobs`, each flag a
config field; the work, the resume logic and the files are in that package."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from mixbits.outdir import claim, refresh
from mixbits.cli.common import VERBOSE, app, console, setup_logging, user_errors
from mixbits.cli.options import SHARED, RunOptions, flags_in, run_options
from mixbits.config import DataConfig, RunConfig
from mixbits.jobs.experiment_config import ABLATE_TRAIN, DEFAULT_BUDGETS, SECTIONS, SEED_STRATEGIES
from mixbits.parsing import parse_range, split_list
from mixbits.config import SCHEDULES


def _models(given: list[str], extra: Optional[list[str]]) -> tuple[str, ...]:
    """--models a,b --models c and positional names (so `--models a b c` works) -> (a, b, c)."""
    return tuple(m for text in given for m in split_list(text)) + tuple(extra or ())


@app.command()
@run_options(tuple(n for n in SHARED if n != "model") + ("target_bpw", "target_size_mb"),
             base=RunConfig(model="", output_dir=Path("runs/compare")),
             helps={"output_dir": "one folder per model, the summary and the plot",
                    "target_size_mb": "size of each whole saved model in MB (10^6 bytes)"})
def compare(
    extra_models: Optional[list[str]] = typer.Argument(None, metavar="MODELS", show_default=False,
                                                       help="more models (so `--models a b c` works)"),
    models: list[str] = typer.Option([], "--models", help="models to compare: embedded names, hub ids or local HF "
                                                          "folders (repeat, comma-separate, or list after it)"),
    resume: bool = typer.Option(False, help="skip models whose results.json exists with the same config"),
    verbose: bool = VERBOSE,
    *,
    options: RunOptions,
) -> None:
    """The whole `run` job on each model, then one summary, one analysis file per model and a plot."""
    setup_logging(verbose)
    from mixbits.jobs.compare import CompareFailed, run_compare
    from mixbits.jobs.experiment_config import CompareConfig
    from mixbits.report.comparison_report import write_comparison_report
    from mixbits.report.experiment_plots import plot_comparison
    from mixbits.report.experiment_tables import print_comparison

    with user_errors():
        names = _models(models, extra_models)
        shared = options.config({"model": names[0]} if names else None)
        output_dir, overwrite = shared.output_dir, shared.overwrite
        shared = replace(shared, overwrite=False)  # the comparison's folder is claimed here, as a whole
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
        console.print(f"[red]error:[/red] {escape(flags_in(str(failure)))}", soft_wrap=True)
        raise typer.Exit(1)


def _read_summary(output_dir: Path) -> dict:
    return json.loads((output_dir / "comparison_summary.json").read_text())


@app.command()
@run_options(SHARED + ("target_bpw",), base=RunConfig(output_dir=Path("runs/ablate"), data=DataConfig(eval_windows=8)),
             helps={"output_dir": "where ablation.json, ablation.png, plans/ go",
                    "eval_windows": "test windows every model is scored on; 0 = the whole split",
                    "target_bpw": "budget of the training section's plan (and of non-preset strategies)"})
def ablate(
    sections: str = typer.Option(",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}"),
    strategies: str = typer.Option(",".join(SEED_STRATEGIES), help="heuristics of the strategy section, each beside "
                                   "optimal at its size (presets at the seed's 5.0 / 4.0 / 3.0 bpw)"),
    budgets: str = typer.Option(",".join(f"{b:g}" for b in DEFAULT_BUDGETS),
                                help="budget section: bpw list or LO:HI:STEP"),
    qat_schedules: str = typer.Option(",".join(SCHEDULES), help="training arms, each at fixed's total epochs "
                                      "(X+e2e: then E2E-QP)"),
    qat_init: Optional[str] = typer.Option(None, help="the start Block-AP trains from (default: --quantizer)"),
    qat_epochs: float = typer.Option(ABLATE_TRAIN.epochs, help="Block-AP base epochs per block"),
    qat_train_size: int = typer.Option(ABLATE_TRAIN.train_size, help="Block-AP training windows"),
    qat_val_size: int = typer.Option(ABLATE_TRAIN.val_size, help="validation windows that pick each block's state"),
    qat_seqlen: int = typer.Option(ABLATE_TRAIN.seqlen, help="tokens per training window"),
    resume: bool = typer.Option(False, help="keep finished sections (and training checkpoints) of OUTPUT_DIR"),
    verbose: bool = VERBOSE,
    *,
    options: RunOptions,
) -> None:
    """The seed's ablations on one model, one calibration set, one test set, one sensitivity table."""
    setup_logging(verbose)
    from mixbits.jobs.ablate import run_ablation
    from mixbits.jobs.experiment_config import AblateConfig
    from mixbits.report.experiment_plots import plot_ablation
    from mixbits.report.experiment_tables import print_ablation
    from mixbits.config import TrainConfig

    with user_errors():
        run_cfg = options.config()
        output_dir, overwrite = run_cfg.output_dir, run_cfg.overwrite
        run_cfg = replace(run_cfg, overwrite=False)  # the ablation's folder is claimed here, as a whole
        quantizer, dataset, seed = run_cfg.quantizer, run_cfg.data.dataset, run_cfg.data.seed
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
