"""`mixbits run` and `mixbits sweep`."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Optional

import typer

from mixbits.cli.common import (
    user_errors,
    app, console, setup_logging, run_config, CACHE, GPTQ_ACT_ORDER, GPTQ_CLIP, MODEL, DATASET, SEQLEN, CALIB_WINDOWS, DAMAGE, EVAL_WINDOWS,
    SEED, BITS, GROUP_SIZES, MIN_BITS, MAX_BITS, KEEP, PIN, TIE, QUANTIZER, DEVICE, VERBOSE, OVERWRITE,
)
from mixbits.config import IterativeConfig, TrainConfig
from mixbits.parsing import parse_names, parse_range, split_list
from mixbits.errors import UserError
from mixbits.outdir import claim, refresh, written_names
from mixbits.quant.spec import QuantSpec
from mixbits.report.console import print_results, print_sweep

_T = TrainConfig()
_I = IterativeConfig()


@app.command()
def run(
    model: str = MODEL,
    target_bpw: Optional[float] = typer.Option(None, help="average stored bits per weight over the block linears (default 3.25)"),
    target_size_mb: Optional[float] = typer.Option(None, help="size of the whole saved model in MB (10^6 bytes)"),
    output_dir: Path = typer.Option(Path("runs/demo"), help="where results, plan and model are written"),
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
    plan: Optional[Path] = typer.Option(None, help="quantize with this plan (JSON/YAML) instead of allocating one"),
    quantizer: str = QUANTIZER,
    damage: str = DAMAGE,
    cache: bool = CACHE,
    gptq_clip: bool = GPTQ_CLIP,
    gptq_act_order: bool = GPTQ_ACT_ORDER,
    qat: bool = typer.Option(False, help="then Block-AP of the mixed plan, starting from --quantizer's result"),
    qat_epochs: float = typer.Option(_T.epochs, help="Block-AP base epochs per block"),
    qat_train_size: int = typer.Option(_T.train_size, help="Block-AP training windows (EfficientQAT: 4096)"),
    qat_val_size: int = typer.Option(_T.val_size, help="validation windows that pick each block's best state"),
    qat_seqlen: int = typer.Option(_T.seqlen, help="tokens per training window (EfficientQAT: 2048)"),
    qat_schedule: str = typer.Option(_T.schedule, help="fixed, linear, sqrt, conservative or joint"),
    qat_total_epoch_budget: bool = typer.Option(False, help="rescale the schedule to the total epochs of fixed"),
    e2e: bool = typer.Option(False, help="after Block-AP, train the step sizes end to end (E2E-QP)"),
    baselines: bool = typer.Option(True, help="also quantize and score the uniform configs around the budget "
                                               "(--no-baselines: only the mixed model, e.g. to time the job)"),
    qat_baselines: bool = typer.Option(False, help="also train the uniform baselines (comparison at equal training)"),
    resume: bool = typer.Option(False, help="continue training from OUTPUT_DIR/checkpoint after a crash or kill"),
    iterative: bool = typer.Option(False, help="instead of a budget: quantize the least sensitive units first, a "
                                                "few per step, until validation perplexity rises by --max-ppl-increase"),
    iterative_spec: str = typer.Option(_I.spec.label, help="iterative: the config each unit moves to"),
    layers_per_iteration: int = typer.Option(_I.layers_per_iteration, help="iterative: units quantized per step"),
    max_ppl_increase: float = typer.Option(_I.max_ppl_increase, help="iterative: relative limit (0.01 = 1 percent)"),
    max_iterations: int = typer.Option(_I.max_iterations, help="iterative: most steps"),
    iterative_windows: int = typer.Option(_I.windows, help="iterative: validation windows scored per step"),
    tasks: str = typer.Option("", help="zero-shot tasks through lm-eval, comma list: bb_* (embedded, offline) or "
                                       "lm-eval names such as piqa,arc_easy,hellaswag,winogrande (need the hub)"),
    task_limit: Optional[int] = typer.Option(None, help="documents per zero-shot task (default: all)"),
    report: bool = typer.Option(True, help="write report.html and plots/ into OUTPUT_DIR"),
    compute_dtype: Optional[str] = typer.Option(None, help="float32, bfloat16 or float16 (default: float32 on CPU, "
                                                           "the checkpoint's dtype on CUDA)"),
    max_memory: Optional[str] = typer.Option(None, help="memory budget in accelerate's format, e.g. "
                                                        "cuda:0=20GiB,cpu=16GiB: the run predicts its peak first "
                                                        "and refuses when it would not fit"),
    offload_dir: Optional[Path] = typer.Option(None, help="keep block-boundary activations on disk in this folder"),
    stream: bool = typer.Option(True, help="work block by block from the checkpoint (--no-stream: the whole model "
                                           "in memory, the reference path)"),
    overwrite: bool = OVERWRITE,
    device: str = DEVICE,
    verbose: bool = VERBOSE,
) -> None:
    """Sensitivity -> optimal allocation -> quantization (-> Block-AP) -> evaluation, in one command."""
    setup_logging(verbose)
    if target_bpw is None and target_size_mb is None:
        target_bpw = 3.25
    from mixbits.pipeline import run as run_pipeline  # heavy imports only once arguments parse

    with user_errors():
        cfg = run_config(
            model=model, output_dir=output_dir, device=device, quantizer=quantizer, damage=damage, cache=cache, gptq_clip=gptq_clip, gptq_act_order=gptq_act_order,
            dataset=dataset, seqlen=seqlen,
            calib_windows=calib_windows, eval_windows=eval_windows, seed=seed, target_bpw=target_bpw,
            target_size_mb=target_size_mb, bits=bits, group_sizes=group_sizes, min_bits=min_bits, max_bits=max_bits,
            keep=keep, pin=pin, tie=tie, plan=plan)
        train_cfg = TrainConfig(
            dataset=dataset, train_size=qat_train_size, val_size=qat_val_size, seqlen=qat_seqlen, epochs=qat_epochs,
            schedule=qat_schedule, total_epoch_budget=qat_total_epoch_budget, init=quantizer, e2e=e2e, seed=seed)
        if not qat and train_cfg != TrainConfig(dataset=dataset, init=quantizer, seed=seed):
            raise UserError("--qat-* and --e2e options need --qat (Block-AP); add --qat or drop them")
        it_cfg = IterativeConfig(spec=QuantSpec.parse(iterative_spec), layers_per_iteration=layers_per_iteration,
                                 max_ppl_increase=max_ppl_increase, max_iterations=max_iterations,
                                 windows=iterative_windows)
        if not iterative and it_cfg != _I:
            raise UserError("--iterative-spec, --layers-per-iteration, --max-ppl-increase, --max-iterations and "
                             "--iterative-windows need --iterative; add it or drop them")
        cfg = replace(cfg, train=train_cfg if qat else None, baselines=baselines, train_baselines=qat_baselines,
                      resume=resume,
                      iterative=it_cfg if iterative else None, tasks=split_list(tasks), task_limit=task_limit,
                      report=report, overwrite=overwrite, compute_dtype=compute_dtype, max_memory=max_memory,
                      offload_dir=offload_dir, stream=stream)
        results = run_pipeline(cfg)
    print_results(console, results)
    console.print(f"wrote {output_dir}/{', '.join(written_names(output_dir))}")



@app.command()
def sweep(
    bpw: str = typer.Option("2.5:4.5:0.25", help="budgets: LO:HI:STEP (inclusive) or a comma list"),
    strategies: str = typer.Option("all", help="comma list of strategies, or all"),
    uniform: bool = typer.Option(True, help="also evaluate every uniform candidate config at its own size"),
    model: str = MODEL,
    output_dir: Path = typer.Option(Path("runs/sweep"), help="where sweep.json and the plots are written"),
    dataset: str = DATASET,
    seqlen: int = SEQLEN,
    calib_windows: int = CALIB_WINDOWS,
    eval_windows: int = typer.Option(8, help="test windows to score each plan on; 0 = the whole split"),
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
    """One sensitivity measurement, every budget x strategy solved and evaluated; perplexity vs bpw and MB."""
    setup_logging(verbose)
    from mixbits.allocate.registry import STRATEGIES
    from mixbits.report.sweep_plots import plot_sweep
    from mixbits.jobs.sweep import SweepConfig, run_sweep

    with user_errors():
        budgets = parse_range(bpw)
        run_cfg = run_config(
            model=model, output_dir=output_dir, device=device, quantizer=quantizer, damage=damage, cache=cache, gptq_clip=gptq_clip, gptq_act_order=gptq_act_order,
            dataset=dataset, seqlen=seqlen,
            calib_windows=calib_windows, eval_windows=eval_windows, seed=seed, target_bpw=max(budgets),
            target_size_mb=None, bits=bits, group_sizes=group_sizes, min_bits=min_bits, max_bits=max_bits,
            keep=keep, pin=pin, tie=tie)
        names = parse_names(strategies, tuple(STRATEGIES))
        with claim(output_dir, "sweep", overwrite=overwrite, command="mixbits sweep"):
            results = run_sweep(SweepConfig(run=run_cfg, budgets_bpw=budgets, strategies=names, uniform=uniform))
    for x in ("bpw", "mb"):
        plot_sweep(results, output_dir / f"ppl_vs_{x}.png", x=x)
    refresh(output_dir)  # the plots belong to the sweep's output
    print_sweep(console, results)
    console.print(f"wrote {output_dir}/sweep.json, ppl_vs_bpw.png, ppl_vs_mb.png")
