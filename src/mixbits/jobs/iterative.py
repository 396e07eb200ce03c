"""Iterative mode: quantize the least sensitive units first, a few at a time, and stop at a
perplexity limit.

The allocation solver picks a plan for a size the user names; the iterative mode answers the
other question, "how much can I quantize before the model gets worse than X": units (a linear,
or a group of linears that must share a config such as q/k/v) are sorted by their predicted
damage at one target config (`--iterative-spec`, default w4g128), ascending. Each step moves
the next `layers_per_iteration` units to that config and measures validation perplexity (its
own documents: neither calibration nor test text). With p0 the original's validation
perplexity, a step is kept while

    p / p0 - 1  <=  max_ppl_increase                                    (relative increase)

(the order and this rule: `allocate.iterative`; the walk that measures each step: here).

The first step beyond the limit is rolled back and the walk stops ("threshold"); it also
stops after `max_iterations` steps, or when every unit is quantized. The path (every step,
kept or not) is reported.

Each unit's quantized weights are computed once, by the run's quantizer on the uniform plan at
the target config (for gptq and clip: on calibration inputs of the already quantized earlier
blocks, the standard sequential way); steps swap those weights in, so the model after the last
kept step is exactly the model that was measured, and its QParams are those of the uniform run.
Trade-off: one validation evaluation per step, instead of the damage table's prediction of
the whole plan; greedy order, no look-ahead (the exact solver in `allocate` is the tool for a
size budget).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from mixbits.allocate.iterative import exceeds
from mixbits.config import IterativeConfig
from mixbits.model.arch import get_weight, set_weight
from mixbits.plan import Plan
from mixbits.quant.spec import QuantSpec

log = logging.getLogger(__name__)

STOP_REASONS = ("threshold", "max_iterations", "all_quantized")


@dataclass(frozen=True)
class Step:
    step: int
    units: tuple[str, ...]  # the linears this step moved to the target config
    quantized_units: int  # linears at the target config after the step (if kept)
    bpw: float
    ppl: float
    increase: float  # ppl / original ppl - 1
    accepted: bool

    def to_dict(self) -> dict:
        d = asdict(self)
        d["units"] = list(self.units)
        return d


@dataclass(frozen=True)
class IterativeResult:
    plan: Plan
    steps: tuple[Step, ...]
    stopped: str
    original_ppl: float
    order: tuple[tuple[str, ...], ...] = field(default=())

    @property
    def final(self) -> Step | None:
        kept = [s for s in self.steps if s.accepted]
        return kept[-1] if kept else None


@torch.no_grad()
def iterative_quantize(
    model: nn.Module,
    quantized: nn.Module,
    order: Sequence[tuple[str, ...]],
    cfg: IterativeConfig,
    shapes: Mapping[str, tuple[int, int]],
    evaluate: Callable[[nn.Module], float],
) -> tuple[nn.Module, IterativeResult]:
    """Walk `order`, moving units from `model` (their 16-bit storage values) to `quantized`'s
    weights; returns the model after the last kept step and the path. Neither input is changed."""
    work = copy.deepcopy(model)
    original_ppl = evaluate(work)
    specs: dict[str, QuantSpec] = {}
    steps: list[Step] = []
    chunks = [order[i:i + cfg.layers_per_iteration] for i in range(0, len(order), cfg.layers_per_iteration)]
    stopped = "all_quantized"
    for number, chunk in enumerate(chunks, start=1):
        if number > cfg.max_iterations:
            stopped = "max_iterations"
            break
        names = tuple(n for g in chunk for n in g)
        before = {n: get_weight(work.get_submodule(n)).clone() for n in names}
        for n in names:
            set_weight(work.get_submodule(n), get_weight(quantized.get_submodule(n)))
        trial = Plan({**specs, **{n: cfg.spec for n in names}})
        ppl = evaluate(work)
        ok = not exceeds(ppl, original_ppl, cfg.max_ppl_increase)
        steps.append(Step(number, names, len(trial.quantized()) if ok else len(specs), trial.bits_per_weight(shapes),
                          ppl, ppl / original_ppl - 1.0, ok))
        log.info("iterative step %d: +%d linears -> %.3f bpw, ppl %.4g (%+.2f %%) %s", number, len(names),
                 steps[-1].bpw, ppl, 100 * steps[-1].increase, "kept" if ok else "rolled back")
        if not ok:
            for n, w in before.items():
                set_weight(work.get_submodule(n), w)
            stopped = "threshold"
            break
        specs = dict(trial.specs)
    plan = Plan(specs, {"strategy": "iterative", "spec": cfg.spec.label, "max_ppl_increase": cfg.max_ppl_increase})
    return work, IterativeResult(plan, tuple(steps), stopped, original_ppl, tuple(order))


def iterative_summary(result: IterativeResult, cfg: IterativeConfig, shapes: Mapping[str, tuple[int, int]],
                      validation: Mapping[str, int], order_words: str) -> dict:
    """The `iterative` section of results.json (schema in docs/schema.md)."""
    final = result.final
    return {
        **cfg.to_dict(),
        "order": order_words,
        "validation": dict(validation),
        "original_ppl": result.original_ppl,
        "steps": [s.to_dict() for s in result.steps],
        "stopped": result.stopped,
        "final": {"quantized_units": len(result.plan.quantized()), "bpw": result.plan.bits_per_weight(shapes),
                  "ppl": final.ppl if final is not None else result.original_ppl},
    }
