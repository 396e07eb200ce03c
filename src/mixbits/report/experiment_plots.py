"""Figures of `mixbits compare` and `mixbits ablate`. Read the JSON they write; compute nothing
but ratios of the numbers given.

comparison.png: (1) held-out perplexity vs MB on disk, one colour per model, one marker per
variant (original, mixed, uniform baselines); (2) perplexity increase of the mixed model over
its original, in %; (3) compression of the mixed model (original bytes / mixed bytes).
ablation.png: one panel per section present: strategy (perplexity vs bpw, each heuristic joined
to the optimum at its size), training (perplexity per schedule, the untrained start as a line),
budget (perplexity vs bpw, optimal and uniform).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _short(name: str) -> str:
    """A local folder by its own name; hub ids and embedded names as given."""
    return Path(name).name if name.startswith(("/", ".", "~")) else name


def plot_comparison(summary: dict, path: str | Path) -> Path:
    """Write comparison.png (module docstring) from a comparison_summary.json dict."""
    models = summary["models"]
    names = list(models)
    fig, (ax, inc, comp) = plt.subplots(1, 3, figsize=(15, 4.8), dpi=110, gridspec_kw={"width_ratios": [2, 1, 1]})
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, name in enumerate(names):
        m, c = models[name], colours[k % len(colours)]
        ax.plot(m["original"]["bytes_on_disk"] / 1e6, m["original"]["ppl"], "o", mfc="none", color=c, ms=8)
        ax.plot(m["mixed"]["bytes_on_disk"] / 1e6, m["mixed"]["ppl"], "*", color=c, ms=13, label=_short(name))
        for label, u in m["uniform"].items():
            ax.plot(u["bytes_on_disk"] / 1e6, u["ppl"], "s" if u["fits_budget"] else "^", color=c, ms=6, alpha=0.7)
            ax.annotate(label, (u["bytes_on_disk"] / 1e6, u["ppl"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    ax.plot([], [], "ko", mfc="none", label="original")
    ax.plot([], [], "k*", label="mixed")
    ax.plot([], [], "ks", label="uniform within budget")
    ax.plot([], [], "k^", label="uniform above budget")
    _scale(ax, [m[v]["ppl"] for m in models.values() for v in ("original", "mixed")]
           + [u["ppl"] for m in models.values() for u in m["uniform"].values()])
    ax.set_xlabel("MB on disk")
    ax.set_ylabel("held-out perplexity")
    ax.set_title("perplexity vs size, per model")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    increase = [100 * (models[n]["mixed"]["ppl"] / models[n]["original"]["ppl"] - 1) for n in names]
    compression = [models[n]["mixed"]["compression"] for n in names]
    for axis, values, title, fmt in ((inc, increase, "mixed: perplexity increase (%)", "{:.1f}%"),
                                     (comp, compression, "mixed: compression (x)", "{:.2f}x")):
        bars = axis.bar(range(len(names)), values, color=[colours[k % len(colours)] for k in range(len(names))])
        axis.bar_label(bars, labels=[fmt.format(v) for v in values], fontsize=8)
        axis.set_xticks(range(len(names)), [_short(n) for n in names], rotation=20, ha="right", fontsize=8)
        axis.set_title(title)
        axis.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def _strategy(ax, rows: list[dict]) -> None:
    for row in rows:
        if row["arm"] == row["pair"]:
            opt = next(r for r in rows if r["pair"] == row["pair"] and r is not row)
            line, = ax.plot([row["bpw"], opt["bpw"]], [row["ppl"], opt["ppl"]], ":", lw=1)
            ax.plot(row["bpw"], row["ppl"], "o", mfc="none", color=line.get_color(), ms=8, label=row["arm"])
            ax.plot(opt["bpw"], opt["ppl"], "*", color=line.get_color(), ms=12)
    ax.plot([], [], "k*", label="optimal at the same size")
    ax.set_xlabel("stored bits per weight")
    ax.set_title("strategy: heuristic vs optimal at its size")


def _training(ax, rows: list[dict]) -> None:
    trained = [r for r in rows if r["arm"] != "untrained"]
    start = next((r for r in rows if r["arm"] == "untrained"), None)
    bars = ax.bar(range(len(trained)), [r["ppl"] for r in trained], color="tab:blue")
    ax.bar_label(bars, labels=[f"{r['ppl']:.2f}" for r in trained], fontsize=7)
    ax.set_xticks(range(len(trained)), [r["arm"] for r in trained], rotation=20, ha="right", fontsize=8)
    if start is not None:
        ax.axhline(start["ppl"], color="tab:red", ls="--", lw=1, label=f"untrained ({start['init']})")
    low = min([r["ppl"] for r in rows]) if rows else 1.0
    ax.set_ylim(bottom=0.95 * low)
    epochs = {round(r.get("total_epochs", 0), 6) for r in trained}
    ax.set_title("training: Block-AP schedules" + (f", {epochs.pop():g} epochs each" if len(epochs) == 1 else ""))


def _budget(ax, rows: list[dict]) -> None:
    optimal = sorted((r for r in rows if r["arm"] == "optimal"), key=lambda r: r["bpw"])
    uniform = sorted((r for r in rows if r["arm"].startswith("uniform")), key=lambda r: r["bpw"])
    ax.plot([r["bpw"] for r in optimal], [r["ppl"] for r in optimal], "o-", color="tab:red", lw=2, label="optimal")
    ax.plot([r["bpw"] for r in uniform], [r["ppl"] for r in uniform], "s--", color="k", lw=1, label="uniform")
    for r in uniform:
        ax.annotate(r["arm"].split()[-1], (r["bpw"], r["ppl"]), fontsize=7, xytext=(3, -9), textcoords="offset points")
    ax.set_xlabel("stored bits per weight")
    ax.set_title("budget: optimal vs uniform")


def _scale(ax, values: list[float]) -> None:
    """Log scale when perplexities span more than 3x (a collapsed plan next to a good one)."""
    if values and min(values) > 0 and max(values) / min(values) > 3:
        ax.set_yscale("log")


PANELS = {"strategy": _strategy, "training": _training, "budget": _budget}


def plot_ablation(results: dict, path: str | Path) -> Path:
    """Write ablation.png (module docstring) from an ablation.json dict."""
    sections = [name for name in PANELS if name in results["sections"]]
    if not sections:
        raise ValueError("the ablation has no finished section to plot")
    fig, axes = plt.subplots(1, len(sections), figsize=(5.5 * len(sections), 4.6), dpi=110, squeeze=False)
    original = results.get("original", {}).get("ppl")
    for ax, name in zip(axes[0], sections):
        PANELS[name](ax, results["sections"][name]["rows"])
        if original is not None and name != "training":
            ax.axhline(original, color="gray", ls="--", lw=1, label="original")
        shown = [original] if original is not None and name != "training" else []
        _scale(ax, [r["ppl"] for r in results["sections"][name]["rows"]] + shown)
        ax.set_ylabel("held-out perplexity")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle(f"{results.get('model', '')}: ablations on one calibration set, test set and sensitivity table",
                 fontsize=10)
    return _save(fig, path)
