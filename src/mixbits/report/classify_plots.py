"""The bar plot of `mixbits classify`, drawn from classify.json; it computes nothing new.

One PNG, three panels:
* top: per linear, the test-accuracy drop (percentage points) with that layer alone at 4 bits,
  bars coloured by block; dots on the right axis (log scale): the KL to the original on training
  sentences that ranks the layers for the strategies;
* bottom left: the same drop per block (all its linears at 4 bits);
* bottom right: each strategy's test accuracy, its bpw under the bar, the original as a line.

The title states what one test sentence is worth, so a bar of that height reads as one flip.
Drawn with an explicit `Figure` + `FigureCanvasAgg` (no global backend, no display).
"""

from __future__ import annotations

import io
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mixbits.io import atomic_write_bytes


def _short(name: str, blocks: list[dict]) -> str:
    """A layer's name after its block path: `bert.encoder.layer.3.attention.self.query` -> `3.attention.self.query`."""
    for block in blocks:
        prefix = block["name"] + "."
        if name.startswith(prefix):
            return block["name"].rsplit(".", 1)[-1] + "." + name[len(prefix):]
    return name


def _layers_panel(ax, results: dict) -> None:
    layers, blocks = results["layers"], results["blocks"]
    colors = [f"C{row['block'] % 10}" for row in layers]
    x = range(len(layers))
    ax.bar(x, [100 * row["accuracy_drop"] for row in layers], color=colors)
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xticks(list(x), [_short(row["name"], blocks) for row in layers], rotation=90, fontsize=6)
    ax.set_ylabel("test accuracy drop (pp)")
    ax.set_title(f"each linear alone at {results['evaluation']['int4']} (bars, colour = block)", fontsize=9)
    twin = ax.twinx()
    kl = [row["kl"] for row in layers]
    twin.plot(list(x), kl, "k.", ms=4)
    if min(kl) > 0:
        twin.set_yscale("log")
    twin.set_ylabel("training KL to original (nats), ranks layers", fontsize=8)


def _blocks_panel(ax, results: dict) -> None:
    blocks = results["blocks"]
    ax.bar(range(len(blocks)), [100 * row["accuracy_drop"] for row in blocks],
           color=[f"C{i % 10}" for i in range(len(blocks))])
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xticks(range(len(blocks)), [row["name"].rsplit(".", 1)[-1] for row in blocks])
    ax.set_xlabel("block")
    ax.set_ylabel("test accuracy drop (pp)")
    ax.set_title(f"each block alone at {results['evaluation']['int4']}", fontsize=9)


def _strategies_panel(ax, results: dict) -> None:
    rows = results["strategies"]
    accs = [100 * row["accuracy"] for row in rows]
    ax.bar(range(len(rows)), accs, color=["gray"] + ["C0"] * (len(rows) - 1))
    ax.axhline(100 * results["original"]["accuracy"], color="gray", ls="--", lw=1)
    for i, (row, acc) in enumerate(zip(rows, accs)):
        ax.annotate(f"{acc:.1f}", (i, acc), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(rows)), [f"{row['name']}\n{row['bpw']:.2f} bpw" for row in rows], rotation=30,
                  ha="right", fontsize=7)
    ax.set_ylim(max(0.0, min(accs) - 15), min(100.0, max(accs) + 8))
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("strategies", fontsize=9)


def plot_classify(results: dict, path: str | Path) -> Path:
    """Write the three-panel PNG of a classify.json dict to `path`."""
    fig = Figure(figsize=(12, 8))
    grid = fig.add_gridspec(2, 2, height_ratios=(1.2, 1))
    _layers_panel(fig.add_subplot(grid[0, :]), results)
    _blocks_panel(fig.add_subplot(grid[1, 0]), results)
    _strategies_panel(fig.add_subplot(grid[1, 1]), results)
    ev = results["evaluation"]
    fig.suptitle(f"{results['model']['name']} on {results['data']['dataset']}: original accuracy "
                 f"{100 * results['original']['accuracy']:.1f} % on {ev['test_examples']} test sentences "
                 f"(one sentence = {100 * ev['one_example']:.2f} pp)", fontsize=10)
    fig.tight_layout()
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)
