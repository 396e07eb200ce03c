"""`mixbits zeroshot`: zero-shot multiple-choice accuracy of a run's original and quantized models, or of
one model, through lm-evaluation-harness (`eval.zeroshot`).

Each model is loaded when its turn comes and dropped after it (one alive at a time), placed by
accelerate within `max_memory` (`model.dispatch`: blocks beyond the budget read from disk at each
forward, under `offload_dir`, a temporary folder by default), whole on the device without a budget.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from mixbits.config import resolve_device
from mixbits.errors import UserError

__all__ = ["load_mixed", "run_model_name", "zeroshot_job"]


def run_model_name(run_dir: Path) -> str:
    """The model a `mixbits run` folder was made from (its results.json), checked to hold model/."""
    results = run_dir / "results.json"
    if not (run_dir / "model" / "mixbits.json").is_file():
        raise UserError(f"--run-dir {str(run_dir)!r} has no quantized model (model/mixbits.json); "
                        f"pass the output folder of `mixbits run`")
    try:
        return str(json.loads(results.read_text())["config"]["model"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"--run-dir {str(run_dir)!r}: cannot read config.model from {results} ({err}); "
                        f"pass the output folder of a finished `mixbits run`") from None


def load_mixed(folder: Path, *, device: torch.device, dtype: torch.dtype, budget: dict | None,
               offload_dir: Path):
    """The native model in `folder`, packed layers kept packed, placed by `model.dispatch.place`."""
    from mixbits.export.native import load_native
    from mixbits.model.dispatch import place

    return place(load_native(folder, device="cpu", dtype=dtype), device=device, budget=budget, offload_dir=offload_dir)


def _tokenizer(folder: Path, fallback_source: str):
    from transformers import AutoTokenizer

    from mixbits.model.load import with_pad_token

    source = folder if (folder / "tokenizer_config.json").is_file() else fallback_source
    return with_pad_token(AutoTokenizer.from_pretrained(source))


def zeroshot_job(*, run_dir: Path | None, model: str | None, tasks, limit: int | None, batch_size: int,
                 device: str, original: bool, seed: int, max_memory: str | None = None,
                 offload_dir: Path | None = None, progress: bool = True) -> dict:
    """`evaluate_zeroshot` of a run's original (unless not `original`) and mixed models, or of `model`."""
    from mixbits.eval.zeroshot import evaluate_zeroshot
    from mixbits.model.budget import RUNTIME_BYTES
    from mixbits.model.dispatch import accelerate_budget, load_original
    from mixbits.model.load import resolve_model_source

    target = resolve_device(device)
    budget = accelerate_budget(max_memory, target, reserve=RUNTIME_BYTES)
    dtype = torch.float32
    name = model if model is not None else run_model_name(run_dir)
    source = resolve_model_source(name)
    tokenizer = _tokenizer(run_dir / "model" if run_dir is not None else Path(source), source)
    if offload_dir is not None:
        Path(offload_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="zeroshot-offload-", dir=offload_dir, ignore_cleanup_errors=True) as tmp:
        loaders = {}
        if model is not None or original:
            loaders[model or "original"] = lambda: load_original(source, device=target, dtype=dtype, budget=budget,
                                                                 offload_dir=Path(tmp) / "original")
        if run_dir is not None:
            loaders["mixed"] = lambda: load_mixed(run_dir / "model", device=target, dtype=dtype, budget=budget,
                                                  offload_dir=Path(tmp) / "mixed")
        return evaluate_zeroshot(loaders, tokenizer, tasks, device=target, limit=limit, batch_size=batch_size,
                                 seed=seed, progress=progress)
