"""What every subcommand shares: the app, the console, logging, parsers and the option constants."""

from __future__ import annotations

import logging
import sys
from contextlib import contextmanager

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

from mixbits.cli.options import flags_in, option
from mixbits.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Sensitivity-guided mixed-precision quantization.")
console = Console(width=None if sys.stdout.isatty() else 120)  # logs and pipes get whole tables


@app.callback()
def _root() -> None:
    """mixbits: for a size you choose, the best quantized model, with the evidence."""
    from mixbits.model.memory import MMAP_THRESHOLD, fix_mmap_threshold

    # The process is mixbits' own: tensors over 1 MiB become their own mappings, returned to the system
    # when freed, so a streamed stage's peak stays one block's (model/memory.py; the memory budget counts on it)
    fix_mmap_threshold(MMAP_THRESHOLD)


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False)],
        force=True,
    )


# Options of the commands that do not build a RunConfig (analyze, train, ...), taken from the one
# flag table (`mixbits.cli.options.FLAGS`: same help, defaults from RunConfig); run, sweep, compare
# and ablate take the whole table. Typer reads these as metadata only.
MODEL, DATASET, SEQLEN, CALIB_WINDOWS, EVAL_WINDOWS, SEED = (
    option(n) for n in ("model", "dataset", "seqlen", "calib_windows", "eval_windows", "seed"))
BITS, GROUP_SIZES, MIN_BITS, MAX_BITS, KEEP, PIN, TIE = (
    option(n) for n in ("bits", "group_sizes", "min_bits", "max_bits", "keep", "pin", "tie"))
DEVICE, OVERWRITE = option("device"), option("overwrite")
VERBOSE = typer.Option(True, help="log each stage")


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
