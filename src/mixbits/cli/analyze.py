"""`mixbits analyze` and `mixbits allocate`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from mixbits.outdir import claim
from mixbits.cli.options import option
from mixbits.cli.common import (
    user_errors,
    OVERWRITE, app, console, setup_logging, MODEL, DATASET, SEQLEN,
    CALIB_WINDOWS, BITS, GROUP_SIZES, MIN_BITS, MAX_BITS, KEEP, PIN, TIE, DEVICE, VERBOSE,
)
from mixbits.parsing import parse_group_sizes, parse_ints, split_list
from mixbits.report.console import print_analysis


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
    cache: bool = typer.Option(True, help="reuse tables cached under $MIXBITS_CACHE_DIR/sensitivity (default MIXBITS_HOME/cache)"),
    overwrite: bool = OVERWRITE,
    device: str = DEVICE,
    compute_dtype: Optional[str] = option("compute_dtype"),
    offload_dir: Optional[Path] = option("offload_dir"),
    stream: bool = option("stream"),
    verbose: bool = VERBOSE,
) -> None:
    """Sensitivity by several methods, validated against measured damage; writes tables and plots.
    `--methods fisher --no-validate` streams the model block by block (the other options load it whole)."""
    setup_logging(verbose)
    from mixbits.jobs.analyze import AnalyzeConfig, analyze as run_analyze  # heavy imports after parsing

    with user_errors():
        cfg = AnalyzeConfig(
            model=model, dataset=dataset, methods=split_list(methods), granularity=granularity,
            calib_windows=calib_windows, seqlen=seqlen, seed=seed, bits=parse_ints(bits),
            group_sizes=parse_group_sizes(group_sizes),
            measure_configs=None if measure_configs is None else split_list(measure_configs),
            validate=validate, validate_configs=split_list(validate_configs), validate_windows=validate_windows,
            validate_with=validate_with, output_dir=output_dir, sensitivity_file=sensitivity_file,
            device=device, progress=verbose, use_cache=cache, compute_dtype=compute_dtype, offload_dir=offload_dir,
            stream=stream,
        )
        with claim(output_dir, "analyze", overwrite=overwrite, command="mixbits analyze"):
            summary = run_analyze(cfg)
    print_analysis(console, summary)
    console.print("wrote " + ", ".join(summary["files"].values()) + f", {output_dir}/analysis.json")


@app.command()
def allocate(
    sensitivity: Path = typer.Argument(..., help="sensitivity.json written by `mixbits run` or `mixbits analyze`"),
    strategy: str = typer.Option("optimal", help="strategy name, several separated by commas, or 'all'"),
    target_bpw: Optional[float] = typer.Option(None, help="average stored bits per weight over the block linears"),
    target_size_mb: Optional[float] = typer.Option(
        None, help="size in MB (10^6 bytes) of the file the plan is stored as: with ggml candidates (--candidates "
                   "gguf|both, or a table over them) the GGUF file `mixbits export --format gguf` writes (tensors, "
                   "header, tokenizer; read from --model), never exceeded; else the native model (needs --fixed-bytes)"),
    fixed_bytes: Optional[int] = typer.Option(None, help="bytes stored outside the block linears (results.json other_bytes_fp16)"),
    candidates: Optional[str] = typer.Option(
        None, help="affine (bits x group sizes), gguf (the ggml types, each only where a layer's row allows it) or "
                   "both; default: every config of the table"),
    model: Optional[str] = typer.Option(None, help="GGUF size budgets: the model whose config and tokenizer the "
                                                   "file holds (default: the table's model)"),
    gguf_pre: str = typer.Option("default", help="GGUF size budgets: tokenizer.ggml.pre the export will write "
                                                 "(pass the same --gguf-pre to `mixbits export`)"),
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
    from mixbits.jobs.allocate import allocate_from_table

    with user_errors():
        done = allocate_from_table(
            sensitivity, strategy=strategy, target_bpw=target_bpw, target_size_mb=target_size_mb,
            fixed_bytes=fixed_bytes, bits=parse_ints(bits) if bits else None,
            group_sizes=parse_group_sizes(group_sizes) if group_sizes else None, min_bits=min_bits, max_bits=max_bits,
            keep=keep, pins=tuple(pin), tie=tie, score=score, alpha=alpha, spec=spec, output=output,
            candidates=candidates, model=model, gguf_pre=gguf_pre)
    from mixbits.allocate.registry import predicted_damage

    results, table = done.results, done.table
    out = Table(title=f"{sensitivity} ({len(table.units)} units, {table.method} damage)")
    columns = ("strategy", "bpw", "target", "miss", "predicted damage") + (("GGUF bytes",) if done.file_bytes else ())
    for col in columns + ("rule",):
        out.add_column(col, justify="left" if col in ("strategy", "rule") else "right")
    for name, r in results.items():
        target = "-" if r.target_bpw is None else f"{r.target_bpw:.3f}"
        miss = "met" if r.miss == 0 else f"+{r.miss:.3f}"
        size = (f"{done.file_bytes[name]:,}",) if done.file_bytes else ()
        out.add_row(name, f"{r.bpw:.3f}", target, miss, f"{predicted_damage(table, r.specs):.4g}", *size, escape(r.rule))
    console.print(out)
    if done.file_bytes:
        console.print(f"GGUF file sizes predicted exactly; target {done.target_bytes:,} bytes (bpw: GGUF bits of the "
                      "block linears per weight)")
    if output is not None and results:
        console.print(f"wrote {output} ({next(iter(results))})")
