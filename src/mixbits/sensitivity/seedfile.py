"""The plain sensitivity file of earlier tools: one score per transformer block.

    {"sensitivity_scores": [s_0, s_1, ..., s_{B-1}]}        (higher = more sensitive)

EfficientQAT-style Block-AP scripts read this (`--sensitivity_file`) to scale epochs per
block. `write_seed_file` / `read_seed_file` exchange it; `seed_table` turns it into a
block-granularity DamageTable the heuristic strategies can use. A score says how much a block
matters, not how much each config hurts, so the damage is a separable proxy

    D(b, c) = s_b · e_c,      e_c = mean over the model's linears l of ‖w_l − q_c(w_l)‖² / ‖w_l‖²,

the relative weight MSE of round-to-nearest at config c averaged over the linears (e_keep = 0).
It ranks blocks by s_b and configs by e_c, and nothing more: it has no per-block knowledge of
which config hurts which block, so it is weaker than a table computed by a real method.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mixbits.errors import UserError
from mixbits.io import atomic_write_json
from mixbits.model.arch import LinearInfo, get_weight
from mixbits.quant.fake import fake_quantize, storable
from mixbits.quant.spec import QuantSpec
from mixbits.safeload import loads_json, read_text
from mixbits.sensitivity.units import BlockDamageTable, block_table, block_units

SEED_KEY = "sensitivity_scores"


def _check_scores(values: object, where: str) -> np.ndarray:
    if not isinstance(values, (list, tuple)):
        raise UserError(f"{where}: {SEED_KEY!r} is {type(values).__name__}; write a list of numbers, one per block")
    bad = [(i, v) for i, v in enumerate(values)
           if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)]
    if bad:
        i, v = bad[0]
        raise UserError(f"{where}: score {i} is {v!r} (block {i}); every score must be a finite number "
                         f"({len(bad)} of {len(values)} are not)")
    return np.asarray(values, dtype=np.float64)


def write_seed_file(path: str | Path, scores_per_block: Sequence[float] | np.ndarray) -> Path:
    """Write {"sensitivity_scores": [...]} atomically; return the path."""
    scores = _check_scores([float(s) for s in np.asarray(scores_per_block, dtype=np.float64).ravel()], str(path))
    atomic_write_json(path, {SEED_KEY: scores.tolist()})
    return Path(path)


def read_seed_file(path: str | Path, n_blocks: int) -> np.ndarray:
    """The [n_blocks] float64 scores of a seed file; refuses a wrong length or non-numbers."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"sensitivity file {str(path)!r} does not exist; check the path")
    try:
        data = loads_json(read_text(path, "sensitivity file"), f"sensitivity file {str(path)!r}")
    except UserError as err:
        raise UserError(f"{err}; write {{\"{SEED_KEY}\": [one number per block]}}") from None
    if not isinstance(data, dict) or SEED_KEY not in data:
        raise UserError(f"sensitivity file {str(path)!r} has no {SEED_KEY!r} list; write "
                         f'{{"{SEED_KEY}": [one number per block]}}')
    scores = _check_scores(data[SEED_KEY], f"sensitivity file {str(path)!r}")
    if len(scores) != n_blocks:
        raise UserError(f"sensitivity file {str(path)!r} has {len(scores)} scores but the model has {n_blocks} "
                         f"blocks; give exactly {n_blocks} scores (one per block, in order), or use the file "
                         f"written for this model")
    return scores


def relative_weight_mse(weights: Mapping[str, torch.Tensor], configs: Sequence[QuantSpec]) -> np.ndarray:
    """e_c [C]: mean over the weights [out, in] of ‖w − q_c(w)‖² / ‖w‖² (0 for kept configs)."""
    if not weights:
        raise ValueError("no weights given; pass the model's linear weights as {name: [out, in]}")
    out = np.zeros(len(configs))
    for j, spec in enumerate(configs):
        if spec.keep:
            continue
        rel = []
        for w in weights.values():
            if not storable(spec, w.shape[1]):
                continue  # a ggml type this row length cannot take: the mean is over the layers that can
            w = w.detach().float()
            norm = float(w.square().sum())
            rel.append(float((fake_quantize(w, spec) - w).square().sum()) / norm if norm > 0 else 0.0)
        out[j] = float(np.mean(rel)) if rel else np.nan
    return out


def seed_table(
    scores: np.ndarray,
    model: nn.Module,
    linears: Mapping[str, LinearInfo],
    configs: Sequence[QuantSpec],
    *,
    source: str = "",
) -> BlockDamageTable:
    """Block table from seed scores: damage[b, c] = scores[b] · relative_weight_mse[c]; score "seed"."""
    units = block_units(linears)
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != (len(units),):
        raise UserError(f"got {scores.size} seed scores for a model with {len(units)} blocks")
    weights = {n: get_weight(model.get_submodule(n)) for n in linears}
    proxy = relative_weight_mse(weights, configs)
    meta = {"method": "seed", "kind": "imported", "granularity": "block", "source": source,
            "damage_proxy": "score x mean relative weight MSE of the config over the model's linears",
            "config_proxy": {c.label: float(e) for c, e in zip(configs, proxy)},
            "configs_measured": [c.label for c in configs], "quantizer": "rtn"}
    return block_table(units, linears, configs, np.outer(scores, proxy), "seed", {"seed": scores}, meta)
