"""Plots of the optional sections of a run: Block-AP training, zero-shot tasks, the iterative
path. Each takes the section's dict as results.json / layer_statistics.json hold it and a
path, and returns the PNG's path; they draw the numbers given (the only arithmetic is a
validation curve divided by its first value, so blocks of different loss scales share an axis).

* `plot_training`: per block the validation loss at the start and of the kept state (log y);
  each block's validation loss per epoch ÷ its start; E2E-QP's curve when it ran.
* `plot_zeroshot`: accuracy per task, one bar per model, stderr error bars, chance as a line.
* `plot_iterative`: validation perplexity per step (the rolled-back step a red cross) with the
  original and the limit as lines; below, the bpw reached after each step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps

from mixbits.report.figures import integer_ticks, new_figure, save_png


def plot_training(blocks: Sequence[Mapping], path: str | Path, *, e2e: Mapping | None = None) -> Path:
    """`blocks`: layer_statistics["blocks"] (BlockStats dicts); `e2e`: training["e2e"] or None.
    Top: the loss bars over the full width; below, the per-epoch curves and E2E-QP side by side."""
    if not blocks:
        raise ValueError("no trained blocks to plot (layer_statistics.json has no 'blocks')")
    curves = [b for b in blocks if len(b.get("val_history") or ()) > 1 and b["val_history"][0]]
    lower = (["curves"] if curves else []) + (["e2e"] if e2e and e2e.get("val_history") else [])
    mosaic = [["bars"] * max(1, len(lower))] + ([lower] if lower else [])
    fig = new_figure(11.0, 3.8 * len(mosaic))
    axes = fig.subplot_mosaic(mosaic)
    _loss_bars(axes["bars"], blocks)
    if "curves" in axes:
        _block_curves(fig, axes["curves"], curves)
    if "e2e" in axes:
        _e2e_curve(axes["e2e"], e2e)
    return save_png(fig, path)


def _e2e_curve(ax, e2e: Mapping) -> None:
    history = e2e["val_history"]
    ax.plot(range(len(history)), history, "o-", color="tab:green")
    best = e2e.get("best_epoch")
    ax.set_title("E2E-QP validation loss" + (f" (kept epoch {best:g})" if isinstance(best, (int, float)) else ""),
                 fontsize="medium")
    ax.set_xlabel("epoch (0 = start)")
    ax.set_ylabel("language-model loss")
    ax.ticklabel_format(axis="y", useOffset=False)
    integer_ticks(ax.xaxis)
    ax.grid(alpha=0.3)


def _loss_bars(ax, blocks: Sequence[Mapping]) -> None:
    index = [b["index"] for b in blocks]
    x = np.arange(len(blocks))
    ax.bar(x - 0.2, [b["loss_start"] for b in blocks], width=0.4, label="start", color="tab:grey")
    ax.bar(x + 0.2, [b["loss_end"] for b in blocks], width=0.4, label="kept", color="tab:blue")
    fell = [i for i, b in enumerate(blocks) if b.get("fallback")]
    if fell:
        ax.plot(fell, [blocks[i]["loss_start"] * 1.3 for i in fell], "v", color="tab:red", linestyle="none",
                label="fell back to its start")
    every = max(1, math.ceil(len(blocks) / 40))
    ax.set_xticks(x[::every], [str(i) for i in index][::every], fontsize=7)
    ax.set_xlim(-0.6, len(blocks) - 0.4)
    ax.set_yscale("log")
    ax.set_xlabel("block")
    ax.set_ylabel("validation block-output MSE (log)")
    ax.set_title("Block-AP: validation loss of each block at the start and kept", fontsize="medium")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3, axis="y")


def epochs_of(history: Sequence[float], epochs_run: float | None) -> list[float]:
    """The epoch of each validation: 0 (the start), 1, 2, ... and the last, partial epoch as run."""
    x = [float(i) for i in range(len(history))]
    if epochs_run is not None and len(x) > 1 and x[-1] - 1 < epochs_run < x[-1]:
        x[-1] = float(epochs_run)
    return x


def _block_curves(fig, ax, blocks: Sequence[Mapping]) -> None:
    cmap = colormaps["viridis"]
    last = max(b["index"] for b in blocks) or 1
    for b in blocks:
        history = np.asarray(b["val_history"], float)
        colour = cmap(b["index"] / last)
        ax.plot(epochs_of(history, b.get("epochs_run")), history / history[0], color=colour, linewidth=1, alpha=0.85)
        if b.get("best_epoch") is not None and b.get("loss_end") is not None:  # the state the block kept
            ax.plot([b["best_epoch"]], [b["loss_end"] / history[0]], "o", color=colour, markersize=4)
    ax.axhline(1.0, color="black", linewidth=0.7, linestyle="--")
    integer_ticks(ax.xaxis)
    ax.set_xlabel("epoch (0 = start)")
    ax.set_ylabel("validation loss ÷ start")
    ax.set_title("Block-AP validation loss per epoch (dot: kept)", fontsize="medium")
    ax.grid(alpha=0.3)
    mappable = ax.scatter([], [], c=[], cmap=cmap, vmin=0, vmax=last)
    integer_ticks(fig.colorbar(mappable, ax=ax, label="block").ax.yaxis)


def plot_zeroshot(zeroshot: Mapping, path: str | Path) -> Path:
    """Grouped bars of accuracy per task (x) and model (colour) with stderr bars and chance lines."""
    tasks = zeroshot.get("tasks") or {}
    if not tasks:
        raise ValueError("the zeroshot section has no tasks to plot")
    models = list(dict.fromkeys(m for t in tasks.values() for m in t.get("models", {})))
    width = 0.8 / max(1, len(models))
    fig = new_figure(max(6.0, 1.4 * len(tasks) * max(1, len(models)) / 2 + 3), 4.6)
    ax = fig.add_subplot()
    for j, model in enumerate(models):
        xs, acc, err = [], [], []
        for i, task in enumerate(tasks.values()):
            scores = task.get("models", {}).get(model)
            if scores and scores.get("acc") is not None:
                xs.append(i - 0.4 + width * (j + 0.5))
                acc.append(scores["acc"])
                err.append(scores.get("acc_stderr") or 0.0)
        ax.bar(xs, acc, width=width * 0.95, yerr=err, capsize=3, label=model)
    label = "chance"
    for i, task in enumerate(tasks.values()):
        if task.get("chance") is not None:
            ax.hlines(task["chance"], i - 0.45, i + 0.45, colors="black", linestyles="--", linewidth=1, label=label)
            label = None  # one legend entry for every task's line
    crowded = len(tasks) > 3
    ax.set_xticks(range(len(tasks)), list(tasks), rotation=20 if crowded else 0, ha="right" if crowded else "center",
                  fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy (± stderr)")
    shots = zeroshot.get("num_fewshot", 0)
    ax.set_title(f"zero-shot tasks ({shots}-shot, {'all' if zeroshot.get('limit') is None else zeroshot['limit']} docs per task)",
                 fontsize="medium")
    ax.legend(fontsize="small", ncol=min(4, len(models) + 1))
    ax.grid(alpha=0.3, axis="y")
    return save_png(fig, path)


def plot_iterative(iterative: Mapping, path: str | Path) -> Path:
    """Validation perplexity and bpw per step of the iterative mode; rejected steps marked."""
    steps = iterative.get("steps") or []
    if not steps:
        raise ValueError("the iterative section has no steps to plot")
    fig = new_figure(9.0, 5.6)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 2])
    x = [s["step"] for s in steps]
    ok = [s for s in steps if s.get("accepted")]
    bad = [s for s in steps if not s.get("accepted")]
    top.plot(x, [s["ppl"] for s in steps], "-", color="tab:blue", linewidth=1)
    top.plot([s["step"] for s in ok], [s["ppl"] for s in ok], "o", color="tab:blue", label="kept")
    if bad:
        top.plot([s["step"] for s in bad], [s["ppl"] for s in bad], "X", color="tab:red", markersize=10,
                 label="rolled back", linestyle="none")
    p0 = iterative.get("original_ppl")
    if p0 is not None:
        top.axhline(p0, color="black", linestyle="--", linewidth=1, label="original")
        if iterative.get("max_ppl_increase") is not None:
            top.axhline(p0 * (1 + iterative["max_ppl_increase"]), color="tab:red", linestyle=":", linewidth=1.2,
                        label=f"limit (+{100 * iterative['max_ppl_increase']:g} %)")
    top.set_ylabel("validation perplexity")
    top.set_title(f"iterative mode at {iterative.get('spec', '?')}: {iterative.get('layers_per_iteration', '?')} "
                  f"units per step, stopped: {iterative.get('stopped', '?')}", fontsize="medium")
    top.legend(fontsize="small")
    top.grid(alpha=0.3)
    bottom.plot(x, [s["bpw"] for s in steps], "o-", color="tab:green", markersize=4)
    if bad:
        bottom.plot([s["step"] for s in bad], [s["bpw"] for s in bad], "X", color="tab:red", markersize=9)
    bottom.set_ylabel("bpw after the step")
    bottom.set_xlabel("step")
    bottom.grid(alpha=0.3)
    bottom.xaxis.get_major_locator().set_params(integer=True)
    return save_png(fig, path)
