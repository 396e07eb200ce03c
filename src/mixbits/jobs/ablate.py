"""`mixbits ablate`: the SG-MPQ ablations (seed 000, "Ablation Studies") on one model, one
calibration set, one test set and one sensitivity table, in one command.

Sections (`ablate_sections`): `strategy` (the seed's presets, each beside the exact optimum at
the same size), `training` (Block-AP schedules at equal total epochs), `budget` (optimal vs
uniform over a list of budgets). Checks that need only the config run before the model loads;
the budgets are checked against the model's layers right after loading, before calibration.

ablation.json (`mixbits.ablation/1`): model, config, environment, data (window hashes),
evaluation, original {ppl, bpw, mb}, sensitivity (the damage method), timings_s (shared
stages), and sections {name: {config, seconds, rows}}; rows as in `ablate_sections`. The file
is rewritten atomically after each section, so a failure loses no finished section; with
`resume`, sections whose config matches are kept and not run again (each training arm also
resumes from its per-block checkpoints under output_dir/checkpoint/).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import fields, replace
from pathlib import Path

from mixbits.allocate.budget import Budget
from mixbits.allocate.feasibility import BudgetInfeasible, check_budget
from mixbits.allocate.presets import PRESET_TARGET_BPW
from mixbits.eval.perplexity import CONVENTION, evaluate_models
from mixbits.jobs.ablate_sections import Context, budget_section, strategy_section, training_section
from mixbits.jobs.common import fingerprint
from mixbits.jobs.experiment_config import SECTIONS, AblateConfig
from mixbits.io import atomic_write_json
from mixbits.pipeline import calibrate, prepare, sensitivity
from mixbits.plan import Plan
from mixbits.provenance import environment
from mixbits.timing import StageTimer

log = logging.getLogger(__name__)

ABLATION_FORMAT = "mixbits.ablation/1"


def config_dict(cfg: AblateConfig) -> dict:
    d = {f.name: getattr(cfg, f.name) for f in fields(cfg)}
    d["run"], d["train"], d["output_dir"] = cfg.run.to_dict(), cfg.train.to_dict(), str(cfg.output_dir)
    return d


def section_fingerprints(cfg: AblateConfig) -> dict[str, dict]:
    """What decides each section's numbers; a finished section with the same one is kept on resume."""
    run = cfg.run.to_dict()
    run["allocation"] = {k: v for k, v in run["allocation"].items() if k not in ("target_bpw", "target_size_mb")}
    target = Budget(cfg.run.allocation.target_bpw, cfg.run.allocation.target_size_mb).label
    needs_target = any(s not in PRESET_TARGET_BPW for s in cfg.strategies)
    return {
        "strategy": fingerprint(run, strategies=cfg.strategies, target=target if needs_target else None),
        "training": fingerprint(run, target=target, train=cfg.train.to_dict(), schedules=cfg.schedules),
        "budget": fingerprint(run, budgets_bpw=cfg.budgets_bpw),
    }


def finished_sections(cfg: AblateConfig, fingerprints: dict[str, dict]) -> dict[str, dict]:
    """With resume: the sections of an earlier ablation.json that have today's fingerprint."""
    path = Path(cfg.output_dir) / "ablation.json"
    if not (cfg.resume and path.is_file()):
        return {}
    sections = json.loads(path.read_text()).get("sections", {})
    kept = {k: v for k, v in sections.items() if k in fingerprints and v.get("config") == fingerprints[k]}
    for name in set(sections) - set(kept):
        log.warning("section %s of %s was made with other settings; it is dropped%s", name, path,
                    " and run again" if name in cfg.sections else "")
    return kept


def _check_budgets(cfg: AblateConfig, p) -> None:
    """Every budget of the budget section against the model's layers: before any calibration."""
    if "budget" in cfg.sections:
        for bpw in cfg.budgets_bpw:
            try:
                check_budget(p.shapes, cfg.run.allocation.configs(), p.groups, p.constraints, Budget(bpw=bpw),
                             p.fixed_bytes)
            except BudgetInfeasible as err:  # the message names the flag the budget came from
                raise BudgetInfeasible(str(err).replace("--target-bpw", "--budgets", 1)) from None


def _checkpoint_root(cfg: AblateConfig, fp: dict) -> Path:
    """One folder per training configuration; a fresh (non-resume) run starts it empty."""
    arms = {k: v for k, v in fp.items() if k != "schedules"}  # one arm's blocks do not depend on the others
    digest = hashlib.sha256(json.dumps(arms, sort_keys=True).encode()).hexdigest()[:12]
    root = Path(cfg.output_dir) / "checkpoint" / f"training-{digest}"
    if not cfg.resume and root.exists():
        log.info("removing the checkpoints of an earlier run in %s (pass --resume to reuse them)", root)
        shutil.rmtree(root)
    return root


def _head(cfg: AblateConfig, ctx: Context, data_info: dict, timer: StageTimer) -> dict:
    original = evaluate_models({"original": ctx.p.model}, ctx.test, device=ctx.p.device, progress=False)["original"]
    return {
        "format": ABLATION_FORMAT, "model": cfg.run.model, "config": config_dict(cfg),
        "environment": environment(ctx.p.device), "data": data_info,
        "evaluation": CONVENTION.format(seqlen=data_info["test"]["seqlen"]),
        "original": {"ppl": original.ppl, "bpw": 16.0,
                     "mb": (Plan({}).storage_bytes(ctx.p.shapes) + ctx.p.fixed_bytes) / 1e6},
        "sensitivity": ctx.table.method, "timings_s": timer.seconds, "sections": {},
    }


def _ordered(sections: dict[str, dict]) -> dict[str, dict]:
    return {name: sections[name] for name in SECTIONS if name in sections}


def run_ablation(cfg: AblateConfig) -> dict:
    """Run the sections of `cfg` not already finished; returns what ablation.json holds."""
    out = Path(cfg.output_dir)
    fps = section_fingerprints(cfg)
    kept = finished_sections(cfg, fps)
    todo = [name for name in SECTIONS if name in cfg.sections and name not in kept]
    if not todo:
        log.info("every section is finished in %s (--resume)", out)
        results = json.loads((out / "ablation.json").read_text())
        results["sections"] = _ordered(kept)
        atomic_write_json(out / "ablation.json", results)
        return results
    timer = StageTimer()
    run_cfg = replace(cfg.run, output_dir=out)
    p = prepare(run_cfg, timer)
    _check_budgets(cfg, p)
    calib, test, data_info = calibrate(run_cfg, p, timer)
    table = sensitivity(run_cfg, p, calib, timer, data_info)
    ctx = Context(run_cfg, p, calib, test, table, out)
    results = _head(cfg, ctx, data_info, timer)
    results["sections"] = _ordered(kept)
    table.with_meta(run={"config": run_cfg.to_dict(), "environment": results["environment"],
                         "data": data_info}).save(out / "sensitivity.json")
    for name in todo:
        log.info("section %s ...", name)
        began = time.perf_counter()
        if name == "strategy":
            rows = strategy_section(cfg, ctx)
        elif name == "budget":
            rows = budget_section(cfg, ctx)
        else:
            rows = training_section(cfg, ctx, _checkpoint_root(cfg, fps["training"]))
        results["sections"][name] = {"config": fps[name], "seconds": time.perf_counter() - began, "rows": rows}
        results["sections"] = _ordered(results["sections"])
        atomic_write_json(out / "ablation.json", results)
        log.info("section %s done in %.1f s", name, results["sections"][name]["seconds"])
    return results
