"""What every subcommand shares: the app, the console, logging, parsers and the option constants."""

from __future__ import annotations

import logging
import sys
from contextlib import contextmanager

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

from mixbits.cli.options import flags_in
from mixbits.errors import UserError
from mixbits.config import DEFAULT_BITS, DEFAULT_GROUPS, DataConfig, RunConfig

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Sensitivity-guided mixed-precision quantization.")
console = Console(width=None if sys.stdout.isatty() else 120)  # logs and pipes get whole tables


@app.callback()
def _root() -> None:
    """mixbits: for a size you choose, the best quantized model, with the evidence."""


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False)],
        force=True,
    )


# Options of the commands that do not build a RunConfig (analyze, train, ...); run, sweep, compare and
# ablate take theirs from `mixbits.cli.options.FLAGS` (typer reads these as metadata only).
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
QUANTIZER = typer.Option(RunConfig.quantizer, help="gptq (with --gptq-clip: chosen by measurement), clip "
                                                    "(clipping search alone) or rtn (round-to-nearest)")
DAMAGE = typer.Option("follow", help="follow: allocate on Fisher damage x the quantizer's gain over RTN; "
                                      "rtn: on the damage of round-to-nearest")
GPTQ_CLIP = typer.Option(True, help="gptq: clip-search each group's scale (weighted by diag XᵀX) as it is reached")
GPTQ_ACT_ORDER = typer.Option(False, help="gptq: process columns by descending diag XᵀX, with static groups "
                                           "(so every format stores the natural group layout exactly)")
CACHE = typer.Option(True, help="reuse damage tables cached under MIXBITS_HOME/cache/sensitivity")
DEVICE = typer.Option("auto", help="auto, cpu, cuda, cuda:1 ...")
VERBOSE = typer.Option(True, help="log each stage")
OVERWRITE = typer.Option(False, "--overwrite", help="replace an earlier mixbits output in the output folder as a "
                        "whole (files mixbits did not write are kept); without it such a folder is refused")


@contextmanager
def user_errors(*extra: type[Exception]):
    """Bad input ends the command with one red line naming the problem and the fix, exit code 2.

    Only `UserError` (and the `extra` types a command names, e.g. a missing browser) is caught; typer's own
    usage errors pass through to typer, which reports them the same way. Every other exception, a plain
    ValueError from a bug included, keeps its traceback."""
    try:
        yield
    except (UserError, *extra) as err:
        message = flags_in(str(err))  # config fields named in the library's message -> the flags that set them
        console.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)  # messages hold [brackets]
        raise typer.Exit(2) from None
