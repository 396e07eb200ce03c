"""Bit plans of the classifier flow, built from one sensitivity order of the layers.

`order` lists the linears most sensitive first. With k = round(f · n) of the n layers (f =
`int4_fraction`, at least 1 and at most n − 1) being the k least sensitive:

    uniform_int8            every layer at 8 bits
    uniform_int4            every layer at 4 bits
    int6_int4               the n − k most sensitive at 6 bits, the k least sensitive at 4
    int8_selective_int4     the n − k most sensitive at 8 bits, the k least sensitive at 4
    least_sensitive_int4    only the least sensitive layer at 4 bits, every other kept in 16 bit

These are the fixed-tier rules of the DistilBERT SST-2 seed project, kept as named baselines:
they spend no budget and solve nothing (`allocate/` holds the budgeted solvers). All layers use
one group size.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from mixbits.quant.spec import QuantSpec

STRATEGIES = ("uniform_int8", "uniform_int4", "int6_int4", "int8_selective_int4", "least_sensitive_int4")


@dataclass(frozen=True)
class Strategy:
    name: str
    rule: str  # the rule in words, for tables
    specs: Mapping[str, QuantSpec]  # layer -> spec; layers not named stay in 16 bit


def sensitivity_order(names: Sequence[str], scores: Sequence[float]) -> list[str]:
    """`names` from the highest score to the lowest; equal scores keep model order."""
    if len(names) != len(scores) or not np.all(np.isfinite(scores)):
        raise ValueError(f"{len(names)} layers and {len(scores)} scores (finite?); give one finite score per layer")
    return [names[i] for i in sorted(range(len(names)), key=lambda i: -float(scores[i]))]


def int4_count(n_layers: int, int4_fraction: float) -> int:
    """How many of the least sensitive layers the mixed strategies put at 4 bits (1 .. n − 1)."""
    if n_layers < 2:
        raise ValueError(f"{n_layers} layer(s); the mixed strategies need at least 2")
    return min(n_layers - 1, max(1, round(int4_fraction * n_layers)))


def build_strategies(order: Sequence[str], *, group_size: int | None, int4_fraction: float) -> list[Strategy]:
    """The five plans of the module docstring, in `STRATEGIES` order."""
    n, k = len(order), int4_count(len(order), int4_fraction)
    w4, w6, w8 = (QuantSpec(b, group_size) for b in (4, 6, 8))
    high, low = list(order[: n - k]), list(order[n - k:])
    return [
        Strategy("uniform_int8", f"all {n} layers {w8.label}", {name: w8 for name in order}),
        Strategy("uniform_int4", f"all {n} layers {w4.label}", {name: w4 for name in order}),
        Strategy("int6_int4", f"{len(high)} most sensitive {w6.label}, {k} least {w4.label}",
                 {**{name: w6 for name in high}, **{name: w4 for name in low}}),
        Strategy("int8_selective_int4", f"{len(high)} most sensitive {w8.label}, {k} least {w4.label}",
                 {**{name: w8 for name in high}, **{name: w4 for name in low}}),
        Strategy("least_sensitive_int4", f"only {order[-1]} {w4.label}, the rest kept", {order[-1]: w4}),
    ]
