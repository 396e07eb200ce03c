"""A disk cache of damage tables, so an expensive method runs once per model, data, options and code.

    <computed cache>/sensitivity/<key>.json,     key = sha256(canonical JSON of key_parts)

(`data.cache.computed_cache_dir()`: `$MIXBITS_CACHE_DIR`, else `<MIXBITS_HOME>/cache`.)

`cache_key_parts` names everything a table depends on:

* the model: its name and `weights_fingerprint`, a sha256 over EVERY parameter and buffer
  (name, shape, dtype and a fixed sample of its values), so a fine-tuned, re-converted or
  hand-edited checkpoint under the same name misses, whichever layer changed;
* the calibration tokens' sha256 (`data.windows.text_fingerprint`), the candidate configs,
  the granularity and the method's options;
* the code that computed it: `CACHE_VERSIONS[method]` and `OUTPUT_DIGESTS[method]`, the digest
  of that method's table on a fixed tiny model. tests/reliability/test_cache.py recomputes the
  digests and fails when one changes ("bump CACHE_VERSIONS[...] and update the digest"), so a
  change to the math cannot be served a table the old math made.

A file holds the key parts and the table (`DamageTable.to_dict`); it is written atomically
(`io.atomic_write_json`), so a killed run never leaves half a file. A file that cannot be read,
or whose key parts differ, is logged as a warning and recomputed.

The fingerprint reads, per tensor, `SAMPLE_BLOCKS` blocks of `SAMPLE_ELEMENTS` consecutive
elements at a fixed stride (first and last block included; a tensor smaller than that is read
whole), gathered where the tensor lives and hashed with its name, shape and dtype. Nothing is
copied but the samples: 32 x 128 elements per tensor whatever its size, so the cost follows the
tensor count, not the model size: SmolLM2-135M (275 parameters and buffers) takes 17 ms on one
CPU core, a 7B Llama (~300) about as long, ~1.2 M elements read in all. The price of
sampling: an edit confined to a few rows that fall between two sampled blocks of a large tensor
is missed (every edit of a whole tensor, as any fine-tune or re-conversion makes, is seen).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType

import torch
from torch import nn

from mixbits.data.cache import computed_cache_dir
from mixbits.io import atomic_write_json
from mixbits.model.arch import LinearInfo
from mixbits.model.lazy import LazyCheckpoint
from mixbits.model.lazy_sample import checkpoint_sampler
from mixbits.model.stream import BlockSource
from mixbits.quant.spec import QuantSpec
from mixbits.sensitivity.table import DamageTable
from mixbits.sensitivity.units import as_block_table

log = logging.getLogger(__name__)

CACHE_FORMAT = "mixbits.sensitivity-cache/1"

# The code version of every cached method. Bump a method's version (and update its digest below)
# whenever its output changes; tests/reliability/test_cache.py fails until both are done.
CACHE_VERSIONS: Mapping[str, int] = MappingProxyType({
    "fisher": 1, "gradient": 1, "hessian": 1, "output_error": 1, "divergence": 1, "ablation": 1,
    "gain_rtn": 1, "gain_clip": 1, "gain_gptq": 1,
})
# sha256 (first 16 hex digits) of each method's table on the fixed tiny float64 model of
# tests/reliability/test_cache.py, values rounded to 6 significant digits. Part of the key too,
# so a digest updated without a version bump still invalidates the old tables.
OUTPUT_DIGESTS: Mapping[str, str] = MappingProxyType({
    "fisher": "6329f7a023575b65", "gradient": "82d5e6e32f2fc38c", "hessian": "6dc42a0a47b68543",
    "output_error": "7c2d107948601190", "divergence": "6cdef5fb8a12d094", "ablation": "d9c6faee85a81c34",
    "gain_rtn": "ee6999256b4d2541", "gain_clip": "57baacb11964f906", "gain_gptq": "567c34b6aabf3f4c",
})

SAMPLE_BLOCKS = 32  # blocks read per tensor
SAMPLE_ELEMENTS = 128  # consecutive elements per block


def code_version(method: str) -> dict:
    """{"version", "output_digest"} of the code that computes `method`'s table."""
    if method not in CACHE_VERSIONS:
        raise KeyError(f"sensitivity method {method!r} has no entry in CACHE_VERSIONS ({', '.join(CACHE_VERSIONS)}); "
                       "add one (and its digest in OUTPUT_DIGESTS) before caching its tables")
    return {"version": CACHE_VERSIONS[method], "output_digest": OUTPUT_DIGESTS[method]}


def _sample(tensor: torch.Tensor) -> torch.Tensor:
    """SAMPLE_BLOCKS blocks of SAMPLE_ELEMENTS elements at a fixed stride (all of a small tensor), on the CPU."""
    flat = tensor.detach().reshape(-1)  # a view for every contiguous tensor
    n, blocks, size = flat.numel(), SAMPLE_BLOCKS, SAMPLE_ELEMENTS
    if n > blocks * size:
        starts = torch.tensor([k * (n - size) // (blocks - 1) for k in range(blocks)], device=flat.device)
        flat = flat[(starts.unsqueeze(1) + torch.arange(size, device=flat.device)).reshape(-1)]
    return flat.to("cpu").contiguous()


def weights_fingerprint(model: nn.Module, sample: Callable[[str, torch.Tensor], torch.Tensor] | None = None) -> str:
    """sha256 over every parameter and buffer of `model`: name, shape, dtype and a fixed sample of
    its raw bytes (see the module docstring for what is read and what it costs). `sample(name,
    tensor)` gives the sample of a tensor on the meta device (a lazy checkpoint reads it from its
    shards, `model.lazy_sample`), which is otherwise left out."""
    h = hashlib.sha256()
    tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, tensor in tensors:
        h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}:".encode())
        if tensor.device.type == "meta" and sample is not None and tensor.numel():
            h.update(sample(name, tensor).view(torch.uint8).numpy().tobytes())
        elif tensor.device.type != "meta" and tensor.numel():
            h.update(_sample(tensor).view(torch.uint8).numpy().tobytes())  # raw bytes: bf16 too
    return h.hexdigest()


def source_fingerprint(model: nn.Module | BlockSource) -> str:
    """`weights_fingerprint` of a loaded model or of a block source's model; a lazy checkpoint's
    samples are read from its shards (`model.lazy_sample`), so it equals the loaded model's."""
    if isinstance(model, nn.Module):
        return weights_fingerprint(model)
    lazy = getattr(model, "inner", model)  # a wrapped source (`jobs.run_streamed.FiniteChecked`)
    sample = (checkpoint_sampler(lazy, blocks=SAMPLE_BLOCKS, size=SAMPLE_ELEMENTS)
              if isinstance(lazy, LazyCheckpoint) else None)
    return weights_fingerprint(model.model, sample)


def cache_key_parts(
    *,
    model_name: str,
    model: nn.Module | BlockSource,
    linears: Mapping[str, LinearInfo],
    calibration_sha256: str,
    configs: Sequence[QuantSpec],
    method: str,
    granularity: str,
    options: Mapping[str, object] | None = None,
) -> dict:
    """The JSON-able description of everything a table depends on (see the module docstring);
    `model`: a loaded model or a block source (the same key for the same weights)."""
    names = hashlib.sha256("\n".join(linears).encode()).hexdigest()
    return {
        "model": {"name": model_name, "weights_sha256": source_fingerprint(model), "linears": len(linears),
                  "linear_names_sha256": names},
        "calibration_sha256": calibration_sha256,
        "configs": [c.label for c in configs],
        "method": method,
        "code": code_version(method),
        "granularity": granularity,
        "options": dict(options or {}),
    }


def _canonical(parts: Mapping) -> str:
    return json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)


def cache_key(parts: Mapping) -> str:
    return hashlib.sha256(_canonical(parts).encode()).hexdigest()


def cache_path(parts: Mapping) -> Path:
    return computed_cache_dir() / "sensitivity" / f"{cache_key(parts)}.json"


def load_cached(parts: Mapping) -> DamageTable | None:
    """The cached table for `parts`, or None when absent; unreadable files warn and give None."""
    path = cache_path(parts)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != CACHE_FORMAT or data.get("key_parts") != json.loads(_canonical(parts)):
            raise ValueError("format or key parts differ")
        table = as_block_table(DamageTable.from_dict(data["table"]))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as err:
        log.warning("ignoring unreadable sensitivity cache %s (%s); recomputing the table", path, err)
        return None
    log.info("sensitivity %s: cached table %s", table.method, path.name)
    return table


def store_cached(parts: Mapping, table: DamageTable) -> Path:
    path = cache_path(parts)
    atomic_write_json(path, {"format": CACHE_FORMAT, "key_parts": json.loads(_canonical(parts)),
                             "table": table.to_dict()})
    return path


def cached_table(key_parts: Mapping, compute: Callable[[], DamageTable]) -> DamageTable:
    """The table cached under `key_parts`, else `compute()` stored there and returned."""
    table = load_cached(key_parts)
    if table is None:
        table = compute()
        store_cached(key_parts, table)
    return table
