"""The order and the stop rule of the iterative mode (`jobs.iterative` walks them).

Units (a linear, or a group of linears that share a config such as q/k/v) are sorted by their
summed predicted damage at one target config, least first; a step is kept while the relative
perplexity increase over the original stays within the limit:

    p / p0 - 1  <=  max_ppl_increase
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mixbits.errors import UserError
from mixbits.quant.spec import QuantSpec
from mixbits.sensitivity.table import DamageTable


def exceeds(ppl: float, original_ppl: float, max_increase: float) -> bool:
    """The stop rule: the relative increase over the original is above the limit (NaN exceeds)."""
    increase = ppl / original_ppl - 1.0
    return not increase <= max_increase


def sensitivity_order(table: DamageTable, groups: Sequence[tuple[str, ...]], spec: QuantSpec) -> list[tuple[str, ...]]:
    """Groups sorted by their summed predicted damage at `spec`, least first (model order breaks ties)."""
    if spec not in table.configs:
        raise UserError(f"the damage table has no column for {spec.label}; its configs are "
                         f"{[c.label for c in table.configs]} (add the bits/group size to --bits/--group-sizes)")
    col, index = table.configs.index(spec), table.index()
    missing = [n for g in groups for n in g if n not in index]
    if missing:
        raise UserError(f"the damage table has no row for {missing[:3]}; it was computed for another model")
    damage = [float(sum(table.damage[index[n], col] for n in g)) for g in groups]
    order = np.argsort(np.asarray(damage), kind="stable")
    return [tuple(groups[i]) for i in order]
