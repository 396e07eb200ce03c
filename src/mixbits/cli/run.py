"""`mixbits run` and `mixbits sweep`."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import typer

from mixbits import commands
from mixbits.cli.common import VERBOSE, app, console, setup_logging, user_errors
from mixbits.cli.options import SHARED, RunOptions, run_options
from mixbits.config import DataConfig, RunConfig
from mixbits.outdir import claim, refresh, written_names
from mixbits.parsing import parse_names, parse_range
from mixbits.report.console import print_results, print_sweep

@app.command()
@run_options()
def run(verbose: bool = VERBOSE, *, options: RunOptions) -> None:
    """Sensitivity -> optimal allocation -> quantization (-> Block-AP) -> evaluation, in one command.

    Every option is a field of RunConfig; --recipe FILE sets them from YAML, typed flags override it."""
    setup_logging(verbose)
    with user_errors():
        cfg = options.config()
        results = commands.run(cfg)
    print_results(console, results)
    console.print(f"wrote {cfg.output_dir}/{', '.join(written_names(cfg.output_dir))}")


@app.command()
@run_options(SHARED, base=RunConfig(output_dir=Path("runs/sweep"), data=DataConfig(eval_windows=8)),
             helps={"output_dir": "where sweep.json and the plots are written",
                    "eval_windows": "test windows to score each plan on; 0 = the whole split"})
def sweep(
    bpw: str = typer.Option("2.5:4.5:0.25", help="budgets: LO:HI:STEP (inclusive) or a comma list"),
    strategies: str = typer.Option("all", help="comma list of strategies, or all"),
    uniform: bool = typer.Option(True, help="also evaluate every uniform candidate config at its own size"),
    verbose: bool = VERBOSE,
    *,
    options: RunOptions,
) -> None:
    """One sensitivity measurement, every budget x strategy solved and evaluated; perplexity vs bpw and MB."""
    setup_logging(verbose)
    from mixbits.allocate.registry import STRATEGIES
    from mixbits.report.sweep_plots import plot_sweep
    from mixbits.jobs.sweep import SweepConfig, run_sweep

    with user_errors():
        budgets = parse_range(bpw)
        run_cfg = options.config({"allocation.target_bpw": max(budgets), "allocation.target_size_mb": None})
        output_dir, overwrite = run_cfg.output_dir, run_cfg.overwrite
        run_cfg = replace(run_cfg, overwrite=False)  # the sweep's folder is claimed here, as a whole
        names = parse_names(strategies, tuple(STRATEGIES))
        with claim(output_dir, "sweep", overwrite=overwrite, command="mixbits sweep"):
            results = run_sweep(SweepConfig(run=run_cfg, budgets_bpw=budgets, strategies=names, uniform=uniform))
    for x in ("bpw", "mb"):
        plot_sweep(results, output_dir / f"ppl_vs_{x}.png", x=x)
    refresh(output_dir)  # the plots belong to the sweep's output
    print_sweep(console, results)
    console.print(f"wrote {output_dir}/sweep.json, ppl_vs_bpw.png, ppl_vs_mb.png")
