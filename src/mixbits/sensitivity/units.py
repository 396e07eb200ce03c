"""Units of sensitivity: one linear ("layer") or all linears of one transformer block ("block").

Granularity is a value, ``Granularity = Literal["layer", "block"]``; a unit is a name and the
tuple of linear names it quantizes together (`units_of`). Everything downstream (measurement,
tables, plans) works on that mapping and never branches on the granularity again.

Block tables. For an additive method (Fisher, gradient, Hessian, output error: each models the
loss increase as a sum over linears, with no cross-layer terms) the damage of a block at config
c is the sum of its linears' damages at c,

    D(block, c) = Σ_{l ∈ block} D(l, c),

which is exactly what such a method predicts for quantizing every linear of the block at c.
Measured methods (divergence, ablation) instead quantize the members together and measure.

Cost. `DamageTable.cost_bits` derives storage from one (out, in) shape per unit, which a block
whose linears have different widths does not have (per-group overhead depends on each member's
rows and row length). `BlockDamageTable` is a `DamageTable` that also keeps each unit's member
shapes and sums their costs, so it follows the cost model byte for byte. Its `shapes` hold a
flat (1, numel) stand-in (the right weight count for `numels()` and "params"); the member
shapes also travel in ``meta["members"]``, so `as_block_table(DamageTable.load(path))` restores
the exact cost after a round trip through sensitivity.json. (A plain `DamageTable.load` of a
block table costs each block as one [1, numel] matrix: exact for fp16, codes and groups that
divide the rows; it undercounts per-channel scales.)

`quantized_in_place` is the one place where a measured method touches weights: it saves the
members' weights, writes their fake-quantized values, and restores the saved tensors bit for
bit on exit, also when the body raises.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import torch
from torch import nn

from mixbits.model.arch import LinearInfo, get_weight, set_weight
from mixbits.quant.fake import fake_quantize, storable
from mixbits.quant.cost import layer_storage_bytes
from mixbits.quant.spec import QuantSpec
from mixbits.sensitivity.table import DamageTable

Granularity = Literal["layer", "block"]
GRANULARITIES: tuple[str, ...] = get_args(Granularity)

# Scores that are per-weight intensities (mean Hessian diagonal): a block's value is the
# weight-count-weighted mean of its members', i.e. Tr(H_block)/n_block. The top eigenvalue of
# a block-diagonal matrix is its members' largest. Every other score is a sum (like damage).
MEAN_SCORES = ("hessian_trace",)
MAX_SCORES = ("hessian_top_eig",)


def check_granularity(granularity: str) -> Granularity:
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity {granularity!r} is not supported; use one of {GRANULARITIES}")
    return granularity  # type: ignore[return-value]


def _block_path(info: LinearInfo) -> str:
    """The dotted path of the block holding a linear: the name up to the segment equal to its index."""
    parts = info.name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part == str(info.block):
            return ".".join(parts[: i + 1])
    raise ValueError(f"linear {info.name!r} has no path segment equal to its block index {info.block}")


def block_units(linears: Mapping[str, LinearInfo]) -> dict[str, tuple[str, ...]]:
    """Block name (``model.layers.3``) -> its linears' names, both in model order."""
    blocks: dict[int, list[str]] = {}
    paths: dict[int, str] = {}
    for name, info in linears.items():
        path = _block_path(info)
        if paths.setdefault(info.block, path) != path:
            raise ValueError(f"block {info.block} found at both {paths[info.block]!r} and {path!r}")
        blocks.setdefault(info.block, []).append(name)
    return {paths[b]: tuple(names) for b, names in blocks.items()}


def units_of(linears: Mapping[str, LinearInfo], granularity: str) -> dict[str, tuple[str, ...]]:
    """Unit name -> member linears: each linear alone ("layer") or each block's linears ("block")."""
    if check_granularity(granularity) == "layer":
        return {name: (name,) for name in linears}
    return block_units(linears)


def expand_specs(specs: Mapping[str, QuantSpec], units: Mapping[str, Sequence[str]]) -> dict[str, QuantSpec]:
    """A per-unit choice as a per-linear plan: every member takes its unit's spec."""
    unknown = [u for u in specs if u not in units]
    if unknown:
        raise ValueError(f"specs name units {unknown[:3]} that are not among {list(units)[:3]}...")
    return {member: spec for unit, spec in specs.items() for member in units[unit]}


@dataclass(frozen=True)
class BlockDamageTable(DamageTable):
    """A DamageTable whose units are groups of linears; cost is the sum of the members' costs."""

    member_shapes: tuple[tuple[tuple[int, int], ...], ...] = ()  # per unit: (out, in) of each member

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.member_shapes) != len(self.units):
            raise ValueError(f"{len(self.member_shapes)} member shape lists for {len(self.units)} units")
        for u, shapes in enumerate(self.member_shapes):
            numel = sum(o * i for o, i in shapes)
            if not shapes or self.shapes[u][0] * self.shapes[u][1] != numel:
                raise ValueError(f"unit {self.units[u]!r}: shape {self.shapes[u]} does not hold its members' {numel} weights")

    def cost_bits(self) -> np.ndarray:
        """[U, C] stored bits: for each unit, the sum over its members of the cost model's bits."""
        return np.array(
            [[8 * sum(layer_storage_bytes(o, i, c) for o, i in shapes)
              if all(storable(c, i) for _, i in shapes) else np.inf for c in self.configs]
             for shapes in self.member_shapes],
            dtype=np.float64,
        )


def _members_meta(units: Mapping[str, Sequence[str]], linears: Mapping[str, LinearInfo]) -> dict:
    return {u: [[n, linears[n].out_features, linears[n].in_features] for n in names] for u, names in units.items()}


def block_table(
    units: Mapping[str, Sequence[str]],
    linears: Mapping[str, LinearInfo],
    configs: Sequence[QuantSpec],
    damage: np.ndarray,
    method: str,
    scores: Mapping[str, np.ndarray] | None = None,
    meta: Mapping[str, object] | None = None,
) -> BlockDamageTable:
    """A table of multi-linear units; damage [U, C] in the order of `units`."""
    missing = [n for names in units.values() for n in names if n not in linears]
    if missing:
        raise ValueError(f"units name linears {missing[:3]} that the model does not have")
    member_shapes = tuple(tuple((linears[n].out_features, linears[n].in_features) for n in names)
                          for names in units.values())
    shapes = tuple((1, sum(o * i for o, i in ms)) for ms in member_shapes)
    return BlockDamageTable(
        units=tuple(units), shapes=shapes, configs=tuple(configs), damage=damage, method=method,
        scores=dict(scores or {}), meta={**dict(meta or {}), "members": _members_meta(units, linears)},
        member_shapes=member_shapes,
    )


def as_block_table(table: DamageTable) -> DamageTable:
    """Restore a BlockDamageTable from a loaded table whose meta carries "members"; else return it."""
    if isinstance(table, BlockDamageTable) or "members" not in table.meta:
        return table
    members = table.meta["members"]
    try:
        member_shapes = tuple(tuple((int(o), int(i)) for _, o, i in members[u]) for u in table.units)
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"meta['members'] of the {table.method} table is malformed ({err!r}); "
                         "recompute the table") from err
    return BlockDamageTable(table.units, table.shapes, table.configs, table.damage, table.method,
                            dict(table.scores), dict(table.meta), member_shapes)


def _combine_scores(name: str, values: np.ndarray, numels: np.ndarray) -> float:
    if name in MEAN_SCORES:
        return float((values * numels).sum() / numels.sum())
    if name in MAX_SCORES:
        return float(np.nan) if np.isnan(values).all() else float(np.nanmax(values))
    return float(values.sum())


def to_block_table(table: DamageTable, linears: Mapping[str, LinearInfo]) -> BlockDamageTable:
    """Sum an additive layer table into blocks: D(block, c) = Σ_members D(l, c) (see module doc)."""
    if "members" in table.meta:
        raise ValueError(f"the {table.method} table is already at block granularity")
    index = table.index()
    missing = [n for n in linears if n not in index]
    if missing:
        raise ValueError(f"the {table.method} table lacks linears {missing[:3]}; compute it for every linear")
    units = block_units(linears)
    numels = table.numels()
    damage = np.zeros((len(units), len(table.configs)))
    scores = {k: np.zeros(len(units)) for k in table.scores}
    for b, names in enumerate(units.values()):
        rows = [index[n] for n in names]
        damage[b] = table.damage[rows].sum(axis=0)
        for key, values in table.scores.items():
            scores[key][b] = _combine_scores(key, values[rows], numels[rows])
    meta = {**dict(table.meta), "granularity": "block"}
    return block_table(units, linears, table.configs, damage, table.method, scores, meta)


def measured_columns(configs: Sequence[QuantSpec], measure_configs: Sequence[QuantSpec] | None) -> list[int]:
    """Indices into `configs` of the configs to measure (None: all of them)."""
    if measure_configs is None:
        return list(range(len(configs)))
    missing = [c.label for c in measure_configs if c not in configs]
    if missing:
        raise ValueError(f"measure_configs {missing} are not among the configs {[c.label for c in configs]}; "
                         "add them to the candidates or drop them")
    wanted = set(measure_configs)
    return [j for j, c in enumerate(configs) if c in wanted]


def reference_column(configs: Sequence[QuantSpec], cols: Sequence[int]) -> int:
    """The column whose damage is a measured method's scalar score: the first quantizing one measured."""
    for j in cols:
        if not configs[j].keep:
            return j
    raise ValueError(f"the configs measured {[configs[j].label for j in cols]} keep every layer in 16 bit, "
                     "whose damage is 0 by definition; measure at least one quantizing config")


def measured_labels(damage: np.ndarray, configs: Sequence[QuantSpec]) -> list[str]:
    """Labels of the configs with at least one measured (non-NaN) damage."""
    return [c.label for j, c in enumerate(configs) if not np.isnan(damage[:, j]).all()]


@contextlib.contextmanager
def quantized_in_place(model: nn.Module, names: Sequence[str], spec: QuantSpec) -> Iterator[None]:
    """Within the block, the named linears hold fake_quantize(w, spec); restored bit-exactly after."""
    saved: dict[str, torch.Tensor] = {}
    try:
        with torch.no_grad():
            for name in names:
                module = model.get_submodule(name)
                saved[name] = module.weight.detach().clone()
                if not spec.keep:
                    set_weight(module, fake_quantize(get_weight(module).detach(), spec))
        yield
    finally:
        with torch.no_grad():
            for name, weight in saved.items():
                model.get_submodule(name).weight.copy_(weight)
