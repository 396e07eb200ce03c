"""The command line: one subcommand per stage. Every flag is a config field; the work is in
`pipeline`. Errors from bad input are printed as one line with the fix, exit code 2."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from mixbits.data.errors import MixbitsDataError
from mixbits.config import DEFAULT_BITS, DEFAULT_GROUPS, AllocationConfig, DataConfig, RunConfig

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Sensitivity-guided mixed-precision quantization.")
console = Console()


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


def print_results(results: dict) -> None:
    table = Table(title=f"{results['model']['name']} at {results['budget']['target']} "
                        f"({results['data']['test']['windows']} x {results['data']['test']['seqlen']} test tokens)")
    for col in ("model", "bpw", "MB on disk", "perplexity", "KL (nats/tok)", "top-1 agree"):
        table.add_column(col, justify="right" if col != "model" else "left", no_wrap=True)
    for name, m in results["models"].items():
        kl = "-" if name == "original" else f"{m['kl']:.4f}"
        top1 = "-" if name == "original" else f"{100 * m['top1']:.1f}%"
        label = name if m.get("fits_budget", True) else f"{name} (over budget)"
        table.add_row(label, f"{m['bpw']:.3f}", f"{m['bytes_on_disk'] / 1e6:.1f}", f"{m['ppl']:.3f}", kl, top1)
    console.print(table)
    console.print("stage times (s): " + ", ".join(f"{k} {v:.1f}" for k, v in results["timings_s"].items()))


@app.command()
def run(
    model: str = typer.Option("smollm2-135m", help="embedded name, Hugging Face hub id, or local HF folder"),
    target_bpw: Optional[float] = typer.Option(None, help="average stored bits per weight over the block linears"),
    target_size_mb: Optional[float] = typer.Option(None, help="size of the whole saved model in MB (10^6 bytes)"),
    output_dir: Path = typer.Option(Path("runs/demo"), help="where results, plan and model are written"),
    dataset: str = typer.Option("wiki", help="wiki, canterbury, wikitext2, c4, or a .txt/.jsonl path"),
    seqlen: int = typer.Option(DataConfig.seqlen, help="tokens per window (2048 for paper numbers)"),
    calib_windows: int = typer.Option(DataConfig.calib_windows, help="calibration windows for sensitivity"),
    eval_windows: int = typer.Option(DataConfig.eval_windows, help="test windows to score; 0 = the whole split"),
    seed: int = typer.Option(0, help="seed of the calibration window sampler"),
    bits: str = typer.Option(",".join(map(str, DEFAULT_BITS)), help="candidate bit-widths"),
    group_sizes: str = typer.Option(",".join(map(str, DEFAULT_GROUPS)), help="candidate group sizes (pc = per-channel)"),
    min_bits: int = typer.Option(2, help="no layer below this many bits"),
    max_bits: int = typer.Option(16, help="no layer above this many bits (16 = may keep layers)"),
    keep: Optional[str] = typer.Option(None, help="regex of layers kept in 16 bit"),
    pin: list[str] = typer.Option([], help="REGEX=BITS or REGEX=SPEC, e.g. down_proj=4 (repeatable)"),
    tie: bool = typer.Option(True, help="fused layers (q/k/v, gate/up) share one config"),
    plan: Optional[Path] = typer.Option(None, help="quantize with this plan (JSON/YAML) instead of allocating one"),
    quantizer: str = typer.Option("rtn", help="rtn (round-to-nearest), clip (clipping search) or gptq"),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:1 ..."),
    verbose: bool = typer.Option(True, help="log each stage"),
) -> None:
    """Sensitivity -> optimal allocation -> round-to-nearest -> evaluation, in one command."""
    _setup_logging(verbose)
    if target_bpw is None and target_size_mb is None:
        target_bpw = 3.25
    from mixbits.pipeline import run as run_pipeline  # heavy imports only once arguments parse

    try:
        cfg = RunConfig(
            model=model,
            output_dir=output_dir,
            device=device,
            plan=plan,
            quantizer=quantizer,
            data=DataConfig(dataset=dataset, seqlen=seqlen, calib_windows=calib_windows, eval_windows=eval_windows, seed=seed),
            allocation=AllocationConfig(
                target_bpw=target_bpw, target_size_mb=target_size_mb, bits=_ints(bits, "--bits"),
                group_sizes=_groups(group_sizes), min_bits=min_bits, max_bits=max_bits, keep=keep,
                pins=tuple(pin), tie=tie,
            ),
        )
        results = run_pipeline(cfg)
    except (ValueError, FileNotFoundError, MixbitsDataError) as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(2) from None
    print_results(results)
    console.print(f"wrote {output_dir}/results.json, layer_statistics.json, plan.json, sensitivity.json, model/")

