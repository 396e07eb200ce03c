"""The files of one run folder (what `mixbits run` writes), read as plain dicts for reports.

    results.json            required: the run's measurements (`mixbits.results/1`)
    layer_statistics.json   per linear: block, shape, spec, scores (+ per block training stats)
    plan.json               the mixed plan: layer -> spec label
    sensitivity.json        the damage table (scores per method for every unit)
    zeroshot.json           optional copy of results["zeroshot"]

Only results.json is required; every other file may be absent (a run with a given plan has no
sensitivity.json) and each report section is drawn only when its data is there. Nothing here
computes a measurement: it reads, checks the format, and picks fields.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from mixbits.errors import UserError

RESULTS = "results.json"
WRITTEN_BY = "`mixbits run --output-dir RUN_DIR` writes it"


@dataclass(frozen=True)
class RunFiles:
    """A run folder's JSON files; `None` for an optional file that is not there."""

    path: Path
    results: dict
    layers: dict | None = None
    plan: dict | None = None
    sensitivity: dict | None = None
    zeroshot: dict | None = None

    @property
    def model_name(self) -> str:
        return str(self.results.get("model", {}).get("name") or self.results.get("config", {}).get("model") or "model")

    @property
    def plan_layers(self) -> dict[str, str]:
        """The mixed plan, layer -> spec label (from plan.json, else from layer_statistics.json)."""
        if self.plan is not None:
            return dict(self.plan.get("layers", {}))
        if self.layers is not None:
            return {row["name"]: row["spec"] for row in self.layers.get("layers", [])}
        return {}


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON ({err}); {what}") from err
    if not isinstance(data, dict):
        raise UserError(f"{path} holds a {type(data).__name__}, expected a JSON object; {what}")
    return data


def _optional(path: Path) -> dict | None:
    return _read_json(path, "it is optional: delete it to leave its section out") if path.is_file() else None


def load_run(run_dir: str | Path) -> RunFiles:
    """Read a run folder; FileNotFoundError naming results.json when it is not a run folder."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run folder {str(run_dir)!r} does not exist; {WRITTEN_BY}")
    path = run_dir / RESULTS
    if not path.is_file():
        raise UserError(f"{path} not found: {str(run_dir)!r} is not a run folder ({WRITTEN_BY})")
    results = _read_json(path, WRITTEN_BY)
    fmt = results.get("format")
    if fmt != "mixbits.results/1":
        raise UserError(f"{path} has format {fmt!r}; this report reads 'mixbits.results/1' ({WRITTEN_BY})")
    zeroshot = results.get("zeroshot") or _optional(run_dir / "zeroshot.json")
    return RunFiles(
        path=run_dir,
        results=results,
        layers=_optional(run_dir / "layer_statistics.json"),
        plan=_optional(run_dir / "plan.json"),
        sensitivity=_optional(run_dir / "sensitivity.json"),
        zeroshot=zeroshot or None,
    )


def layer_scores(run: RunFiles) -> tuple[list[dict], dict[str, list[float]]]:
    """The linears in model order (layer_statistics rows) and each score per linear.

    Scores come from layer_statistics.json, or from sensitivity.json when the rows lack them;
    a linear without a score gets NaN. ([], {}) when neither file lists the linears.
    """
    rows = list(run.layers.get("layers", [])) if run.layers is not None else []
    table: Mapping[str, Mapping[str, float]] = {}
    if run.sensitivity is not None:
        table = {u["name"]: u.get("scores", {}) for u in run.sensitivity.get("units", [])}
        if not rows:
            rows = [{"name": u["name"], "shape": u.get("shape")} for u in run.sensitivity.get("units", [])]
    keys: dict[str, None] = {}
    for row in rows:
        for key in row.get("scores") or table.get(row["name"], {}):
            keys.setdefault(key)
    scores = {k: [float((row.get("scores") or table.get(row["name"], {})).get(k, float("nan"))) for row in rows]
              for k in keys}
    return rows, scores
