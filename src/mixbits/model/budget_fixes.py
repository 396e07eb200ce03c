"""Refusing a run that cannot fit its --max-memory: the message names the stage, the block, the sizes
and each fix that alone would make it fit, every fix re-predicted with `model.budget.predict_run`
(fewer or shorter windows, --offload-dir, bfloat16, no --preload), never guessed."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from mixbits.config import RunConfig
from mixbits.devices import compute_torch_dtype
from mixbits.errors import UserError
from mixbits.model.budget import RunMemory, eval_windows_of, size_text, predict_run
from mixbits.model.memory import ModelShapes

__all__ = ["enforce"]


def enforce(cfg: RunConfig, shapes: ModelShapes, memory: RunMemory, budget: dict[str, int], kwargs: dict) -> None:
    flag = f"--max-memory {cfg.max_memory}"
    if memory.budget_device not in budget:
        raise UserError(f"{flag} gives no budget for {memory.budget_device}, where the run computes (--device "
                        f"{cfg.device}); add {memory.budget_device}=SIZE or run on a device it names")
    for device, limit in budget.items():
        floor = memory.on(device) - memory.peak.total + memory.block_bytes if device == memory.budget_device else 0
        if limit < floor:
            raise UserError(
                f"{flag}: {device}={size_text(limit)} is too small for one block: {memory.block_name} alone takes "
                f"{size_text(memory.block_bytes)} in {str(memory.dtype).removeprefix('torch.')}"
                + (f" (plus {size_text(floor - memory.block_bytes)} for the runtime)" if floor > memory.block_bytes else "")
                + f", the least any stage holds; give {device} at least {size_text(memory.on(device))} (the predicted "
                f"peak){_dtype_hint(cfg, shapes, memory)}, or run on another device with more memory")
    for device, limit in budget.items():
        need = memory.on(device)
        if need > limit:
            peak = memory.peak
            raise UserError(
                f"{flag}: the run is predicted to need {size_text(need)} on {device}, above its {size_text(limit)}; the peak "
                f"is {peak.stage} during {peak.phase} {memory.where()}: "
                + ", ".join(f"{k} {size_text(v)}" for k, v in peak.parts.items() if v)
                + f". Fixes: {_fixes(cfg, shapes, device, limit, kwargs)}")


def _dtype_hint(cfg: RunConfig, shapes: ModelShapes, memory: RunMemory) -> str:
    if memory.dtype.itemsize <= 2:
        return ""
    return f", or --compute-dtype bfloat16 (the block takes {size_text(max(shapes.block_params) * 2)})"


def _halvings(start: int, least: int) -> list[int]:
    out, value = [], start // 2
    while value >= least:
        out.append(value)
        value //= 2
    return out


def _fixes(cfg: RunConfig, shapes: ModelShapes, device: str, limit: int, kwargs: dict) -> str:
    """Each fix that alone brings the prediction under `limit`, re-predicted; another device always."""
    from mixbits.data.windows import MIN_SEQLEN

    d = cfg.data
    data = lambda **change: dataclasses.replace(cfg, data=dataclasses.replace(d, **change))  # noqa: E731
    tries: list[list[tuple[str, RunConfig]]] = []
    if cfg.preload and device == "cpu":
        tries.append([("without --preload (weights read from disk block by block)",
                       dataclasses.replace(cfg, preload=False))])
    if cfg.offload_dir is None:
        tries.append([("--offload-dir FOLDER (block boundaries wait on disk)",
                       dataclasses.replace(cfg, offload_dir=Path("offload")))])
    tries.append([(f"--calib-windows {n}", data(calib_windows=n)) for n in _halvings(d.calib_windows, 1)])
    tries.append([(f"--seqlen {n}", data(seqlen=n)) for n in _halvings(d.seqlen, MIN_SEQLEN)])
    tries.append([(f"--eval-windows {n}", data(eval_windows=n))
                  for n in _halvings(eval_windows_of(cfg, kwargs["eval_windows"]), 1)])
    if compute_torch_dtype(cfg.compute_dtype) in (None, torch.float32):
        tries.append([("--compute-dtype bfloat16", dataclasses.replace(cfg, compute_dtype="bfloat16"))])
    found = []
    for options in tries:
        for label, other in options:  # the first (mildest) option of each kind that fits
            given = None if other.data.eval_windows != d.eval_windows else kwargs["eval_windows"]
            prediction = predict_run(other, shapes, **{**kwargs, "eval_windows": given})
            if prediction.on(device) <= limit:
                found.append(f"{label}: {size_text(prediction.on(device))}")
                break
    if not found:
        found.append("none of fewer/shorter windows, --offload-dir or bfloat16 fits alone; combine them")
    return "; ".join(found + ["or another device with more memory (--device, with a --max-memory for it)"])
