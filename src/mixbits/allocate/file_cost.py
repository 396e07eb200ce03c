"""Allocation priced in the bytes of one file format, instead of the cost model's.

The cost model (`quant/cost.py`) counts what mixbits' native format stores. A plan meant for
another file pays that file's bytes: GGUF stores an affine 4-bit spec as Q4_0/Q4_1 blocks of 32
whatever its group size, pads every tensor to 32 bytes, and cannot store 2-, 3- or 6-bit affine
grids at all. `FileCostTable` is a damage table whose cost is given per unit and config by such
a format: ``cost_bits[u, c] = 8 * Σ_{members m of u} bytes(shape_m, c)``, +inf where the format
cannot store config c on a member (the solver and every strategy then never choose it, so the
file is written as planned, no layer moved). Everything downstream (tied groups, the exact
solver, the heuristics, achieved bits) reads `cost_bits` and is unchanged.

The price function comes from the format's writer (jobs wire `export.gguf_size.gguf_weight_bytes`
in; allocate does not import export). Cost: one call per member and config, done once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from mixbits.quant.spec import GGMLSpec, QuantSpec
from mixbits.sensitivity.table import DamageTable
from mixbits.sensitivity.units import BlockDamageTable

Price = Callable[[tuple[int, int], "QuantSpec | GGMLSpec"], "int | None"]
"""Bytes an [out, in] weight takes in the file under a spec, or None where the file cannot store it."""


@dataclass(frozen=True)
class FileCostTable(DamageTable):
    """A DamageTable whose `cost_bits` are a file format's stored bits ([U, C], inf: not storable)."""

    file_bits: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    file: str = "file"  # what the bits are of, for messages ("GGUF file")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.file_bits.shape != self.damage.shape:
            raise ValueError(f"file_bits {self.file_bits.shape} must match damage {self.damage.shape} (units x configs)")

    def cost_bits(self) -> np.ndarray:
        return self.file_bits.copy()


def member_shapes(table: DamageTable) -> tuple[tuple[tuple[int, int], ...], ...]:
    """Per unit, the (out, in) of each linear it quantizes: a block table's members, else the unit itself."""
    if isinstance(table, BlockDamageTable):
        return table.member_shapes
    return tuple((tuple(s),) for s in table.shapes)


def file_cost_table(table: DamageTable, price: Price, file: str) -> FileCostTable:
    """`table` with every unit and config priced by `price` (see the module docstring)."""
    bits = np.empty(table.damage.shape)
    for u, shapes in enumerate(member_shapes(table)):
        for c, spec in enumerate(table.configs):
            sizes = [price(s, spec) for s in shapes]
            bits[u, c] = np.inf if any(b is None for b in sizes) else 8.0 * sum(sizes)
    return FileCostTable(table.units, table.shapes, table.configs, table.damage, table.method, dict(table.scores),
                         dict(table.meta), bits, file)
