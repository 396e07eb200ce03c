"""The command line: one subcommand per stage. Every flag is a config field; the work is in
`pipeline`. Errors from bad input are printed as one line with the fix, exit code 2."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.table import Table

from mixbits.data.errors import MixbitsDataError
from mixbits.train.config import TrainConfig
from mixbits.report.console import print_analysis, print_results, print_sweep
from mixbits.config import DEFAULT_BITS, DEFAULT_GROUPS, AllocationConfig, DataConfig, RunConfig

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Sensitivity-guided mixed-precision quantization.")
console = Console(width=None if sys.stdout.isatty() else 120)  # logs and pipes get whole tables


@app.callback()
def _root() -> None:
    """mixbits: for a size you choose, the best quantized model, with the evidence."""


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False)],
        force=True,
    )


def _ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise typer.BadParameter(f"{flag} {text!r} must be comma-separated integers, e.g. 2,3,4") from None


def _groups(text: str) -> tuple[int | None, ...]:
    out = []
    for x in text.split(","):
        x = x.strip().lower()
        if x:
            out.append(None if x in ("pc", "none", "-1") else int(x))
    return tuple(out)


# Options shared by the commands that build a RunConfig (typer reads these as metadata only).
MODEL = typer.Option("smollm2-135m", help="embedded name, Hugging Face hub id, or local HF folder")
DATASET = typer.Option("wiki", help="wiki, canterbury, wikitext2, c4, or a .txt/.jsonl path")
SEQLEN = typer.Option(DataConfig.seqlen, help="tokens per window (2048 for paper numbers)")
CALIB_WINDOWS = typer.Option(DataConfig.calib_windows, help="calibration windows for sensitivity")
EVAL_WINDOWS = typer.Option(DataConfig.eval_windows, help="test windows to score; 0 = the whole split")
SEED = typer.Option(0, help="seed of the calibration window sampler")
BITS = typer.Option(",".join(map(str, DEFAULT_BITS)), help="candidate bit-widths")
GROUP_SIZES = typer.Option(",".join(map(str, DEFAULT_GROUPS)), help="candidate group sizes (pc = per-channel)")
MIN_BITS = typer.Option(2, help="no layer below this many bits")
MAX_BITS = typer.Option(16, help="no layer above this many bits (16 = may keep layers)")
KEEP = typer.Option(None, help="regex of layers kept in 16 bit")
PIN = typer.Option([], help="REGEX=BITS or REGEX=SPEC, e.g. down_proj=4 (repeatable)")
TIE = typer.Option(True, help="fused layers (q/k/v, gate/up) share one config")
QUANTIZER = typer.Option("rtn", help="rtn (round-to-nearest), clip (clipping search) or gptq")
DEVICE = typer.Option("auto", help="auto, cpu, cuda, cuda:1 ...")
VERBOSE = typer.Option(True, help="log each stage")


def _run_config(*, model, output_dir, device, quantizer, dataset, seqlen, calib_windows, eval_windows, seed,
                target_bpw, target_size_mb, bits, group_sizes, min_bits, max_bits, keep, pin, tie, plan=None) -> RunConfig:
    return RunConfig(
        model=model, output_dir=output_dir, device=device, plan=plan, quantizer=quantizer,
        data=DataConfig(dataset=dataset, seqlen=seqlen, calib_windows=calib_windows, eval_windows=eval_windows, seed=seed),
        allocation=AllocationConfig(
            target_bpw=target_bpw, target_size_mb=target_size_mb, bits=_ints(bits, "--bits"),
            group_sizes=_groups(group_sizes), min_bits=min_bits, max_bits=max_bits, keep=keep, pins=tuple(pin), tie=tie,
        ),
    )


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
    device: str = DEVICE,
    verbose: bool = VERBOSE,
) -> None:
    """Sensitivity -> optimal allocation -> round-to-nearest -> evaluation, in one command."""
    _setup_logging(verbose)
    if target_bpw is None and target_size_mb is None:
        target_bpw = 3.25
    from mixbits.pipeline import run as run_pipeline  # heavy imports only once arguments parse

    try:
        cfg = _run_config(
            model=model, output_dir=output_dir, device=device, quantizer=quantizer, dataset=dataset, seqlen=seqlen,
            calib_windows=calib_windows, eval_windows=eval_windows, seed=seed, target_bpw=target_bpw,
            target_size_mb=target_size_mb, bits=bits, group_sizes=group_sizes, min_bits=min_bits, max_bits=max_bits,
            keep=keep, pin=pin, tie=tie, plan=plan)
        results = run_pipeline(cfg)
    except (ValueError, FileNotFoundError, MixbitsDataError) as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from None
    print_results(console, results)
    console.print(f"wrote {output_dir}/results.json, layer_statistics.json, plan.json, sensitivity.json, model/")



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
    device: str = DEVICE,
    verbose: bool = VERBOSE,
) -> None:
    """One sensitivity measurement, every budget x strategy solved and evaluated; perplexity vs bpw and MB."""
    _setup_logging(verbose)
    from mixbits.allocate.registry import STRATEGIES
    from mixbits.report.sweep_plots import plot_sweep
    from mixbits.sweep import SweepConfig, parse_range, run_sweep

    try:
        budgets = parse_range(bpw)
        run_cfg = _run_config(
            model=model, output_dir=output_dir, device=device, quantizer=quantizer, dataset=dataset, seqlen=seqlen,
            calib_windows=calib_windows, eval_windows=eval_windows, seed=seed, target_bpw=max(budgets),
            target_size_mb=None, bits=bits, group_sizes=group_sizes, min_bits=min_bits, max_bits=max_bits,
            keep=keep, pin=pin, tie=tie)
        names = tuple(STRATEGIES) if strategies == "all" else tuple(x.strip() for x in strategies.split(",") if x.strip())
        results = run_sweep(SweepConfig(run=run_cfg, budgets_bpw=budgets, strategies=names, uniform=uniform))
    except (ValueError, FileNotFoundError, MixbitsDataError) as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from None
    for x in ("bpw", "mb"):
        plot_sweep(results, output_dir / f"ppl_vs_{x}.png", x=x)
    print_sweep(console, results)
    console.print(f"wrote {output_dir}/sweep.json, ppl_vs_bpw.png, ppl_vs_mb.png")


def _labels(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


@app.command()
def analyze(
    model: str = MODEL,
    dataset: str = DATASET,
    methods: str = typer.Option("fisher,gradient,output_error",
                                help="comma list of fisher, gradient, hessian, output_error, divergence, ablation"),
    granularity: str = typer.Option("layer", help="layer (each linear) or block (all linears of a block together)"),
    calib_windows: int = CALIB_WINDOWS,
    seqlen: int = SEQLEN,
    seed: int = typer.Option(0, help="seed of the calibration window sampler and of random probes"),
    bits: str = BITS,
    group_sizes: str = GROUP_SIZES,
    measure_configs: Optional[str] = typer.Option(None, help="configs measured methods run, e.g. w2g128,w4g128 (default all)"),
    validate: bool = typer.Option(True, help="rank-correlate every method with measured damage on held-out text"),
    validate_configs: str = typer.Option("w2g128,w3g128", help="configs compared in validation"),
    validate_windows: int = typer.Option(8, help="held-out windows (validation split) for measured damage"),
    validate_with: str = typer.Option("divergence", help="measured damage for validation: divergence (KL) or ablation (ΔPPL)"),
    output_dir: Path = typer.Option(Path("runs/analyze"), help="where sensitivity.json, validation.json, plots/ go"),
    sensitivity_file: Optional[Path] = typer.Option(None, help='import {"sensitivity_scores": [one per block]}'),
    cache: bool = typer.Option(True, help="reuse tables cached under MIXBITS_HOME/cache/sensitivity"),
    device: str = DEVICE,
    verbose: bool = VERBOSE,
) -> None:
    """Sensitivity by several methods, validated against measured damage; writes tables and plots."""
    _setup_logging(verbose)
    from mixbits.sensitivity.analyze import AnalyzeConfig, analyze as run_analyze  # heavy imports after parsing

    try:
        cfg = AnalyzeConfig(
            model=model, dataset=dataset, methods=_labels(methods), granularity=granularity,
            calib_windows=calib_windows, seqlen=seqlen, seed=seed, bits=_ints(bits, "--bits"),
            group_sizes=_groups(group_sizes),
            measure_configs=None if measure_configs is None else _labels(measure_configs),
            validate=validate, validate_configs=_labels(validate_configs), validate_windows=validate_windows,
            validate_with=validate_with, output_dir=output_dir, sensitivity_file=sensitivity_file,
            device=device, progress=verbose, use_cache=cache,
        )
        summary = run_analyze(cfg)
    except (ValueError, FileNotFoundError, MixbitsDataError) as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from None
    print_analysis(console, summary)
    console.print("wrote " + ", ".join(summary["files"].values()) + f", {output_dir}/analysis.json")


@app.command()
def allocate(
    sensitivity: Path = typer.Argument(..., help="sensitivity.json written by `mixbits run` or `mixbits analyze`"),
    strategy: str = typer.Option("optimal", help="strategy name, several separated by commas, or 'all'"),
    target_bpw: Optional[float] = typer.Option(None, help="average stored bits per weight over the block linears"),
    target_size_mb: Optional[float] = typer.Option(None, help="whole saved model in MB; needs --fixed-bytes"),
    fixed_bytes: Optional[int] = typer.Option(None, help="bytes stored outside the block linears (results.json other_bytes_fp16)"),
    bits: Optional[str] = typer.Option(None, help="candidate bit-widths (default: all in the table)"),
    group_sizes: Optional[str] = typer.Option(None, help="candidate group sizes, pc = per-channel (default: all in the table)"),
    min_bits: int = MIN_BITS,
    max_bits: int = MAX_BITS,
    keep: Optional[str] = KEEP,
    pin: list[str] = PIN,
    tie: bool = TIE,
    score: Optional[str] = typer.Option(None, help="score the heuristics rank by (default: the table's first; damage:w4g128 works)"),
    alpha: float = typer.Option(0.5, help="exponent of the power-law and adaptive rules"),
    spec: Optional[str] = typer.Option(None, help="spec of --strategy uniform, e.g. w4g128 (default: richest within the budget)"),
    output: Optional[Path] = typer.Option(None, help="write the (first) strategy's plan here, JSON or .yaml"),
) -> None:
    """Allocate bits from a saved sensitivity table with any strategy; compare several at once."""
    from mixbits.allocate.command import allocate_from_table

    try:
        results, table = allocate_from_table(
            sensitivity, strategy=strategy, target_bpw=target_bpw, target_size_mb=target_size_mb,
            fixed_bytes=fixed_bytes, bits=_ints(bits, "--bits") if bits else None,
            group_sizes=_groups(group_sizes) if group_sizes else None, min_bits=min_bits, max_bits=max_bits,
            keep=keep, pins=tuple(pin), tie=tie, score=score, alpha=alpha, spec=spec, output=output)
    except (ValueError, FileNotFoundError, KeyError) as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from None
    from mixbits.allocate.registry import predicted_damage

    out = Table(title=f"{sensitivity} ({len(table.units)} units, {table.method} damage)")
    for col in ("strategy", "bpw", "target", "miss", "predicted damage", "rule"):
        out.add_column(col, justify="left" if col in ("strategy", "rule") else "right")
    for name, r in results.items():
        target = "-" if r.target_bpw is None else f"{r.target_bpw:.3f}"
        miss = "met" if r.miss == 0 else f"+{r.miss:.3f}"
        out.add_row(name, f"{r.bpw:.3f}", target, miss, f"{predicted_damage(table, r.specs):.4g}", escape(r.rule))
    console.print(out)
    if output is not None and results:
        console.print(f"wrote {output} ({next(iter(results))})")


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
    device: str = DEVICE,
    verbose: bool = VERBOSE,
) -> None:
    """Block-AP (then optionally E2E-QP) of a model quantized by a plan; evaluated against its init."""
    _setup_logging(verbose)
    from mixbits.train.command import train_command  # heavy imports only once arguments parse

    try:
        cfg = TrainConfig(
            dataset=dataset, train_size=train_size, val_size=val_size, seqlen=seqlen, epochs=epochs,
            batch_size=batch_size, quant_lr=quant_lr, weight_lr=weight_lr, patience=patience, schedule=schedule,
            total_epoch_budget=total_epoch_budget, init=qat_init, offload=offload, e2e=e2e, e2e_epochs=e2e_epochs,
            e2e_lr=e2e_lr, seed=seed)
        results = train_command(model=model, plan=plan, output_dir=output_dir, cfg=cfg,
                                sensitivity_file=sensitivity_file, device=device, resume=resume,
                                eval_windows=eval_windows, progress=verbose)
    except (ValueError, FileNotFoundError, MixbitsDataError) as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from None
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


EXPORT_FORMATS = ("native", "gptq", "compressed", "gguf")


@app.command("export")
def export_cmd(
    fmt: str = typer.Option(..., "--format", "-f", help=f"one of {', '.join(EXPORT_FORMATS)}"),
    run_dir: Path = typer.Option(..., help="output folder of `mixbits run` (holds model/ and results.json)"),
    out: Optional[Path] = typer.Option(None, help="where to write; default RUN_DIR/export-FORMAT (gguf: .../model.gguf)"),
    nearest: bool = typer.Option(False, help="if the format cannot store the plan, export the nearest plan it can "
                                             "(bits rounded up; changed layers re-quantized from the original model)"),
    gptq_format: str = typer.Option("gptq", help="GPTQ checkpoint_format: gptq (v1, widest support) or gptq_v2"),
    gguf_regroup: str = typer.Option("repeat", help="GGUF: repeat (keep the plan's codes and scales) or "
                                                    "requantize (fresh min-max per 32-block)"),
    gguf_pre: str = typer.Option("default", help="GGUF tokenizer.ggml.pre for llama.cpp, e.g. smollm, llama-bpe"),
    verbose: bool = VERBOSE,
) -> None:
    """Write a run's model in a format an inference engine loads, keeping its codes and scales."""
    _setup_logging(verbose)
    if fmt not in EXPORT_FORMATS:
        raise typer.BadParameter(f"--format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    from mixbits.export.formats import expressible, export as export_model, fused_groups, nearest_plan
    from mixbits.export.from_native import load_for_export, with_plan
    from mixbits.model.apply import layer_shapes
    from mixbits.model.load import load_model

    options = {"gptq": {"checkpoint_format": gptq_format},
               "gguf": {"regroup": gguf_regroup, "tokenizer_pre": gguf_pre}}.get(fmt, {})
    target = out or run_dir / f"export-{fmt}"
    try:
        source = load_for_export(run_dir / "model")
        shapes, fused = layer_shapes(source.model), fused_groups(source.model)
        if nearest and expressible(fmt, source.plan, shapes, fused):
            name = json.loads((run_dir / "results.json").read_text())["config"]["model"]
            original, _ = load_model(name)
            plan = nearest_plan(fmt, source.plan, shapes, fused)
            source = with_plan(source, original, plan)
            console.print(f"the plan was adjusted to what {fmt} stores (bits rounded up); changed layers re-quantized")
        path = export_model(source.model, source.plan, target, fmt, source.tokenizer, source.qparams, **options)
        if nearest and path.is_file():  # folder formats record their plan in mixbits-export.json / mixbits.json
            source.plan.save(path.with_suffix(".plan.json"))
    except (ValueError, FileNotFoundError, MixbitsDataError) as err:  # ExportError is a ValueError
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from None
    console.print(f"wrote {path}")
