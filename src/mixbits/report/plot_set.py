"""Which plots a run gets: every plot whose data the run folder holds, written to
`<run>/plots/<key>.png`, each with a title and the alt text the HTML report gives it.

A plot whose data is absent is not drawn; one whose data is malformed (a hand-edited file) is
logged, listed in `PlotSet.failed` with the reason, and the rest still drawn.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mixbits.report.allocation_grid import allocation_grid
from mixbits.report.run_files import RunFiles, layer_scores
from mixbits.report.run_plots import plot_allocation, plot_quality_vs_size, plot_sensitivity
from mixbits.report.section_plots import plot_iterative, plot_training, plot_zeroshot

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plot:
    key: str  # file stem, and the section the report shows it in
    title: str
    alt: str
    path: Path


@dataclass(frozen=True)
class PlotSet:
    plots: dict[str, Plot] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # key -> why it could not be drawn


def trained_blocks(run: RunFiles) -> tuple[list[dict], dict | None]:
    """Per-block training stats (layer_statistics, else results["training"]["mixed"]) and E2E-QP's."""
    mixed = (run.results.get("training") or {}).get("mixed") or {}
    blocks = (run.layers or {}).get("blocks") or mixed.get("blocks") or []
    return list(blocks), mixed.get("e2e")


def _specs(run: RunFiles) -> list[tuple[str, str, str, Callable[[Path], Path]]]:
    """(key, title, alt, draw) for every plot whose data is present."""
    r, name, out = run.results, run.model_name, []
    models = r.get("models") or {}
    if models:
        out.append(("quality_vs_size", "Perplexity against size",
                    f"{name}: held-out perplexity against bits per weight and MB on disk for {', '.join(models)}",
                    lambda p: plot_quality_vs_size(r, p)))
    rows, scores = layer_scores(run)
    if rows and scores:
        out.append(("sensitivity", "Sensitivity per linear",
                    f"{name}: {', '.join(scores)} of {len(rows)} linears in model order, each divided by its "
                    "maximum, log scale; below, the bits each linear got",
                    lambda p: plot_sensitivity(rows, scores, p, title=f"{name}: sensitivity per linear")))
    plan = run.plan_layers
    if plan:
        names = [row["name"] for row in rows] or None
        block_of = {row["name"]: row["block"] for row in rows if row.get("block") is not None}
        out.append(("allocation", "Bits per linear",
                    f"{name}: heat map of the mixed plan's bits and group size per block and projection",
                    lambda p: plot_allocation(allocation_grid(plan, names, block_of), p,
                                              title=f"{name}: mixed plan ({r.get('budget', {}).get('target', '')})")))
    trained, e2e = trained_blocks(run)
    if trained:
        out.append(("training", "Block-AP training",
                    f"{name}: validation loss per block at the start and kept, per-epoch curves"
                    + (" and E2E-QP" if e2e else ""),
                    lambda p: plot_training(trained, p, e2e=e2e)))
    if run.zeroshot and run.zeroshot.get("tasks"):
        out.append(("zeroshot", "Zero-shot accuracy",
                    f"{name}: accuracy per task and model with standard errors and chance level",
                    lambda p: plot_zeroshot(run.zeroshot, p)))
    if r.get("iterative") and r["iterative"].get("steps"):
        out.append(("iterative", "Iterative path",
                    f"{name}: validation perplexity and bits per weight after each iterative step",
                    lambda p: plot_iterative(r["iterative"], p)))
    return out


def make_plots(run: RunFiles, out_dir: str | Path | None = None) -> PlotSet:
    """Draw every plot the run has data for into `out_dir` (default `<run>/plots`)."""
    out_dir = Path(out_dir) if out_dir is not None else run.path / "plots"
    result = PlotSet()
    for key, title, alt, draw in _specs(run):
        try:
            path = draw(out_dir / f"{key}.png")
        except (ValueError, KeyError, TypeError) as err:  # malformed or hand-edited data: report, keep going
            log.warning("plot %r not drawn: %s: %s", key, type(err).__name__, err)
            result.failed[key] = f"{type(err).__name__}: {err}"
            continue
        result.plots[key] = Plot(key, title, alt, path)
    return result
