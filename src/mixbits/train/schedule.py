"""Sensitivity-guided training schedules: how long, how fast and how patiently each block trains.

Every block b gets a normalised sensitivity s_b in [0, 1] (min-max over the model's blocks:
s = (x - min) / (max - min); all equal -> 0) and, from the plan, its mean bits (numel-weighted
over its planned linears, kept ones counting 16). With base epochs E, base learning rates
lr (both the weight and the quant-parameter lr are multiplied by the same factor) and base
patience P (None = never stop early):

    fixed         E,                      lr,                      P
    linear        E (1 + s),              lr (1 + 0.5 (s - 0.5)),  P
    sqrt          E (1 + sqrt s),         lr / (1 + 0.5 s),        2 + 3 s
    conservative  E (1 + 0.25 s),         lr,                      P
    joint         sqrt, and for blocks with more bits than the plan's mean:
                  epochs x 1.3, lr x 1.2, patience + 2

Sensitive blocks get longer, gentler training (sqrt); `joint` adds that blocks the allocator
already gave more bits have more to recover per epoch. `total_epoch_budget` rescales the
epochs of any schedule so that they sum to E x blocks, the total of `fixed`: the same compute,
redistributed. Epochs stay fractional; the trainer turns them into round(epochs x batches)
optimizer steps. Patience counts epochs without a validation improvement (compared as
ceil(patience)). Source: the adaptive-epoch variants of EfficientQAT block training driven by a
per-block `sensitivity_scores` file; the coefficients are the ones this project specifies.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from mixbits.config import check_schedule


@dataclass(frozen=True)
class BlockSchedule:
    """What one block trains with: epochs (fractional), lr multiplier, patience (None = none)."""

    epochs: float
    lr_scale: float
    patience: float | None

    def to_dict(self) -> dict:
        return {"epochs": self.epochs, "lr_scale": self.lr_scale, "patience": self.patience}


def normalise_scores(scores: Sequence[float]) -> list[float]:
    """Min-max normalisation to [0, 1]; all-equal scores give all 0 (no block stands out)."""
    values = [float(x) for x in scores]
    bad = [(i, x) for i, x in enumerate(values) if not math.isfinite(x)]
    if bad:
        raise ValueError(f"sensitivity scores must be finite numbers; block {bad[0][0]} has {bad[0][1]}")
    if not values:
        return []
    lo, hi = min(values), max(values)
    if hi == lo:
        return [0.0] * len(values)
    return [(x - lo) / (hi - lo) for x in values]


def block_schedule(name: str, s: float, *, base_epochs: float, base_patience: float | None,
                   above_mean_bits: bool = False) -> BlockSchedule:
    """The schedule of one block with normalised sensitivity `s` (see the module docstring)."""
    check_schedule(name)
    if not 0.0 <= s <= 1.0:
        raise ValueError(f"normalised sensitivity s={s!r} must lie in [0, 1]; normalise with normalise_scores")
    if name == "fixed":
        return BlockSchedule(base_epochs, 1.0, base_patience)
    if name == "linear":
        return BlockSchedule(base_epochs * (1 + s), 1 + 0.5 * (s - 0.5), base_patience)
    if name == "conservative":
        return BlockSchedule(base_epochs * (1 + 0.25 * s), 1.0, base_patience)
    sqrt = BlockSchedule(base_epochs * (1 + math.sqrt(s)), 1 / (1 + 0.5 * s), 2 + 3 * s)
    if name == "sqrt" or not above_mean_bits:
        return sqrt
    return BlockSchedule(sqrt.epochs * 1.3, sqrt.lr_scale * 1.2, sqrt.patience + 2)


def model_schedules(name: str, sensitivity: Sequence[float] | None, bits: Sequence[float], *,
                    base_epochs: float, base_patience: float | None, mean_bits: float | None = None,
                    total_epoch_budget: bool = False) -> list[BlockSchedule]:
    """One schedule per block. sensitivity: normalised s per block (None only for `fixed`);
    bits: mean bits per block; mean_bits: the plan's mean (default: the plain mean of `bits`),
    which `joint` compares each block's bits with."""
    check_schedule(name)
    n = len(bits)
    if sensitivity is None:
        if name != "fixed":
            raise ValueError(f"schedule {name!r} needs a sensitivity score per block; give them "
                             f"(sensitivity=, or --sensitivity-file) or use the schedule 'fixed'")
        sensitivity = [0.0] * n
    if len(sensitivity) != n:
        raise ValueError(f"{len(sensitivity)} sensitivity scores for {n} blocks; give one per block")
    mean = (sum(bits) / n if n else 0.0) if mean_bits is None else mean_bits
    out = [block_schedule(name, s, base_epochs=base_epochs, base_patience=base_patience,
                          above_mean_bits=b > mean + 1e-9) for s, b in zip(sensitivity, bits)]
    if total_epoch_budget and out:
        factor = base_epochs * n / sum(x.epochs for x in out)
        out = [BlockSchedule(x.epochs * factor, x.lr_scale, x.patience) for x in out]
    return out


def block_bits(specs: Mapping[str, object], blocks_of: Mapping[str, int], numels: Mapping[str, int],
               n_blocks: int) -> tuple[list[float], float]:
    """(mean bits per block, the plan's mean), both numel-weighted over the planned linears.

    specs: linear -> QuantSpec (kept ones count 16); blocks_of: linear -> block index;
    numels: linear -> weights. A block with no planned linear gets 16 (it stays in 16 bit)."""
    total = [0.0] * n_blocks
    count = [0] * n_blocks
    for name, spec in specs.items():
        b = blocks_of[name]
        total[b] += spec.bits * numels[name]
        count[b] += numels[name]
    per_block = [t / c if c else 16.0 for t, c in zip(total, count)]
    mean = sum(total) / sum(count) if sum(count) else 16.0
    return per_block, mean


def block_sensitivity(unit_scores: Mapping[str, float], block_of: Mapping[str, int]) -> dict[int, float]:
    """Per-block raw sensitivity: the sum of its linears' scores (e.g. a DamageTable's
    `dict(zip(table.units, table.scores["fisher_trace"]))` with `block_of` from `find_linears`)."""
    out: dict[int, float] = {}
    for name, score in unit_scores.items():
        if name not in block_of:
            raise ValueError(f"scored unit {name!r} is not a linear of the model's blocks; "
                             f"expected names like {next(iter(block_of), '?')!r}")
        out[block_of[name]] = out.get(block_of[name], 0.0) + float(score)
    return out
