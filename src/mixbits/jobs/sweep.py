"""The Pareto sweep: one sensitivity measurement, many budgets and strategies, all evaluated.

For every budget and strategy the plan is solved from the same damage table; every uniform
candidate config is evaluated at its own bpw. Identical plans (fixed-tier heuristics ignore
the budget) are quantized and evaluated once. Every model is scored on the same held-out
windows against the same original, a few models per pass so the original's distribution is
computed once per pass.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from mixbits.allocate.budget import Budget
from mixbits.allocate.feasibility import BudgetInfeasible, check_budget
from mixbits.allocate.registry import STRATEGIES, predicted_damage, run_strategy
from mixbits.config import RunConfig
from mixbits.errors import UserError
from mixbits.eval.perplexity import CONVENTION, evaluate_models
from mixbits.io import atomic_write_json
from mixbits.model.quantize import quantize_model
from mixbits.pipeline import calibrate, prepare, sensitivity
from mixbits.plan import Plan
from mixbits.provenance import environment
from mixbits.timing import StageTimer, time_forward

log = logging.getLogger(__name__)

SWEEP_FORMAT = "mixbits.jobs.sweep/1"


@dataclass(frozen=True)
class SweepConfig:
    run: RunConfig  # model, data, candidates, constraints, quantizer; its budget is ignored
    budgets_bpw: tuple[float, ...]
    strategies: tuple[str, ...] = tuple(STRATEGIES)
    uniform: bool = True  # also every uniform candidate config at its own bpw
    models_per_pass: int = 4

    def __post_init__(self) -> None:
        unknown = [s for s in self.strategies if s not in STRATEGIES]
        if unknown:
            raise UserError(f"unknown strategies {unknown}; choose from {', '.join(STRATEGIES)}")
        if not self.budgets_bpw:
            raise UserError("give at least one budget, e.g. --bpw 2.5:4.5:0.25")


def _plans(cfg: SweepConfig, p, table) -> list[dict]:
    """Every (strategy, budget) row with its plan; rows with the same plan share a key."""
    rows = []
    configs = cfg.run.allocation.configs()
    for bpw in cfg.budgets_bpw:
        try:
            bits = check_budget(p.shapes, configs, p.groups, p.constraints, Budget(bpw=bpw), p.fixed_bytes)
        except BudgetInfeasible as err:
            log.warning("skipping %s bpw: %s", bpw, err)
            continue
        for name in cfg.strategies:
            if name == "uniform" and cfg.uniform:
                continue  # every uniform config is evaluated at its own bpw below
            result = run_strategy(name, table, p.groups, bits, constraints=p.constraints)  # tiers ignore bits
            rows.append({"strategy": name, "target_bpw": bpw, "specs": dict(result.specs), "miss": result.miss,
                         "rule": result.rule})
    if cfg.uniform:
        for spec in (c for c in configs if not c.keep):
            rows.append({"strategy": "uniform", "target_bpw": None, "specs": {u: spec for u in table.units},
                         "miss": 0.0, "rule": f"every layer {spec.label}"})
    for row in rows:
        row["key"] = tuple(sorted((u, s.label) for u, s in row["specs"].items()))
        row["bpw"] = Plan(row["specs"]).bits_per_weight(p.shapes)
        row["mb"] = (Plan(row["specs"]).storage_bytes(p.shapes) + p.fixed_bytes) / 1e6
        row["predicted_damage"] = predicted_damage(table, row["specs"])
    return rows


def _evaluate(cfg: SweepConfig, p, calib, test, rows) -> dict:
    unique = {}
    for row in rows:
        unique.setdefault(row["key"], Plan(row["specs"]))
    keys = list(unique)
    scores, seconds = {}, {}
    windows = None if cfg.run.quantizer == "rtn" else calib
    for start in range(0, len(keys), cfg.models_per_pass):
        chunk = keys[start:start + cfg.models_per_pass]
        models = {"original": p.model}
        for i, key in enumerate(chunk):
            began = time.perf_counter()
            models[str(i)], _ = quantize_model(p.model, unique[key], quantizer=cfg.run.quantizer, windows=windows,
                                               device=p.device, progress=False, gptq=cfg.run.gptq)
            seconds[key] = time.perf_counter() - began
        evals = evaluate_models(models, test, device=p.device, reference="original", progress=cfg.run.progress)
        scores["original"] = evals["original"]
        for i, key in enumerate(chunk):
            scores[key] = evals[str(i)]
        log.info("evaluated %d / %d plans", min(start + cfg.models_per_pass, len(keys)), len(keys))
    return scores, seconds


def run_sweep(cfg: SweepConfig) -> dict:
    """Solve and evaluate every budget x strategy from one measurement; writes sweep.json."""
    timer = StageTimer()
    run_cfg = replace(cfg.run, allocation=replace(cfg.run.allocation, target_bpw=max(cfg.budgets_bpw), target_size_mb=None))
    p = prepare(run_cfg, timer)
    calib, test, data_info = calibrate(run_cfg, p, timer)
    table = sensitivity(run_cfg, p, calib, timer, data_info)
    with timer.stage("allocate"):
        rows = _plans(cfg, p, table)
    with timer.stage("evaluate"):
        scores, quantize_s = _evaluate(cfg, p, calib, test, rows)
    forward_s = time_forward(p.model, calib, device=p.device)
    original = scores["original"]
    out_rows = []
    for row in rows:
        ev = scores[row["key"]]
        out_rows.append({k: v for k, v in row.items() if k not in ("key", "specs")} |
                        {"ppl": ev.ppl, "kl": ev.kl, "top1": ev.top1, "quantize_s": quantize_s[row["key"]],
                         "plan": {s.label: sum(1 for x in row["specs"].values() if x == s) for s in set(row["specs"].values())}})
    results = {
        "format": SWEEP_FORMAT, "model": cfg.run.model, "quantizer": cfg.run.quantizer,
        "gptq": asdict(cfg.run.gptq) if cfg.run.quantizer == "gptq" else None,
        "sensitivity": table.method, "environment": environment(p.device), "data": data_info,
        "evaluation": CONVENTION.format(seqlen=data_info["test"]["seqlen"]),
        "original": {"ppl": original.ppl, "mb": (Plan({}).storage_bytes(p.shapes) + p.fixed_bytes) / 1e6},
        "rows": out_rows, "timings_s": timer.seconds, "damage": dict(table.meta).get("damage_rule", table.method),
        "forward_s": forward_s,  # one forward pass over the calibration tokens, the unit of time ratios
    }
    out = Path(cfg.run.output_dir)
    atomic_write_json(out / "sweep.json", results)
    table.with_meta(run={"config": cfg.run.to_dict(), "environment": results["environment"],
                         "data": data_info}).save(out / "sensitivity.json")
    return results
