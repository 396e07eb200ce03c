"""`mixbits compare`: the same job (`pipeline.run`) on several models, side by side.

Each model runs into `<out>/<safe name>/` with the same options; when it is finished (the run's
own files complete), `<out>/<safe name>_analysis.json` and `<out>/comparison_summary.json` are
written atomically, so a model failing midway loses none of the others' results: the remaining
models still run, and the failure is raised at the end. With `resume`, a model whose folder
holds results.json, plan.json and sensitivity.json of the same config is not run again.

comparison_summary.json (`mixbits.comparison/1`):
    config   the shared run config (RunConfig.to_dict() without `model`)
    models   per model name: run_dir, parameters,
             original {ppl, bytes_on_disk},
             mixed {ppl, kl, bpw, bytes_on_disk, compression = original / mixed bytes_on_disk},
             uniform {label: {ppl, kl, bpw, bytes_on_disk, fits_budget}}
<model>_analysis.json (`mixbits.analysis/1`): model, config (that model's run config),
    sensitivity {method, units, scores {method: [per unit]}}, plan {unit: spec label},
    results (results.json's "models"), timings_s.
Everything here reads the run's files: the summary and analysis are built from what is on disk.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

from mixbits import pipeline
from mixbits.config import RunConfig, resolve_device
from mixbits.data.text import resolve_text
from mixbits.jobs.common import fingerprint
from mixbits.jobs.experiment_config import CompareConfig, safe_name
from mixbits.io import atomic_write_json
from mixbits.model.load import validate_model_name
from mixbits.plan import Plan
from mixbits.sensitivity.table import DamageTable

log = logging.getLogger(__name__)

COMPARISON_FORMAT = "mixbits.comparison/1"
ANALYSIS_FORMAT = "mixbits.analysis/1"
RUN_FILES = ("results.json", "plan.json", "sensitivity.json")


class CompareFailed(RuntimeError):
    """Some models failed; the others' results are written. `failed`: model -> error message."""

    def __init__(self, failed: dict[str, str], summary_path: Path) -> None:
        self.failed = failed
        lines = "; ".join(f"{m}: {e}" for m, e in failed.items())
        super().__init__(f"{len(failed)} model(s) failed ({lines}); the others are in {summary_path}. "
                         "Fix the cause and rerun with --resume to run only the missing models")


def model_config(cfg: CompareConfig, model: str) -> RunConfig:
    return replace(cfg.run, model=model, output_dir=cfg.model_dir(model))


def validate(cfg: CompareConfig) -> None:
    """Every cheap check, before the first model loads: names, dataset, device, per-model configs."""
    for model in cfg.models:
        validate_model_name(model)
    resolve_text(cfg.run.data.dataset)
    resolve_device(cfg.run.device)
    for model in cfg.models:
        model_config(cfg, model)  # RunConfig's own checks


def is_finished(run_cfg: RunConfig) -> bool:
    """The run's files are all there and its results.json was made with the same config."""
    out = Path(run_cfg.output_dir)
    if not all((out / name).is_file() for name in RUN_FILES):
        return False
    saved = json.loads((out / "results.json").read_text()).get("config", {})
    return fingerprint(saved) == fingerprint(run_cfg.to_dict())


def build_analysis(model: str, run_dir: Path) -> dict:
    results = json.loads((run_dir / "results.json").read_text())
    table = DamageTable.load(run_dir / "sensitivity.json")
    plan = Plan.load(run_dir / "plan.json")
    return {
        "format": ANALYSIS_FORMAT, "model": model, "config": results["config"],
        "sensitivity": {"method": table.method, "units": list(table.units),
                        "scores": {k: [float(x) for x in v] for k, v in table.scores.items()}},
        "plan": {unit: spec.label for unit, spec in plan.specs.items()},
        "results": results["models"], "timings_s": results["timings_s"],
    }


def summary_entry(run_dir: Path, results: dict) -> dict:
    models = results["models"]
    original, mixed = models["original"], models["mixed"]
    uniform = {name.removeprefix("uniform "): {k: m[k] for k in ("ppl", "kl", "bpw", "bytes_on_disk", "fits_budget")}
               for name, m in models.items() if name.startswith("uniform ") and not name.endswith("(init)")}
    return {
        "run_dir": str(run_dir), "parameters": results["model"]["parameters"],
        "original": {"ppl": original["ppl"], "bytes_on_disk": original["bytes_on_disk"]},
        "mixed": {"ppl": mixed["ppl"], "kl": mixed["kl"], "bpw": mixed["bpw"], "bytes_on_disk": mixed["bytes_on_disk"],
                  "compression": original["bytes_on_disk"] / mixed["bytes_on_disk"]},
        "uniform": uniform,
    }


def build_summary(cfg: CompareConfig) -> dict:
    """The summary of every model whose run is finished (in the order given)."""
    shared = {k: v for k, v in cfg.run.to_dict().items() if k != "model"}
    shared["output_dir"] = str(cfg.output_dir)
    models = {}
    for model in cfg.models:
        run_cfg = model_config(cfg, model)
        if is_finished(run_cfg):
            run_dir = Path(run_cfg.output_dir)
            models[model] = summary_entry(run_dir, json.loads((run_dir / "results.json").read_text()))
    return {"format": COMPARISON_FORMAT, "config": shared, "models": models}


def _finish_model(cfg: CompareConfig, model: str) -> None:
    run_dir = cfg.model_dir(model)
    atomic_write_json(Path(cfg.output_dir) / f"{safe_name(model)}_analysis.json", build_analysis(model, run_dir))
    atomic_write_json(Path(cfg.output_dir) / "comparison_summary.json", build_summary(cfg))


def run_compare(cfg: CompareConfig) -> dict:
    """Run every model (module docstring); returns the summary. Raises CompareFailed at the end
    if any model failed, after writing the others."""
    validate(cfg)
    failed: dict[str, str] = {}
    for i, model in enumerate(cfg.models, 1):
        run_cfg = model_config(cfg, model)
        if cfg.resume and is_finished(run_cfg):
            log.info("[%d/%d] %s: finished in %s, skipped (--resume)", i, len(cfg.models), model, run_cfg.output_dir)
        else:
            log.info("[%d/%d] %s -> %s", i, len(cfg.models), model, run_cfg.output_dir)
            try:
                pipeline.run(replace(run_cfg, overwrite=run_cfg.overwrite or cfg.resume))  # rerun replaces it
            except Exception as err:  # noqa: BLE001 -- one model's failure must not stop the others; re-raised below
                log.error("%s failed: %s", model, err, exc_info=True)
                failed[model] = f"{type(err).__name__}: {err}"
                continue
        _finish_model(cfg, model)
    summary = build_summary(cfg)
    summary_path = Path(cfg.output_dir) / "comparison_summary.json"
    atomic_write_json(summary_path, summary)
    if failed:
        raise CompareFailed(failed, summary_path)
    return summary
