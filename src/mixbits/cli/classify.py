"""`mixbits classify`: per-layer 4-bit accuracy drops of a sentence classifier and fixed-tier strategies."""

from __future__ import annotations

from rich.markup import escape
from rich.table import Table

from mixbits.cli.common import OVERWRITE
from mixbits import commands

from mixbits.classify.config import ClassifyConfig
from mixbits.cli.common import VERBOSE, app, console, setup_logging, user_errors
from mixbits.cli.fields import ConfigOptions, config_options
from mixbits.cli.options import FLAGS
from mixbits.errors import UserError
from mixbits.parsing import parse_group_sizes

DEVICE_HELP = FLAGS["device"].help


def _group(text: str) -> int | None:
    groups = parse_group_sizes(text, field="--group-size")
    if len(groups) != 1:
        raise UserError(f"--group-size {text!r}: give one group size, e.g. 128, or pc for per-channel")
    return groups[0]


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def print_classify(results: dict) -> None:
    ev, orig = results["evaluation"], results["original"]
    console.print(f"[bold]{escape(results['model']['name'])}[/bold] on {escape(results['data']['dataset'])}: "
                  f"original accuracy {_pct(orig['accuracy'])} % on {ev['test_examples']} test sentences "
                  f"(± {_pct(ev['original_standard_error'])} pp standard error; one sentence = "
                  f"{_pct(ev['one_example'])} pp); training accuracy {_pct(orig['train_accuracy'])} %")
    layers = Table(title=f"each linear alone at {ev['int4']} (rank 1 = most sensitive by the KL on training sentences)")
    for col in ("layer", "test acc %", "drop pp", "train KL", "train ΔCE", "rank"):
        layers.add_column(col, justify="left" if col == "layer" else "right", no_wrap=True)
    for row in results["layers"]:
        layers.add_row(row["name"], _pct(row["accuracy"]), _pct(row["accuracy_drop"]), f"{row['kl']:.2e}",
                       f"{row['loss_increase']:+.1e}", str(row["rank"]))
    for row in results["blocks"]:
        layers.add_row(f"[bold]{row['name']}[/bold] (block)", _pct(row["accuracy"]), _pct(row["accuracy_drop"]), "", "", "")
    console.print(layers)
    table = Table(title="strategies (lost / gained: test sentences flipped against the original; p: exact McNemar)")
    for col in ("strategy", "layers 4/6/8 bit", "bpw", "MB", "test acc %", "drop pp", "lost/gained", "p"):
        table.add_column(col, justify="left" if col == "strategy" else "right", no_wrap=True)
    for row in results["strategies"]:
        bits = row["layers_by_bits"]
        table.add_row(row["name"], "/".join(str(bits.get(b, 0)) for b in ("4", "6", "8")), f"{row['bpw']:.3f}",
                      f"{row['mb']:.2f}", _pct(row["accuracy"]), _pct(orig["accuracy"] - row["accuracy"]),
                      f"{row['lost']}/{row['gained']}", f"{row['mcnemar_p']:.2f}")
    console.print(table)
    for row in results["strategies"]:
        console.print(f"  {row['name']}: {escape(row['rule'])}")


CLASSIFY_HELPS = {
    "model": "embedded encoder (minilm-l6), hub id or local HF folder",
    "dataset": "pang-lee-polarity, sst2, or a file of '__label__X text' lines",
    "output_dir": "where classify.json and classify.png go",
    "head": "auto (the checkpoint's head if any, else train one), train, or model",
    "test_fraction": "share of each class held out for testing (not sst2: its own split)",
    "seed": "seed of the split, the head's folds and the ranking subset",
    "max_length": "tokens per sentence; longer ones are truncated",
    "batch_size": "sentences per forward pass",
    "group_size": "group size of every quantized layer (pc = per-channel)",
    "int4_fraction": "share of layers, least sensitive first, at 4 bits in the mixed strategies",
    "rank_examples": "training sentences that rank the layers (all when fewer)",
    "head_l2": "L2 penalties of the trained head, picked by cross-validation",
    "head_folds": "cross-validation folds of the trained head",
    "device": DEVICE_HELP,
}
CLASSIFY_HIDDEN = ("progress",)  # --verbose


@app.command()
@config_options(ClassifyConfig, CLASSIFY_HELPS, parsers={"group_size": _group})
def classify(overwrite: bool = OVERWRITE, verbose: bool = VERBOSE, *, options: ConfigOptions) -> None:
    """Accuracy drop per layer at 4 bits, and INT8 / INT4 / INT6+INT4 / INT8+selective-INT4 plans."""
    setup_logging(verbose)
    with user_errors():
        cfg = options.config(progress=verbose)
        results = commands.classify(cfg, overwrite=overwrite)
    print_classify(results)
    console.print("wrote " + ", ".join(results["files"].values()))
