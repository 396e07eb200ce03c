"""PNG plots of sensitivity results. They draw what the tables and validation hold; they compute
nothing new except a min-max rescaling for display.

* `plot_scores`: each method's score per unit, rescaled to [0, 1] per method ((s − min) /
  (max − min)), one line per method, x = unit index in model order, dotted lines where a new
  transformer block starts.
* `plot_predicted_vs_measured`: one panel per method, predicted against measured damage for
  every unit × compared config, log-log, coloured by config, Spearman ρ in the title (from the
  `validate.validate_methods` dict). Non-positive values cannot sit on a log axis; they are
  left out and counted in the panel title.

matplotlib draws with the Agg backend through an explicit `Figure` + `FigureCanvasAgg`, so
no global backend is switched and nothing needs a display.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mixbits.io import atomic_write_bytes
from mixbits.quant.spec import parse_spec
from mixbits.sensitivity.table import DamageTable


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    atomic_write_bytes(path, buffer.getvalue())
    return path


def _rescale(values: np.ndarray) -> np.ndarray:
    if np.isnan(values).all():  # a config no layer can take (a K-quant on short rows)
        return np.zeros_like(values)
    lo, hi = np.nanmin(values), np.nanmax(values)
    return np.zeros_like(values) if not hi > lo else (values - lo) / (hi - lo)


def plot_scores(
    tables: Mapping[str, DamageTable],
    path: str | Path,
    *,
    score_keys: Mapping[str, str] | None = None,
    block_of: Sequence[int] | None = None,
    title: str = "sensitivity per unit (each method rescaled to [0, 1])",
) -> Path:
    """Line plot of each method's score per unit; all tables must list the same units.

    `score_keys[method]` picks the score (default: the table's first); `block_of[u]` is unit
    u's block index, to mark block boundaries (None: no marks).
    """
    if not tables:
        raise ValueError("no tables to plot")
    units = next(iter(tables.values())).units
    fig = Figure(figsize=(max(8.0, 0.08 * len(units)), 4.5), layout="constrained")
    ax = fig.add_subplot()
    for method, table in tables.items():
        if table.units != units:
            raise ValueError(f"the {method} table lists other units than the first table; plot one granularity at a time")
        key = (score_keys or {}).get(method) or next(iter(table.scores), None)
        if key is None:
            raise ValueError(f"the {method} table has no scores to plot")
        ax.plot(np.arange(len(units)), _rescale(np.asarray(table.scores[key], float)), marker=".", label=f"{method} ({key})")
    if block_of is not None:
        starts = [u for u in range(1, len(block_of)) if block_of[u] != block_of[u - 1]]
        for u in starts:
            ax.axvline(u - 0.5, color="grey", linestyle=":", linewidth=0.8)
    ax.set_xlabel("unit index (model order)")
    ax.set_ylabel("normalised score")
    ax.set_title(title)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, path)


def _panel(ax, pred: np.ndarray, meas: np.ndarray, labels: Sequence[str], method: str, rho: float) -> None:
    dropped = 0
    for k, label in enumerate(labels):
        x, y = pred[:, k], meas[:, k]
        ok = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
        dropped += int((~ok).sum())
        ax.scatter(x[ok], y[ok], s=12, alpha=0.7, label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    rho_text = "n/a" if rho is None or not math.isfinite(rho) else f"{rho:.3f}"
    ax.set_title(f"{method}: Spearman ρ = {rho_text}" + (f"\n({dropped} points ≤ 0 left out)" if dropped else ""),
                 fontsize="small")
    ax.set_xlabel("predicted damage")


def plot_predicted_vs_measured(
    tables: Mapping[str, DamageTable],
    measured: DamageTable,
    validation: Mapping,
    path: str | Path,
) -> Path:
    """Scatter per method of predicted vs measured damage on the validation configs (log axes)."""
    labels = list(validation["configs"])
    configs = [parse_spec(label) for label in labels]
    names = [m for m in tables if m in validation["methods"]]
    if not names:
        raise ValueError(f"no method of {list(tables)} is in the validation results {list(validation['methods'])}")
    cols = 3 if len(names) > 4 else min(len(names), 2)
    rows = math.ceil(len(names) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.8 * rows), layout="constrained")
    meas_cols = [measured.configs.index(c) for c in configs]
    for i, method in enumerate(names):
        table = tables[method]
        index = table.index()
        if any(u not in index for u in measured.units):
            raise ValueError(f"the {method} table lacks units of the measured table; plot one granularity at a time")
        pred = table.damage[np.ix_([index[u] for u in measured.units], [table.configs.index(c) for c in configs])]
        ax = fig.add_subplot(rows, cols, i + 1)
        _panel(ax, pred, measured.damage[:, meas_cols], labels, method, validation["methods"][method]["spearman"])
        if i % cols == 0:
            ax.set_ylabel(f"measured ({measured.method})")
        if i == 0:
            ax.legend(fontsize="x-small")
    fig.suptitle(f"predicted vs measured damage ({validation.get('measured_method', measured.method)}, held-out windows)")
    return _save(fig, path)
