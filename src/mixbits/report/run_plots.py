"""The core plots of one run: sensitivity per layer, the bit plan as a heat map, and
perplexity against size. Each takes the dicts read from the run's JSON files and a path, and
returns the path of the PNG it wrote. They draw what the files hold; the only arithmetic is for
display (a score divided by its method's maximum, bytes in MB, the budget in bpw and MB).

* `plot_sensitivity`: each score per linear in model order, divided by its maximum (log y, so
  methods of different units share one axis), block boundaries dotted and one tick per block;
  below it, the bits the plan gave each linear, in the heat map's colours.
* `plot_allocation`: blocks x projections, colour = bits (16 = kept), cell text `bits/group`.
* `plot_quality_vs_size`: held-out perplexity against stored bits per weight and against model
  MB (stored tensors, as the budget counts them): the mixed model a star, uniform configs dots
  joined per bit-width (hollow when over the budget), the original a dashed line, the budget a
  vertical line; log y.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from mixbits.quant.spec import QuantSpec
from mixbits.report.allocation_grid import AllocationGrid, split_name
from mixbits.report.figures import bits_colormap, bits_index, new_figure, plain_log_axis, save_png, text_colour


def block_ticks(ax, blocks: Sequence[int]) -> None:
    """Dotted lines where a block starts and one tick label per block (every k-th when crowded)."""
    starts = [i for i in range(len(blocks)) if i == 0 or blocks[i] != blocks[i - 1]]
    ends = starts[1:] + [len(blocks)]
    for s in starts[1:]:
        ax.axvline(s - 0.5, color="grey", linestyle=":", linewidth=0.7)
    every = max(1, math.ceil(len(starts) / 40))
    centres = [(s + e - 1) / 2 for s, e in zip(starts, ends)][::every]
    ax.set_xticks(centres, [str(blocks[s]) for s in starts][::every], fontsize=7)
    ax.set_xlim(-0.5, len(blocks) - 0.5)


def plot_sensitivity(rows: Sequence[Mapping], scores: Mapping[str, Sequence[float]], path: str | Path,
                     *, title: str = "sensitivity per linear") -> Path:
    """`rows`: layer_statistics rows in model order (name, block, bits); `scores[key][i]`: the
    score of row i (NaN when missing)."""
    if not rows or not scores:
        raise ValueError("no linears with scores to plot (layer_statistics.json / sensitivity.json)")
    blocks = [int(r["block"]) if r.get("block") is not None else (split_name(r["name"])[0] or 0) for r in rows]
    fig = new_figure(11.0, 5.2)  # the report's width: shown at its own size
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[4, 1])
    x = np.arange(len(rows))
    for key, values in scores.items():
        v = np.asarray(values, float)
        peak = np.nanmax(np.where(v > 0, v, np.nan)) if np.any(v > 0) else np.nan
        if not np.isfinite(peak):
            continue
        shown = np.where(v > 0, v / peak, np.nan)  # a log axis cannot show 0 or below
        top.plot(x, shown, marker=".", markersize=4, linewidth=0.7, label=f"{key} (÷ max {peak:.3g})")
    top.set_yscale("log")
    top.set_ylabel("score ÷ its maximum (log)")
    top.set_title(title)
    top.legend(fontsize="small", loc="lower left")
    top.grid(alpha=0.3, which="major", axis="y")
    _bits_strip(bottom, np.asarray([np.nan if r.get("bits") is None else r["bits"] for r in rows], float))
    block_ticks(top, blocks)
    block_ticks(bottom, blocks)
    bottom.set_xlabel("transformer block (linears in model order)")
    return save_png(fig, path)


def _bits_strip(ax, bits: np.ndarray) -> None:
    """One bar per linear, as high as its bits and in the heat map's colour for them."""
    cmap, norm, _ = bits_colormap()
    colours = [cmap(norm(i)) if np.isfinite(i) else "white" for i in np.ma.filled(bits_index(bits), np.nan)]
    ax.bar(np.arange(len(bits)), np.where(np.isfinite(bits), bits, 0), width=1.0, color=colours, edgecolor="none")
    ax.set_ylabel("bits", fontsize="small")
    ax.set_yticks([2, 4, 8, 16] if np.nanmax(bits, initial=0) > 8 else [2, 4, 8])
    ax.tick_params(axis="y", labelsize=7)


def plot_allocation(grid: AllocationGrid, path: str | Path, *, title: str = "bits per linear") -> Path:
    """Heat map of `grid`: rows = blocks, columns = projections, colour = bits, text = bits/group."""
    if not grid.blocks:
        raise ValueError("the plan names no linear inside a numbered block; nothing to draw")
    n_rows, n_cols = len(grid.blocks), len(grid.columns)
    fig = new_figure(1.6 + 0.95 * n_cols + 1.2, max(3.2, 1.2 + 0.27 * n_rows))
    ax = fig.add_subplot()
    cmap, norm, levels = bits_colormap()
    image = ax.imshow(bits_index(grid.bits), cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    for r in range(n_rows):
        for c in range(n_cols):
            if grid.text[r][c]:
                ax.text(c, r, grid.text[r][c], ha="center", va="center", fontsize=7,
                        color=text_colour(grid.bits[r, c]))
    ax.set_xticks(range(n_cols), grid.labels, fontsize=8)
    ax.xaxis.tick_top()
    ax.set_yticks(range(n_rows), [str(b) for b in grid.blocks], fontsize=7)
    ax.set_ylabel("block")
    ax.set_title(f"{title}\ncell: bits/group size (pc = per channel, s = symmetric; 16 = kept)", fontsize="medium")
    bar = fig.colorbar(image, ax=ax, ticks=range(len(levels)), shrink=min(1.0, 8 / n_rows + 0.3))
    bar.ax.set_yticklabels([("16 (kept)" if b == 16 else str(b)) for b in levels], fontsize=8)
    bar.set_label("bits")
    return save_png(fig, path)


def _variant_kind(name: str) -> str:
    if name in ("original", "mixed"):
        return name
    return "uniform" if name.startswith("uniform ") else "other"


def _uniform_bits(name: str) -> int | None:
    try:
        return QuantSpec.parse(name.split()[-1]).bits
    except ValueError:
        return None


def budget_lines(results: Mapping) -> tuple[float | None, float | None]:
    """The budget in bpw over the quantizable linears and in MB of the whole model (cost model)."""
    bits = results.get("budget", {}).get("bits")
    model = results.get("model", {})
    if bits is None or not model.get("quantizable_weights"):
        return None, None
    return bits / model["quantizable_weights"], (bits / 8 + model.get("other_bytes_fp16", 0)) / 1e6


def model_mb(results: Mapping) -> dict[str, float]:
    """Each variant's whole-model size in MB as the budget counts it: its linears' stored bytes
    plus every other tensor in 16 bit (the file on disk adds its header, listed in the table)."""
    other = results.get("model", {}).get("other_bytes_fp16")
    if other is None:
        return {}
    return {n: (m["linear_bytes"] + other) / 1e6 for n, m in (results.get("models") or {}).items()
            if m.get("linear_bytes") is not None}


def _panel(ax, models: Mapping[str, Mapping], xs: Mapping[str, float], budget: float | None, xlabel: str) -> None:
    """One panel: perplexity of every variant against its x in `xs` (variants without one are left out)."""
    groups: dict[int | None, list[tuple[float, float, str, bool]]] = {}
    for name, m in models.items():
        kind, x, y = _variant_kind(name), xs.get(name), m.get("ppl")
        if x is None or y is None or not math.isfinite(y) or kind == "original":
            continue
        fits = bool(m.get("fits_budget", True))
        if kind == "uniform":
            groups.setdefault(_uniform_bits(name), []).append((x, y, name.split()[-1], fits))
        elif kind == "mixed":
            ax.plot([x], [y], marker="*", markersize=16, color="tab:red", linestyle="none", zorder=5, label="mixed")
        else:
            ax.plot([x], [y], marker="D", markersize=7, linestyle="none", zorder=4, label=name)
    for bits, points in sorted(groups.items(), key=lambda kv: (kv[0] is None, kv[0] or 0)):
        points.sort()
        line, = ax.plot([p[0] for p in points], [p[1] for p in points], "-", linewidth=1, alpha=0.7,
                        label=f"uniform {bits} bit" if bits else "uniform")
        for x, y, label, fits in points:
            ax.plot([x], [y], "o", markersize=7, color=line.get_color(), markerfacecolor=line.get_color() if fits else "none")
            ax.annotate(label + ("" if fits else " (over)"), (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
    if "original" in models and models["original"].get("ppl") is not None:
        ax.axhline(models["original"]["ppl"], color="black", linestyle="--", linewidth=1, label="original (16 bit)")
    if budget is not None:
        ax.axvline(budget, color="tab:purple", linestyle="-.", linewidth=1, label="budget")
    ax.set_yscale("log")
    plain_log_axis(ax.yaxis)
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3, which="both")


def plot_quality_vs_size(results: Mapping, path: str | Path) -> Path:
    """Two panels: perplexity vs bpw and vs model MB, for every variant of results["models"]."""
    models = results.get("models") or {}
    if not any(m.get("ppl") is not None for m in models.values()):
        raise ValueError("results.json has no model with a perplexity to plot")
    fig = new_figure(12.0, 4.8)
    left, right = fig.subplots(1, 2, sharey=True)
    budget_bpw, budget_mb = budget_lines(results)
    bpw = {n: m["bpw"] for n, m in models.items() if m.get("bpw") is not None}
    _panel(left, models, bpw, budget_bpw, "stored bits per weight (quantizable linears)")
    _panel(right, models, model_mb(results), budget_mb, "model size (MB of stored tensors, as the budget counts)")
    left.set_ylabel("held-out perplexity (log)")
    handles, labels = left.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    left.legend(unique.values(), unique.keys(), fontsize="small")
    fig.suptitle(f"{results.get('model', {}).get('name', 'model')}: perplexity vs size "
                 f"(hollow: over the budget)")
    return save_png(fig, path)
