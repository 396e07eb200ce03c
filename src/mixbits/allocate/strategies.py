"""What every seed strategy shares: the problem it sees, the result it returns, `uniform`.

The seed write-ups (see /work/shared/seeds) allocate bits from one scalar sensitivity per
layer through fixed rules. Here each rule is a pure function ``Problem -> StrategyResult``
(`heuristics.py`, `presets.py`); `registry.py` builds the problem from a damage table and
picks a rule by name. This module fixes the conventions they all follow:

- Score. One vector from ``table.scores`` (default: the first one the table holds), or
  ``"damage:<label>"`` for a unit's predicted damage at one config. Scores are used as given;
  each rule normalises them as its seed says (min-max, mean/std, quantiles).
- Tied units (q/k/v, gate/up) must share a config, so a group takes the **max** of its
  members' scores (a fused group is as sensitive as its most sensitive member). Statistics
  (mean, std, quantiles, min/max) are taken over units, each carrying its group's score,
  so a fused group of three weighs like three layers, as it did in the seeds' layer lists.
- Configs. A rule asks for a bit-width and group size; it gets the nearest config the
  candidates and the constraints (min/max bits, keep, pins) allow: nearest bit-width first
  (ties go up), then nearest group size in log2 (per-channel counts as 2**16; ties: the
  cheaper), then the asked symmetry, then the cheaper. Pinned or kept units have one option.
- Budget. Achieved bits per weight count codes, scales and zero-points by the cost model over
  all units. ``miss = achieved - target`` when the plan exceeds the target (with the exact
  solver's 1e-9 relative slack), else 0: rules with fixed tiers do not look at the budget and
  say so through `miss`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType

import numpy as np

from mixbits.allocate.optimal import Constraints, allowed_options, merged_problem
from mixbits.allocate.solver import REL_TOL
from mixbits.errors import UserError
from mixbits.plan import Plan
from mixbits.quant.spec import GGMLSpec, QuantSpec, parse_spec
from mixbits.sensitivity.table import DamageTable

PER_CHANNEL_LOG2 = 16.0  # log2 "group size" of per-channel scales, for nearest-group matching
_TIE_UP = 1e-9  # nudges exact ties in bit distance towards the larger bit-width


@dataclass(frozen=True)
class StrategyResult:
    """A plan from one strategy: spec per unit, achieved and target bits per weight, the
    amount by which it exceeds the target (0 when met or without a target), the rule used."""

    specs: Mapping[str, QuantSpec]
    bpw: float
    target_bpw: float | None
    miss: float
    rule: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "specs", MappingProxyType(dict(self.specs)))

    @property
    def meets_target(self) -> bool:
        return self.miss == 0.0

    def to_plan(self, **meta) -> Plan:
        return Plan(self.specs, {"strategy": self.rule, "bpw": self.bpw, "target_bpw": self.target_bpw, **meta})


@dataclass(frozen=True, eq=False)  # eq=False: array fields
class Problem:
    """What a heuristic sees, per group of tied units (G groups, C candidate configs).

    `cost` [G, C]: stored bits of the group under each config, inf where the constraints
    forbid it. `score` [G]: the group's score (max over members). `size` [G]: members.
    """

    units: tuple[str, ...]
    groups: tuple[tuple[str, ...], ...]
    configs: tuple[QuantSpec, ...]
    cost: np.ndarray
    score: np.ndarray
    size: np.ndarray
    numel: int
    budget_bits: float | None
    score_name: str = field(default="score")

    @property
    def unit_scores(self) -> np.ndarray:
        """[sum(size)] every unit's (group-shared) score: the population for statistics."""
        return np.repeat(self.score, self.size)

    @property
    def bits(self) -> np.ndarray:
        """[C] bit-width of each config (16 = kept)."""
        return np.array([c.bits for c in self.configs], dtype=np.float64)


def select_score(table: DamageTable, name: str | None = None) -> tuple[str, np.ndarray]:
    """The named score vector [U]; None takes the table's first score, or, without scores,
    the damage at the first quantizing config every unit can take (a ggml type a row cannot
    split has NaN damage there: Q2_K on SmolLM2's 576-wide rows), else the first."""
    if name is None:
        if table.scores:
            name = next(iter(table.scores))
        else:
            quantizing = [j for j, c in enumerate(table.configs) if not c.keep]
            whole = [j for j in quantizing if np.isfinite(table.damage[:, j]).all()]
            name = "damage:" + table.configs[(whole or quantizing)[0]].label
    if name.startswith("damage:"):
        labels = [c.label for c in table.configs]
        label = parse_spec(name.split(":", 1)[1]).label
        if label not in labels:
            raise UserError(f"score {name!r}: {label} is not a candidate config; use damage:<one of {labels}>")
        values = table.damage[:, labels.index(label)]
    elif name in table.scores:
        values = table.scores[name]
    else:
        raise UserError(
            f"score {name!r} is not in this table; use one of {sorted(table.scores)} or damage:<config label>"
        )
    bad = [table.units[u] for u in np.flatnonzero(~np.isfinite(values))]
    if bad:
        raise UserError(f"score {name!r} is NaN/inf for {len(bad)} unit(s), e.g. {bad[:3]}; choose another --score")
    return name, np.asarray(values, dtype=np.float64)


def build_problem(
    table: DamageTable,
    groups: Sequence[Sequence[str]],
    budget_bits: float | None = None,
    *,
    score: str | None = None,
    constraints: Constraints = Constraints(),
) -> Problem:
    """The per-group view of `table` a heuristic works on; `groups` must cover every unit once."""
    index = table.index()
    seen: dict[str, int] = {}
    for members in groups:
        for m in members:
            if m not in index:
                raise ValueError(f"group member {m!r} is not a unit of the table; units look like {table.units[:3]}")
            seen[m] = seen.get(m, 0) + 1
    twice = [m for m, k in seen.items() if k > 1]
    missing = [u for u in table.units if u not in seen]
    if twice or missing:
        raise ValueError(
            f"groups must hold every unit exactly once: repeated {twice[:3]}, missing {missing[:3]}; "
            "build them with unit_groups(table.units, tied, tie)"
        )
    if budget_bits is not None and not budget_bits > 0:
        raise UserError(f"budget_bits={budget_bits!r} must be positive (or None for rules without a budget)")
    name, values = select_score(table, score)
    cost, _ = merged_problem(table, groups, allowed_options(table, constraints))
    return Problem(
        units=tuple(table.units),
        groups=tuple(tuple(g) for g in groups),
        configs=tuple(table.configs),
        cost=cost,
        score=np.array([max(values[index[m]] for m in g) for g in groups]),
        size=np.array([len(g) for g in groups], dtype=np.int64),
        numel=int(table.numels().sum()),
        budget_bits=None if budget_bits is None else float(budget_bits),
        score_name=name,
    )


def minmax(x: np.ndarray) -> np.ndarray:
    """(x - min) / (max - min) in [0, 1]; all zeros when every value is equal."""
    span = float(x.max() - x.min())
    return (x - x.min()) / span if span > 0 else np.zeros_like(x, dtype=np.float64)


def _log2_group(group_size: int | None) -> float:
    return PER_CHANNEL_LOG2 if group_size is None else math.log2(group_size)


def group_of(spec: QuantSpec | GGMLSpec) -> int | None:
    """Weights per scale: the group size, or a ggml type's sub-block (what the rules compare)."""
    return spec.sub_block if isinstance(spec, GGMLSpec) else spec.group_size


def ladder(
    problem: Problem, group_size, cap: int = 16, symmetric: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Per group, one allowed config per bit-width <= `cap` (all allowed ones if none is),
    the one nearest `group_size` (scalar, or [G]); returns configs [G, R] (-1 padding) and
    their bits [G, R] (inf padding), rungs sorted by bits."""
    sizes = np.broadcast_to(np.asarray(group_size, dtype=object), (len(problem.groups),))
    rungs = []
    for g, want in enumerate(sizes):
        allowed = [c for c in range(len(problem.configs)) if np.isfinite(problem.cost[g, c])]
        capped = [c for c in allowed if problem.configs[c].bits <= cap] or allowed
        best: dict[int, tuple] = {}
        for c in capped:
            spec = problem.configs[c]
            key = (abs(_log2_group(group_of(spec)) - _log2_group(want)), spec.symmetric != symmetric,
                   problem.cost[g, c], c)
            if spec.bits not in best or key < best[spec.bits]:
                best[spec.bits] = key
        rungs.append([best[b][-1] for b in sorted(best)])
    width = max(len(r) for r in rungs)
    cfg = np.full((len(rungs), width), -1, dtype=np.int64)
    for g, r in enumerate(rungs):
        cfg[g, : len(r)] = r
    bits = np.where(cfg >= 0, problem.bits[np.maximum(cfg, 0)], np.inf)
    return cfg, bits


def snap(rung_bits: np.ndarray, want: np.ndarray) -> np.ndarray:
    """[G] rung position of the bit-width nearest `want` [G] (exact ties go up)."""
    real = np.isfinite(rung_bits)
    rungs = np.where(real, rung_bits, 0.0)
    distance = np.abs(rungs - np.asarray(want, dtype=np.float64)[:, None]) - _TIE_UP * rungs
    return np.argmin(np.where(real, distance, np.inf), axis=1)


def total_bits(problem: Problem, choice: np.ndarray) -> float:
    return float(problem.cost[np.arange(len(choice)), choice].sum())


def fits(total: float, budget_bits: float) -> bool:
    """Within the budget up to the exact solver's relative slack."""
    return total <= budget_bits * (1 + REL_TOL)


def finish(
    problem: Problem, choice: np.ndarray, rule: str, budget_bits: float | None = None, scored: bool = True
) -> StrategyResult:
    """The result of choosing config `choice[g]` for every group; `budget_bits` defaults to
    the problem's (presets pass their nominal target when there is none); `scored` adds the
    score's name to the rule."""
    choice = np.asarray(choice, dtype=np.int64)
    total = total_bits(problem, choice)
    if not np.isfinite(total):
        raise AssertionError(f"a strategy chose a forbidden config (rule {rule!r}); this is a bug")
    budget_bits = problem.budget_bits if budget_bits is None else budget_bits
    bpw = total / problem.numel
    target = None if budget_bits is None else budget_bits / problem.numel
    miss = 0.0 if target is None or fits(total, budget_bits) else bpw - target
    by_group = {m: problem.configs[c] for g, c in zip(problem.groups, choice) for m in g}
    rule = f"{rule} [score {problem.score_name}]" if scored else rule
    return StrategyResult({u: by_group[u] for u in problem.units}, bpw, target, miss, rule)


def uniform(problem: Problem, spec: QuantSpec | None = None) -> StrategyResult:
    """Every unit takes `spec` (nearest allowed config). Without a spec, the richest uniform
    candidate whose plan fits the budget (ties: the larger group), else the cheapest one."""
    if spec is not None:
        cfg, bits = ladder(problem, group_of(spec), symmetric=spec.symmetric)
        choice = cfg[np.arange(len(cfg)), snap(bits, np.full(len(cfg), spec.bits))]
        moved = sum(problem.configs[c] != spec for c in choice)
        note = f"; {moved} of {len(choice)} groups take the nearest allowed config" if moved else ""
        return finish(problem, choice, f"uniform {spec.label}{note}", scored=False)
    if problem.budget_bits is None:
        raise UserError("uniform needs a spec (e.g. w4g128) or a budget to pick the richest fitting spec")
    plans = [(uniform(problem, c), c) for c in problem.configs if not c.keep]
    fitting = [(r, c) for r, c in plans if r.meets_target]
    if not fitting:
        result = min(plans, key=lambda p: p[0].bpw)[0]
        return replace(result, rule=result.rule + " (cheapest uniform spec; none fits the budget)")
    result = max(fitting, key=lambda p: (p[0].bpw, _log2_group(group_of(p[1]))))[0]
    return replace(result, rule=result.rule + " (richest uniform spec within the budget)")
