"""Whole models for the stages that need one (zero-shot tasks), placed by accelerate's big-model inference.

lm-evaluation-harness calls a model as a whole, so block-by-block streaming cannot serve it. Instead
of a float32 copy in memory, the model is placed by accelerate within the run's memory budget:

    original  transformers' `from_pretrained(device_map=..., max_memory=..., offload_folder=...)`:
              accelerate puts each block on the compute device while the budget lasts and the rest
              on disk (read from the checkpoint's own safetensors, or from the offload folder, at
              each forward);
    mixed     the run's native folder, loaded packed (`export.native.load_native`, by the job), then
              `place`: `accelerate.dispatch_model` over the device map `infer_auto_device_map` finds
              within the same budget (packed codes and scales offloaded too).

Without a budget each model is loaded whole on the compute device. One model is alive at a time
(the caller loads, scores and drops it). The budget given to accelerate is the run's `--max-memory`
less what the process holds anyway (the runtime, `model.budget.RUNTIME_BYTES`), so the peak stays
under it; accelerate counts weights only, so the activations of lm-eval's batch come on top.

Trade-off: blocks on disk are read at every forward pass (slow, but bounded memory); a loaded mixed
model holds its packed tensors in memory once before dispatch (a fraction of the checkpoint).
Source: accelerate's big-model inference guide (`init_empty_weights`, `infer_auto_device_map`,
`dispatch_model`, `offload_folder`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from mixbits.devices import parse_max_memory

log = logging.getLogger(__name__)

__all__ = ["accelerate_budget", "is_placed", "load_original", "place"]


def accelerate_budget(max_memory: str | None, device: torch.device, reserve: int = 0) -> dict | None:
    """accelerate's `max_memory` ({0: bytes, "cpu": bytes}) from a `--max-memory` string, `reserve`
    bytes taken off the host's share; None without a budget."""
    if max_memory is None:
        return None
    out: dict = {}
    for name, nbytes in parse_max_memory(max_memory).items():
        if name == "cpu":
            out["cpu"] = max(nbytes - reserve, 1)
        elif device.type == "cuda":
            out[int(name.removeprefix("cuda:"))] = nbytes
    out.setdefault("cpu", 1)  # a GPU budget alone: the host holds nothing, the rest goes to disk
    return out


def _no_split(model: nn.Module) -> list[str]:
    return list(getattr(model, "_no_split_modules", None) or [])


def load_original(source: str | Path, *, device: torch.device, dtype: torch.dtype, budget: dict | None,
                  offload_dir: Path) -> nn.Module:
    """The checkpoint at `source` (a local folder or hub id) in `dtype`, whole on `device` without a
    budget, else placed by accelerate within it (the rest on disk under `offload_dir`)."""
    from transformers import AutoModelForCausalLM

    if budget is None:
        return AutoModelForCausalLM.from_pretrained(str(source), dtype=dtype).to(device).eval()
    model = AutoModelForCausalLM.from_pretrained(str(source), dtype=dtype, device_map="auto", max_memory=budget,
                                                 offload_folder=str(offload_dir))
    log.info("zero-shot original placed by accelerate: %s", _summary(model))
    return model.eval()


def place(model: nn.Module, *, device: torch.device, budget: dict | None, offload_dir: Path) -> nn.Module:
    """A loaded model (a native one, packed layers kept packed) whole on `device` without a budget,
    else dispatched by accelerate within it (the rest offloaded to `offload_dir`, buffers included)."""
    from accelerate import disk_offload, dispatch_model, infer_auto_device_map

    if budget is None:
        return model.to(device).eval()
    model = model.to("cpu")
    device_map = infer_auto_device_map(model, max_memory=budget, no_split_module_classes=_no_split(model))
    if set(device_map.values()) == {"cpu"} and device.type == "cpu":
        return model.eval()  # it fits: nothing to place
    if device_map == {"": "disk"}:  # nothing fits: every module read from the offload folder at its forward
        model = disk_offload(model, str(offload_dir), execution_device=device, offload_buffers=True)
    else:
        model = dispatch_model(model, device_map=device_map, offload_dir=str(offload_dir), offload_buffers=True,
                               main_device=str(device) if device.type != "cpu" else "cpu")
    model.hf_device_map = dict(device_map)
    log.info("zero-shot mixed model placed by accelerate: %s", _summary(model))
    return model.eval()


def _summary(model: nn.Module) -> str:
    placed = getattr(model, "hf_device_map", {}) or {}
    counts: dict[str, int] = {}
    for where in placed.values():
        counts[str(where)] = counts.get(str(where), 0) + 1
    return ", ".join(f"{n} module(s) on {where}" for where, n in sorted(counts.items())) or "one device"


def is_placed(model: nn.Module) -> bool:
    """Whether accelerate placed `model` (its hooks move each piece; it must not be moved with `.to`)."""
    return bool(getattr(model, "hf_device_map", None))
