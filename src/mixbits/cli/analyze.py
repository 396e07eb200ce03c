"""`mixbits analyze` and `mixbits allocate`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from mixbits.cli.common import (
    user_errors,
    OVERWRITE, app, console, setup_logging, MIN_BITS, MAX_BITS, KEEP, PIN, TIE, VERBOSE,
)
from mixbits.cli.fields import ConfigOptions, config_options
from mixbits.cli.options import FLAGS
from mixbits.jobs.analyze_config import AnalyzeConfig
from mixbits import commands
from mixbits.parsing import parse_group_sizes, parse_ints
from mixbits.report.console import print_analysis


ANALYZE_HELPS = {
    **{name: FLAGS[name].help for name in ("model", "dataset", "calib_windows", "seqlen", "bits", "group_sizes",
                                           "device", "compute_dtype", "offload_dir", "stream")},
    "damage_rows": "ggml candidates: output rows per layer, evenly strided, on which each ggml type's fisher and "
                   "gradient damage is measured and scaled to the layer's rows (0: every row)",
    "candidates": "configs the tables cover: affine (bits x group sizes), gguf (the ggml types llama.cpp loads, "
                  "each only on layers whose rows allow it) or both; `mixbits allocate` plans over the same",
    "methods": "comma list of fisher, gradient, hessian, output_error, divergence, ablation",
    "granularity": "layer (each linear) or block (all linears of a block together)",
    "seed": "seed of the calibration window sampler and of random probes",
    "measure_configs": "configs measured methods run, e.g. w2g128,w4g128 (default all)",
    "validate": "rank-correlate every method with measured damage on held-out text",
    "validate_configs": "configs compared in validation",
    "validate_windows": "held-out windows (validation split) for measured damage",
    "validate_with": "measured damage for validation: divergence (KL) or ablation (ΔPPL)",
    "output_dir": "where sensitivity.json, validation.json, plots/ go",
    "sensitivity_file": 'import {"sensitivity_scores": [one per block]}',
    "use_cache": "reuse tables cached under $MIXBITS_CACHE_DIR/sensitivity (default MIXBITS_HOME/cache)",
}
ANALYZE_HIDDEN = ("progress",)  # --verbose


@app.command()
@config_options(AnalyzeConfig, ANALYZE_HELPS, flags={"use_cache": "cache"})
def analyze(overwrite: bool = OVERWRITE, verbose: bool = VERBOSE, *, options: ConfigOptions) -> None:
    """Sensitivity by several methods, validated against measured damage; writes tables and plots.
    fisher, gradient, output_error and hessian with --no-validate stream the model block by block (other
    methods, validation and block granularity load it whole)."""
    setup_logging(verbose)
    with user_errors():
        cfg = options.config(progress=verbose)
        summary = commands.analyze(cfg, overwrite=overwrite)
    print_analysis(console, summary)
    console.print("wrote " + ", ".join(summary["files"].values()) + f", {cfg.output_dir}/analysis.json")


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
