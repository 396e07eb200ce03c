"""How well each method's predicted damage ranks the measured damage, and what it costs.

A predicted table is useful to allocation insofar as it orders (unit, config) pairs the way
real damage does. Against a measured table (ablation ΔPPL or divergence KL, measured on
HELD-OUT windows, not the calibration ones, so that a method is not graded on the data it was
fitted to), each method gets

    ρ        = Spearman rank correlation of predicted vs measured damage over all
               units × compared configs (pairs where either value is NaN are left out),
    ρ_c      = the same within each config c (ranks units only),
    cost     = the method's wall seconds / one forward + backward pass over the calibration
               tokens (a Fisher pass costs about 1; divergence about U·C/3 forward passes).

Best method rule: among methods with a finite ρ, those within `tolerance` (0.02) of the
highest ρ are "as good"; of those the one with the lowest cost ratio wins (ties: higher ρ,
then name). A method whose cost is unknown counts as infinitely expensive.

Source: Spearman 1904; scipy.stats.spearmanr (average ranks for ties).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy.stats import spearmanr

from mixbits.quant.spec import QuantSpec
from mixbits.sensitivity.table import DamageTable

DEFAULT_TOLERANCE = 0.02
BEST_RULE = ("highest Spearman rho over units x configs; among methods within {tol} of the best rho, "
             "the lowest cost (seconds / one forward+backward over the calibration tokens)")


def _spearman(x: np.ndarray, y: np.ndarray) -> tuple[float, float, int]:
    """(rho, p-value, pairs) over the finite pairs; NaN when fewer than 3 or a side is constant."""
    ok = np.isfinite(x) & np.isfinite(y)
    n = int(ok.sum())
    if n < 3 or np.ptp(x[ok]) == 0 or np.ptp(y[ok]) == 0:
        return math.nan, math.nan, n
    res = spearmanr(x[ok], y[ok])
    return float(res.statistic), float(res.pvalue), n


def _columns(table: DamageTable, configs: Sequence[QuantSpec], what: str) -> list[int]:
    missing = [c.label for c in configs if c not in table.configs]
    if missing:
        raise ValueError(f"the {what} table ({table.method}) has no column for {missing}; its configs are "
                         f"{[c.label for c in table.configs]}")
    return [table.configs.index(c) for c in configs]


def _aligned(table: DamageTable, measured: DamageTable, configs: Sequence[QuantSpec]) -> tuple[np.ndarray, np.ndarray]:
    """Predicted and measured damage [U, K] over the measured table's units and the given configs."""
    index = table.index()
    missing = [u for u in measured.units if u not in index]
    if missing:
        raise ValueError(f"the {table.method} table lacks units {missing[:3]} of the measured table; compare "
                         f"tables of one granularity ({table.meta.get('granularity')} vs {measured.meta.get('granularity')})")
    rows = [index[u] for u in measured.units]
    pred = table.damage[np.ix_(rows, _columns(table, configs, "predicted"))]
    meas = measured.damage[:, _columns(measured, configs, "measured")]
    return pred, meas


def _best(methods: Mapping[str, dict], tolerance: float) -> str | None:
    finite = {m: r for m, r in methods.items() if math.isfinite(r["spearman"])}
    if not finite:
        return None
    top = max(r["spearman"] for r in finite.values())
    good = [m for m, r in finite.items() if r["spearman"] >= top - tolerance]

    def cost(m: str) -> float:
        c = finite[m]["cost_ratio"]
        return c if c is not None and math.isfinite(c) else math.inf
    return min(good, key=lambda m: (cost(m), -finite[m]["spearman"], m))


def validate_methods(
    tables: Mapping[str, DamageTable],
    measured: DamageTable,
    configs_to_compare: Sequence[QuantSpec],
    costs: Mapping[str, float],
    fwd_bwd_seconds: float,
    *,
    tolerance: float = DEFAULT_TOLERANCE,
) -> dict:
    """Per method: spearman (all pairs), p_value, pairs, per_config {label: rho}, seconds,
    cost_ratio; plus best_method, the rule, the configs and the measured method."""
    if not tables:
        raise ValueError("no tables to validate; compute at least one method")
    configs = [c for c in configs_to_compare if not c.keep]
    if not configs:
        raise ValueError(f"configs_to_compare {[c.label for c in configs_to_compare]} hold no quantizing config; "
                         "kept layers have damage 0 by definition, so there is nothing to rank")
    if not fwd_bwd_seconds > 0:
        raise ValueError(f"fwd_bwd_seconds={fwd_bwd_seconds}; time one forward+backward pass (> 0 s)")
    results = {}
    for name, table in tables.items():
        pred, meas = _aligned(table, measured, configs)
        rho, p, n = _spearman(pred.ravel(), meas.ravel())
        per_config = {c.label: _spearman(pred[:, k], meas[:, k])[0] for k, c in enumerate(configs)}
        seconds = costs.get(name)
        results[name] = {
            "spearman": rho, "p_value": p, "pairs": n, "per_config": per_config,
            "seconds": seconds, "cost_ratio": None if seconds is None else seconds / fwd_bwd_seconds,
        }
    return {
        "measured_method": measured.method,
        "measured_meta": {k: v for k, v in measured.meta.items() if k != "members"},
        "configs": [c.label for c in configs],
        "fwd_bwd_seconds": fwd_bwd_seconds,
        "methods": results,
        "best_method": _best(results, tolerance),
        "rule": BEST_RULE.format(tol=tolerance),
    }


def ranking(table: DamageTable, method_score: str) -> list[tuple[str, float]]:
    """(unit, score) from most to least sensitive by scores[method_score]; NaN scores last."""
    if method_score not in table.scores:
        raise ValueError(f"the {table.method} table has no score {method_score!r}; it has {list(table.scores)}")
    values = table.scores[method_score]
    order = sorted(range(len(values)), key=lambda u: (math.isnan(values[u]), -values[u] if not math.isnan(values[u]) else 0))
    return [(table.units[u], float(values[u])) for u in order]
