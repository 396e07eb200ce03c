"""Plots of a sweep: held-out perplexity against stored bits per weight and against megabytes,
one line per strategy, uniform configs as labelled points. Reads sweep.json; computes nothing."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_sweep(results: dict, path: str | Path, x: str = "bpw") -> Path:
    """Write a PNG of ppl vs `x` ("bpw" or "mb") for every strategy of a sweep."""
    if x not in ("bpw", "mb"):
        raise ValueError(f"x={x!r}; plot against 'bpw' or 'mb'")
    path = Path(path)
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    by_strategy: dict[str, list[dict]] = {}
    for row in results["rows"]:
        by_strategy.setdefault(row["strategy"], []).append(row)
    for name, rows in sorted(by_strategy.items()):
        rows = sorted(rows, key=lambda r: r[x])
        if name == "uniform":
            ax.plot([r[x] for r in rows], [r["ppl"] for r in rows], "ks", label="uniform (own size)", zorder=3)
            for r in rows:
                ax.annotate(r["rule"].split()[-1], (r[x], r["ppl"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        else:
            style = dict(lw=2.5, color="tab:red", zorder=4) if name == "optimal" else dict(lw=1, alpha=0.8)
            ax.plot([r[x] for r in rows], [r["ppl"] for r in rows], "o-", ms=3, label=name, **style)
    ax.axhline(results["original"]["ppl"], color="gray", ls="--", lw=1, label="original (fp16)")
    ax.set_yscale("log")
    ax.set_xlabel("stored bits per weight (block linears)" if x == "bpw" else "model size (MB)")
    ax.set_ylabel("held-out perplexity (log scale)")
    ax.set_title(f"{results['model']}: {results['quantizer']} quantizer, {results['sensitivity']} damage")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
