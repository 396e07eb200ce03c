"""The three sections of `mixbits ablate`, each a list of result rows on one shared context
(model, calibration windows, test windows, damage table):

strategy   each heuristic (the seed's presets: conservative at 5.0, adaptive at 4.0, aggressive at
           3.0 bpw) next to `optimal @ <heuristic>`: the exact least-damage plan within the stored
           bits the heuristic's plan actually uses. The heuristic's plan is one feasible answer to
           that knapsack, so the optimum's predicted damage is never higher at no larger size; the
           measured rows say what that buys.
training   Block-AP of the optimal plan at the run's budget: the untrained start, then one arm per
           schedule at equal total epochs (`schedules`).
budget     optimal vs the richest uniform config that fits, at every budget of the list.

Every row: arm, bpw, mb (cost model, whole model), ppl, kl, top1, predicted_damage, seconds (what
producing that model cost: allocation + quantization, or training), plan (spec -> units) and the
plan's file under output_dir/plans/.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from mixbits.allocate.budget import Budget
from mixbits.allocate.feasibility import uniform_baselines
from mixbits.allocate.optimal import allocate_optimal
from mixbits.allocate.presets import PRESET_TARGET_BPW
from mixbits.allocate.registry import predicted_damage, run_strategy
from mixbits.config import RunConfig
from mixbits.jobs.common import Scored, plan_row, score_plans
from mixbits.jobs.experiment_config import AblateConfig
from mixbits.jobs.schedules import arm_config, trained_row, untrained_row
from mixbits.pipeline import Prepared
from mixbits.plan import Plan
from mixbits.sensitivity.table import DamageTable
from mixbits.train.windows import training_windows
from mixbits.train.schedule import block_sensitivity


TRAINING_KEYS = ("total_epochs", "improved_blocks", "blocks", "mean_ratio", "resumed_blocks")


@dataclass(frozen=True)
class Context:
    """What every section shares: one model, one calibration set, one test set, one damage table."""

    run: RunConfig
    p: Prepared
    calib: torch.Tensor
    test: torch.Tensor
    table: DamageTable
    output_dir: Path

    @property
    def numel(self) -> int:
        return sum(o * i for o, i in self.p.shapes.values())

    def bits(self, budget: Budget) -> float:
        return budget.to_bits(self.numel, self.p.fixed_bytes)

    def optimal(self, budget_bits: float) -> tuple[Plan, float]:
        """The least-damage plan within `budget_bits`, and the seconds solving it took."""
        began = time.perf_counter()
        specs, solution = allocate_optimal(self.table, self.p.groups, budget_bits, self.p.constraints)
        return Plan(specs, {"strategy": "optimal", "proven_optimal": solution.optimal}), time.perf_counter() - began

    def score(self, plans: dict[str, Plan], per_pass: int) -> dict[str, Scored]:
        return score_plans(self.p.model, plans, self.test, calib=self.calib, quantizer=self.run.quantizer,
                           gptq=self.run.gptq, device=self.p.device, per_pass=per_pass)

    def row(self, section: str, key: str, arm: str, plan: Plan, scored: Scored, seconds: float, **extra) -> dict:
        path = Path("plans") / section / f"{re.sub(r'[^A-Za-z0-9.]+', '-', key).strip('-')}.json"
        plan.save(self.output_dir / path)
        return plan_row(arm, plan, scored, shapes=self.p.shapes, fixed_bytes=self.p.fixed_bytes, table=self.table,
                        extra_seconds=seconds, plan_file=str(path), **extra)


@dataclass(frozen=True)
class Arm:
    """A plan to score, its row label, the seconds that producing it took, and extra row fields."""

    plan: Plan
    label: str
    seconds: float
    extra: dict


def _rows(ctx: Context, section: str, arms: dict[str, Arm], per_pass: int) -> list[dict]:
    scored = ctx.score({key: arm.plan for key, arm in arms.items()}, per_pass)
    return [ctx.row(section, key, a.label, a.plan, scored[key], a.seconds, **a.extra) for key, a in arms.items()]


def strategy_section(cfg: AblateConfig, ctx: Context) -> list[dict]:
    arms = {}
    for name in cfg.strategies:
        budget = Budget(bpw=PRESET_TARGET_BPW[name]) if name in PRESET_TARGET_BPW else ctx.p.budget
        began = time.perf_counter()
        result = run_strategy(name, ctx.table, ctx.p.groups, ctx.bits(budget), constraints=ctx.p.constraints)
        heuristic = result.to_plan()
        arms[name] = Arm(heuristic, name, time.perf_counter() - began,
                         dict(pair=name, target=budget.label, miss=result.miss, rule=result.rule))
        optimal, seconds = ctx.optimal(8.0 * heuristic.storage_bytes(ctx.p.shapes))
        arms[f"optimal @ {name}"] = Arm(optimal, f"optimal @ {name}", seconds, dict(
            pair=name, target=f"size of {name}", miss=0.0,
            rule=f"optimal: least predicted damage within the stored bits of {name}'s plan"))
    return _rows(ctx, "strategy", arms, cfg.models_per_pass)


def budget_section(cfg: AblateConfig, ctx: Context) -> list[dict]:
    arms = {}
    configs = ctx.run.allocation.configs()
    for bpw in cfg.budgets_bpw:
        budget = Budget(bpw=bpw)
        optimal, seconds = ctx.optimal(ctx.bits(budget))
        arms[f"optimal {bpw:g}"] = Arm(optimal, "optimal", seconds, dict(target_bpw=bpw))
        fitting = [spec for spec, fits in uniform_baselines(ctx.p.shapes, configs, budget, ctx.p.fixed_bytes) if fits]
        if fitting:  # none when every uniform config is above the budget; optimal may still mix below it
            arms[f"uniform {bpw:g}"] = Arm(Plan.uniform(ctx.p.shapes, fitting[0]), f"uniform {fitting[0].label}", 0.0,
                                           dict(target_bpw=bpw))
    return _rows(ctx, "budget", arms, cfg.models_per_pass)


def training_section(cfg: AblateConfig, ctx: Context, checkpoint_root: Path) -> list[dict]:
    """Untrained start + one arm per schedule, each checkpointed under checkpoint_root/<arm>."""
    plan, _ = ctx.optimal(ctx.p.budget_bits)
    key_plan = ctx.output_dir / "plans" / "training" / "optimal.json"
    plan.save(key_plan)
    p, train = ctx.p, cfg.train
    sensitivity = block_sensitivity(dict(zip(ctx.table.units, ctx.table.scores["fisher_trace"])),
                                    {n: i.block for n, i in p.linears.items()})
    windows = training_windows(p.tokenizer, train)
    runs = [untrained_row(p.model, plan, train.init, windows, ctx.test, device=p.device, batch_size=train.batch_size,
                          gptq=ctx.run.gptq)]
    for arm in cfg.schedules:  # X+e2e replays X's Block-AP checkpoint, then adds E2E-QP
        runs.append(trained_row(p.model, plan, windows, ctx.test, arm_config(train, train.init, arm), arm,
                                device=p.device, sensitivity=sensitivity, resume=True, gptq=ctx.run.gptq,
                                checkpoint_dir=checkpoint_root / arm.partition("+")[0]))
    size = {"bpw": plan.bits_per_weight(p.shapes), "mb": (plan.storage_bytes(p.shapes) + p.fixed_bytes) / 1e6,
            "predicted_damage": predicted_damage(ctx.table, plan.specs)}
    rows = []
    for r in runs:
        extra = {k: r[k] for k in TRAINING_KEYS if k in r}
        rows.append({"arm": r["run"], "init": r["init"], "target": p.budget.label, **size, "ppl": r["ppl"],
                     "kl": r["kl"], "top1": r["top1"], "seconds": r["seconds"], **extra,
                     "plan_file": str(key_plan.relative_to(ctx.output_dir))})
    return rows
