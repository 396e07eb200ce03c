"""What both experiments share: config fingerprints for `resume`, and scoring a set of plans on
one model's test windows against its original.

A fingerprint is a config in JSON-normal form (tuples as lists, paths as strings) without the
fields that never change a number (where output goes, progress bars, the table cache, the HTML
report), so a finished result is recognised however the folder was reached.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from mixbits.allocate.registry import predicted_damage
from mixbits.eval.perplexity import EvalResult, evaluate_models
from mixbits.model.quantize import quantize_model
from mixbits.plan import Plan
from mixbits.sensitivity.table import DamageTable

log = logging.getLogger(__name__)

NOT_NUMBERS = ("output_dir", "progress", "use_cache", "report", "overwrite")


def json_normal(data: object) -> object:
    """`data` as it reads back from a JSON file."""
    return json.loads(json.dumps(data, default=str))


def fingerprint(run_dict: Mapping[str, object], **extra: object) -> dict:
    """A run config dict (RunConfig.to_dict()) without NOT_NUMBERS, plus `extra`, JSON-normal."""
    return json_normal({**{k: v for k, v in run_dict.items() if k not in NOT_NUMBERS}, **extra})


@dataclass(frozen=True)
class Scored:
    """One plan's evaluation and the wall seconds its quantization took."""

    result: EvalResult
    quantize_s: float


def score_plans(original: torch.nn.Module, plans: Mapping[str, Plan], test: torch.Tensor, *, calib: torch.Tensor,
                quantizer: str, gptq, device: torch.device, per_pass: int = 4) -> dict[str, Scored]:
    """Quantize each plan (identical plans once) and score it on `test` against `original`, a few
    models per pass so the original's distribution is computed once per pass."""
    keys = {name: tuple(sorted((u, s.label) for u, s in plan.specs.items())) for name, plan in plans.items()}
    unique = list(dict.fromkeys(keys.values()))
    first = {key: next(n for n in plans if keys[n] == key) for key in unique}
    windows = None if quantizer == "rtn" else calib  # rtn needs no data
    done: dict[tuple, Scored] = {}
    for start in range(0, len(unique), per_pass):
        chunk = unique[start:start + per_pass]
        models, seconds = {"original": original}, {}
        for i, key in enumerate(chunk):
            began = time.perf_counter()
            models[str(i)], _ = quantize_model(original, plans[first[key]], quantizer=quantizer, windows=windows,
                                               device=device, progress=False, gptq=gptq)
            seconds[key] = time.perf_counter() - began
        evals = evaluate_models(models, test, device=device, reference="original", progress=False)
        for i, key in enumerate(chunk):
            done[key] = Scored(evals[str(i)], seconds[key])
        log.info("scored %d / %d plans", min(start + per_pass, len(unique)), len(unique))
    return {name: done[keys[name]] for name in plans}


def plan_row(arm: str, plan: Plan, scored: Scored, *, shapes: Mapping[str, tuple[int, int]], fixed_bytes: int,
             table: DamageTable, extra_seconds: float = 0.0, **extra: object) -> dict:
    """One result row: the plan's size (cost model), predicted damage, and measured quality.
    seconds: what producing the model cost (`extra_seconds`, e.g. allocation, plus quantization)."""
    r = scored.result
    return {
        "arm": arm, **extra,
        "bpw": plan.bits_per_weight(shapes),
        "mb": (plan.storage_bytes(shapes) + fixed_bytes) / 1e6,
        "ppl": r.ppl, "kl": r.kl, "top1": r.top1,
        "predicted_damage": predicted_damage(table, plan.specs),
        "seconds": extra_seconds + scored.quantize_s,
        "plan": {s.label: sum(1 for v in plan.specs.values() if v == s) for s in set(plan.specs.values())},
    }
