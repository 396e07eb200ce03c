"""`optimal`: the least total predicted damage under a storage budget, solved exactly.

Units that engines fuse (q/k/v, gate/up) are merged into one choice whose cost and damage
are the sums of their members', so they always share a config. Pins and keeps remove every
other option of the units they match; min/max bits remove options outside the range. The
ggml types (GGUF) are offered only to units whose row length splits into their blocks. The
remaining multiple-choice knapsack is solved exactly by `solver.solve_mckp`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mixbits.allocate.solver import Solution, solve_mckp
from mixbits.config import check_regex, parse_pin
from mixbits.errors import UserError
from mixbits.quant.spec import GGMLSpec, QuantSpec
from mixbits.sensitivity.table import DamageTable


class NonFiniteDamage(RuntimeError):
    """A damage table holds NaN where allocation would read it; the message names the layer and config."""


@dataclass(frozen=True)
class Constraints:
    """Per-unit restrictions on the configs allocation may choose."""

    min_bits: int = 2
    max_bits: int = 16
    keep: str | None = None  # regex of unit names kept in 16 bit
    pins: tuple[tuple[str, QuantSpec | GGMLSpec], ...] = ()  # (regex, spec): matching units take spec
    tie: bool = True  # fused units share one config

    def __post_init__(self) -> None:
        if self.keep is not None:
            check_regex(self.keep, "--keep")
        for pattern, _ in self.pins:
            check_regex(pattern, "--pin")

    @staticmethod
    def parse_pin(text: str) -> tuple[str, QuantSpec | GGMLSpec]:
        """Read ``REGEX=SPEC`` (``down_proj=w4g64``, ``down_proj=q4_k``) or ``REGEX=BITS`` (``down_proj=4``, group 128)."""
        return parse_pin(text)


def allowed_options(table: DamageTable, constraints: Constraints) -> np.ndarray:
    """[U, C] mask of the configs each unit may take."""
    bits = np.array([c.bits for c in table.configs])
    mask = np.broadcast_to((bits >= constraints.min_bits) & (bits <= constraints.max_bits), table.damage.shape).copy()
    fits = storable(table)
    mask &= fits
    for u, name in enumerate(table.units):
        if constraints.keep and re.search(constraints.keep, name):
            mask[u] = [c.keep for c in table.configs]
        for pattern, spec in constraints.pins:
            if re.search(pattern, name):
                if spec not in table.configs:
                    raise UserError(
                        f"pin {pattern}={spec.label} is not among the candidate configs "
                        f"{[c.label for c in table.configs]}; "
                        + ("plan over ggml types (--candidates gguf or both) to pin one" if isinstance(spec, GGMLSpec)
                           else "add its bits/group size to the candidates")
                    )
                mask[u] = np.array([c == spec for c in table.configs]) & fits[u]
                if not mask[u].any():
                    raise UserError(_unstorable_pin(table, pattern, spec, fits))
    for pattern, spec in constraints.pins:
        if not any(re.search(pattern, name) for name in table.units):
            raise UserError(f"--pin {pattern}={spec.label} matches no layer of the model; layer names look like "
                            f"{list(table.units[:3])}")
    return mask


def _unstorable_pin(table: DamageTable, pattern: str, spec, fits: np.ndarray) -> str:
    """The refusal of a pin to a ggml type that some matched layers' rows cannot take, naming them and
    the types they can take."""
    column = table.configs.index(spec)
    bad = [n for u, n in enumerate(table.units) if re.search(pattern, n) and not fits[u, column]]
    u = table.index()[bad[0]]
    can = sorted({c.label for c, ok in zip(table.configs, fits[u]) if ok and not c.keep and c.label != spec.label})
    return (f"--pin {pattern}={spec.label}: {len(bad)} matched layer(s) cannot store {spec.label} (their rows do "
            f"not split into its blocks of {getattr(spec, 'block', '?')} weights), e.g. {bad[:3]}; pin them to one "
            f"of {can} or narrow the regex to the layers that can take it")


def storable(table: DamageTable) -> np.ndarray:
    """[U, C] whether each unit's rows split into each config's blocks: a ggml type needs whole
    blocks (256 weights for the K-quants, 32 for the legacy types); affine specs fit any row.
    The cost model says so with an infinite cost (block units: when any member cannot)."""
    return np.isfinite(table.cost_bits())


def merged_problem(
    table: DamageTable, groups: Sequence[Sequence[str]], mask: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Cost and damage per group of tied units; unavailable options are +inf."""
    index = table.index()
    unit_cost = table.cost_bits()
    cost = np.zeros((len(groups), len(table.configs)))
    damage = np.zeros_like(cost)
    for g, members in enumerate(groups):
        rows = [index[m] for m in members]
        cost[g] = unit_cost[rows].sum(axis=0)
        damage[g] = table.damage[rows].sum(axis=0)
        ok = mask[rows].all(axis=0)
        if not ok.any():
            raise UserError(f"tied units {list(members)} have no config allowed for all of them; check --pin/--keep")
        nan = np.isnan(table.damage[rows]) & mask[rows]
        if nan.any():
            r, c = np.argwhere(nan)[0]
            raise NonFiniteDamage(
                f"the {table.method} damage table of {table.meta.get('model', 'the model')!r} is NaN for layer "
                f"{members[r]!r} at config {table.configs[c].label} ({int(np.isnan(table.damage).sum())} NaN "
                "entries in all): its inputs (weights or calibration activations) held NaN or inf; check the "
                "model, or recompute the table (--no-cache)"
            )
        cost[g, ~ok] = np.inf
        damage[g, ~ok] = np.inf
    return cost, damage


def unit_groups(units: Sequence[str], tied: Sequence[Sequence[str]], tie: bool) -> list[tuple[str, ...]]:
    """The tied groups restricted to `units`, or singletons when tying is off."""
    if not tie:
        return [(u,) for u in units]
    present = set(units)
    groups = [tuple(m for m in g if m in present) for g in tied]
    groups = [g for g in groups if g]
    covered = {m for g in groups for m in g}
    return groups + [(u,) for u in units if u not in covered]


def allocate_optimal(
    table: DamageTable,
    groups: Sequence[Sequence[str]],
    budget_bits: float,
    constraints: Constraints = Constraints(),
) -> tuple[dict[str, QuantSpec], Solution]:
    """The exact least-damage choice of config per unit with total stored bits <= budget_bits."""
    mask = allowed_options(table, constraints)
    cost, damage = merged_problem(table, groups, mask)
    solution = solve_mckp(cost, damage, budget_bits)
    specs = {m: table.configs[c] for g, c in zip(groups, solution.choice) for m in g}
    return {u: specs[u] for u in table.units}, solution
