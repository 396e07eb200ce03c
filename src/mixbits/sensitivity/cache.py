"""A disk cache of damage tables, so an expensive method runs once per model, data and options.

    <MIXBITS_HOME>/cache/sensitivity/<key>.json,     key = sha256(canonical JSON of key_parts)

`cache_key_parts` names what a table depends on: the model (its name plus a sha256 of the
weights of its first and last quantizable linear, so a fine-tuned or re-converted checkpoint
under the same name misses), the calibration tokens' sha256 (`data.windows.text_fingerprint`),
the configs, the method, the granularity and the method's options. A file holds the key parts
and the table (`DamageTable.to_dict`); it is written atomically (`io.atomic_write_json`), so a
killed run never leaves half a file. A file that cannot be read, or whose key parts differ, is
logged as a warning and recomputed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from mixbits.data.cache import mixbits_home
from mixbits.io import atomic_write_json
from mixbits.model.arch import LinearInfo, get_weight
from mixbits.quant.spec import QuantSpec
from mixbits.sensitivity.table import DamageTable
from mixbits.sensitivity.units import as_block_table

log = logging.getLogger(__name__)

CACHE_FORMAT = "mixbits.sensitivity-cache/1"


def weights_fingerprint(model: nn.Module, linears: Mapping[str, LinearInfo]) -> str:
    """sha256 of the names, shapes, dtypes and bytes of the first and last linear's weights."""
    names = list(linears)
    h = hashlib.sha256()
    for name in dict.fromkeys((names[0], names[-1])):
        w = get_weight(model.get_submodule(name)).detach().to("cpu").contiguous()
        h.update(f"{name}:{tuple(w.shape)}:{w.dtype}:".encode())
        h.update(w.view(torch.uint8).numpy().tobytes())  # raw bytes: works for bf16 too
    return h.hexdigest()


def cache_key_parts(
    *,
    model_name: str,
    model: nn.Module,
    linears: Mapping[str, LinearInfo],
    calibration_sha256: str,
    configs: Sequence[QuantSpec],
    method: str,
    granularity: str,
    options: Mapping[str, object] | None = None,
) -> dict:
    """The JSON-able description of everything a table depends on."""
    return {
        "model": {"name": model_name, "weights_sha256": weights_fingerprint(model, linears), "linears": len(linears)},
        "calibration_sha256": calibration_sha256,
        "configs": [c.label for c in configs],
        "method": method,
        "granularity": granularity,
        "options": dict(options or {}),
    }


def _canonical(parts: Mapping) -> str:
    return json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)


def cache_key(parts: Mapping) -> str:
    return hashlib.sha256(_canonical(parts).encode()).hexdigest()


def cache_path(parts: Mapping) -> Path:
    return mixbits_home() / "cache" / "sensitivity" / f"{cache_key(parts)}.json"


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
