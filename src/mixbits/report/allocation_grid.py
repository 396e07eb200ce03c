"""The mixed plan as a grid: transformer blocks (rows) x projections (columns).

A linear's block is the first all-digit part of its dotted name (`model.layers.3.mlp.up_proj`
-> 3, `transformer.h.3.attn.c_proj` -> 3) unless layer_statistics.json gives it; its column is
the rest of the name after that part (`mlp.up_proj`, `attn.c_proj`). Columns are labelled by
their last part, without `_proj` when every column's ends so (q, k, v, o, gate, up, down), or
by their last two parts where the last one alone is ambiguous (GPT-2's `attn.c_proj` and
`mlp.c_proj`), and ordered as they first appear in the model. A cell holds the layer's bits
(16 = kept in 16 bit; NaN = no such linear in that block) and a short text such as `3/128`,
`4/pc`, `3/64s` or `16`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from mixbits.quant.spec import GGMLSpec, QuantSpec, parse_spec


@dataclass(frozen=True)
class AllocationGrid:
    blocks: tuple[int, ...]
    columns: tuple[str, ...]  # name part after the block index, e.g. "self_attn.q_proj"
    labels: tuple[str, ...]  # short column labels, e.g. "q"
    bits: np.ndarray  # [blocks, columns] float, NaN where the block has no such linear
    text: tuple[tuple[str, ...], ...]  # [blocks][columns] cell text, "" where absent

    def cell(self, block: int, column: str) -> tuple[float, str]:
        """(bits, text) of one cell, by block index and column (long or short name)."""
        r = self.blocks.index(block)
        c = self.columns.index(column) if column in self.columns else self.labels.index(column)
        return float(self.bits[r, c]), self.text[r][c]


def split_name(name: str) -> tuple[int | None, str]:
    """(block index, name after it); (None, name) for a linear outside any numbered block."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return int(part), ".".join(parts[i + 1:]) or part
    return None, name


def short_labels(columns: Sequence[str]) -> tuple[str, ...]:
    """Last name part (without `_proj` when every column's ends so, as Llama's q_proj ... down_proj);
    the last two parts where the last part alone repeats (GPT-2's attn.c_proj, mlp.c_proj)."""
    last = [c.rsplit(".", 1)[-1] for c in columns]
    strip = all(t.endswith("_proj") and len(t) > len("_proj") for t in last) and len(set(last)) == len(last)
    out = []
    for column, tail in zip(columns, last):
        label = ".".join(column.split(".")[-2:]) if last.count(tail) > 1 else tail
        out.append(label.removesuffix("_proj") if strip else label)
    return tuple(out)


def cell_text(spec: QuantSpec | GGMLSpec) -> str:
    if spec.keep:
        return "16"
    if isinstance(spec, GGMLSpec):
        return spec.name
    group = "pc" if spec.group_size is None else str(spec.group_size)
    return f"{spec.bits}/{group}{'s' if spec.symmetric else ''}"


def allocation_grid(plan: Mapping[str, str], names: Sequence[str] | None = None,
                    blocks: Mapping[str, int] | None = None) -> AllocationGrid:
    """The grid of `plan` (layer -> spec label) over `names` (every linear, model order; default
    the plan's layers; a name the plan lacks is kept in 16 bit). `blocks` overrides the block
    index read from a name. Linears outside numbered blocks are left out."""
    names = list(plan) if names is None else list(names)
    where: dict[str, tuple[int, str]] = {}
    for name in names:
        block, column = split_name(name)
        block = (blocks or {}).get(name, block)
        if block is not None:
            where[name] = (int(block), column)
    rows = sorted({b for b, _ in where.values()})
    columns = list(dict.fromkeys(c for _, c in where.values()))
    bits = np.full((len(rows), len(columns)), np.nan)
    text = [[""] * len(columns) for _ in rows]
    for name, (block, column) in where.items():
        spec = parse_spec(plan.get(name, "fp16"))
        r, c = rows.index(block), columns.index(column)
        bits[r, c], text[r][c] = spec.bits, cell_text(spec)
    return AllocationGrid(tuple(rows), tuple(columns), short_labels(columns), bits, tuple(map(tuple, text)))
