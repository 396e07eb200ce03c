"""Block-AP arms on one plan at equal total epochs: the untrained start, and one trained model
per schedule (optionally + E2E-QP), each scored on the same test windows against the original.

An arm is named `schedule` or `schedule+e2e`. Every schedule but `fixed` is rescaled to the total
epochs of `fixed` (`TrainConfig.total_epoch_budget`), so arms differ only in where the epochs and
the learning rate go, not in how much training they get. `X+e2e` trains the same Block-AP (its
checkpoint matches X's) and then E2E-QP. Used by `mixbits ablate` (training section) and by
`bench/train_compare.py`.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from mixbits.errors import UserError
from mixbits.eval.perplexity import evaluate_models
from mixbits.model.quantize import quantize_model
from mixbits.plan import Plan
from mixbits.quant.gptq import GPTQConfig
from mixbits.config import TrainConfig
from mixbits.train.run import train_model
from mixbits.config import check_schedule


def arm_config(base: TrainConfig, init: str, arm: str) -> TrainConfig:
    """The TrainConfig of arm `schedule[+e2e]` from `init`: non-fixed schedules at fixed's total epochs."""
    schedule, _, extra = arm.partition("+")
    check_schedule(schedule)
    if extra not in ("", "e2e"):
        raise UserError(f"training arm {arm!r}: after '+' only 'e2e' is known, e.g. fixed+e2e")
    return replace(base, init=init, schedule=schedule, total_epoch_budget=schedule != "fixed", e2e=extra == "e2e")


def score(original: nn.Module, model: nn.Module, test: torch.Tensor, device: torch.device) -> dict:
    """ppl, nll, kl, top1, ... of `model` on `test`, KL and top-1 against `original`."""
    return evaluate_models({"original": original, "q": model}, test, device=device, reference="original",
                           progress=False)["q"].to_dict()


def untrained_row(original: nn.Module, plan: Plan, init: str, windows: dict[str, torch.Tensor], test: torch.Tensor, *,
                  device: torch.device, batch_size: int = 1, gptq: GPTQConfig = GPTQConfig()) -> dict:
    """The start every arm trains from: `init` (rtn | clip | gptq) of `plan`, untrained."""
    began = time.perf_counter()
    start, _ = quantize_model(original, plan, quantizer=init, device=device, progress=False, gptq=gptq,
                              windows=None if init == "rtn" else windows["calibration"], batch_size=batch_size)
    seconds = time.perf_counter() - began
    return {"init": init, "run": "untrained", "seconds": seconds, **score(original, start, test, device)}


def trained_row(original: nn.Module, plan: Plan, windows: dict[str, torch.Tensor], test: torch.Tensor,
                cfg: TrainConfig, arm: str, *, device: torch.device, sensitivity: dict[int, float] | None,
                checkpoint_dir: Path | None, resume: bool, gptq: GPTQConfig = GPTQConfig()) -> dict:
    """Train `plan` with `cfg` (from `arm_config`) and score it; the row says how the epochs went."""
    began = time.perf_counter()
    model_q, report = train_model(original, plan, windows["calibration"], windows["validation"], cfg, device=device,
                                  sensitivity=sensitivity, progress=False, resume=resume,
                                  checkpoint_dir=checkpoint_dir, gptq=gptq)
    seconds = time.perf_counter() - began
    blocks = report.blocks
    return {
        "init": cfg.init, "run": arm, "seconds": seconds,
        "total_epochs": sum(b.epochs for b in blocks), "resumed_blocks": len(report.resumed_blocks),
        "improved_blocks": sum(b.loss_end < b.loss_start for b in blocks), "blocks": len(blocks),
        "mean_ratio": sum(b.ratio for b in blocks) / len(blocks), "e2e": report.e2e,
        **score(original, model_q, test, device),
    }
