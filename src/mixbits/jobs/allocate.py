"""`mixbits allocate`: a saved damage table + a strategy + a budget -> a plan, no model needed.

Tied groups come from the table's meta (written by `mixbits run`/`analyze`), or, for tables
written elsewhere, from the name suffixes of the architecture table. Block tables keep their
members' exact costs and expand to a per-linear plan.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from mixbits.allocate.budget import Budget
from mixbits.allocate.feasibility import check_budget
from mixbits.allocate.optimal import Constraints, unit_groups
from mixbits.allocate.registry import BUDGETED, STRATEGIES, StrategyResult, run_strategy
from mixbits.errors import UserError
from mixbits.model.arch import ARCHS
from mixbits.parsing import parse_names
from mixbits.plan import Plan
from mixbits.quant.spec import QuantSpec
from mixbits.sensitivity.table import DamageTable
from mixbits.sensitivity.units import as_block_table, expand_specs


def tied_by_name(units) -> list[tuple[str, ...]]:
    """Fused groups (q/k/v, gate/up) recognised by the name suffixes of the arch table."""
    groups = []
    for fused in {f for arch in ARCHS for f in arch.fused}:
        by_prefix: dict[str, list[str]] = {}
        for u in units:
            for suffix in fused:
                if u.endswith("." + suffix):
                    by_prefix.setdefault(u[: -len(suffix) - 1], []).append(u)
        groups += [tuple(m) for m in by_prefix.values() if len(m) > 1]
    return groups


def _restrict(table: DamageTable, bits, group_sizes) -> DamageTable:
    cols = [j for j, c in enumerate(table.configs)
            if c.keep or ((bits is None or c.bits in bits) and (group_sizes is None or c.group_size in group_sizes))]
    if not any(not table.configs[j].keep for j in cols):
        raise UserError(f"--bits/--group-sizes leave no quantizing config; the table has {[c.label for c in table.configs]}")
    if len(cols) == len(table.configs):
        return table
    return dataclasses.replace(table, configs=tuple(table.configs[j] for j in cols), damage=table.damage[:, cols])


def allocate_from_table(
    path: Path, *, strategy: str, target_bpw=None, target_size_mb=None, fixed_bytes=None, bits=None,
    group_sizes=None, min_bits=2, max_bits=16, keep=None, pins=(), tie=True, score=None, alpha=0.5,
    spec=None, output: Path | None = None,
) -> tuple[dict[str, StrategyResult], DamageTable]:
    """Run one or several strategies (comma list, or 'all') on a saved table; write the first plan."""
    if fixed_bytes is not None and fixed_bytes < 0:
        raise UserError(f"--fixed-bytes {fixed_bytes} is negative; give the bytes stored outside the block "
                        "linears (results.json 'other_bytes_fp16'), 0 or more")
    table = _restrict(as_block_table(DamageTable.load(path)), bits, group_sizes)
    names = list(parse_names(strategy, tuple(STRATEGIES)))
    constraints = Constraints(min_bits=min_bits, max_bits=max_bits, keep=keep,
                              pins=tuple(Constraints.parse_pin(p) for p in pins), tie=tie)
    groups = unit_groups(table.units, table.meta.get("tied") or tied_by_name(table.units), tie)
    budget_bits = None
    if target_bpw is not None or target_size_mb is not None:
        if target_size_mb is not None and fixed_bytes is None:
            fixed_bytes = table.meta.get("other_bytes_fp16")
            if fixed_bytes is None:
                raise UserError("--target-size-mb needs --fixed-bytes (bytes outside the block linears, as in "
                                 "results.json 'other_bytes_fp16'); or give --target-bpw")
        budget = Budget(bpw=target_bpw, size_mb=target_size_mb)
        shapes = dict(zip(table.units, table.shapes))
        budget_bits = check_budget(shapes, table.configs, groups, constraints, budget, fixed_bytes or 0)
    uniform_spec = QuantSpec.parse(spec) if spec else None
    results = {}
    for name in names:
        if budget_bits is None and strategy == "all" and name in BUDGETED - {"adaptive", "power_law"}:
            continue  # needs a budget; an explicit request still gets the error
        results[name] = run_strategy(name, table, groups, budget_bits, score=score, alpha=alpha,
                                     spec=uniform_spec, constraints=constraints)
    if output is not None and results:
        first = next(iter(results))
        plan = results[first].to_plan(sensitivity=str(path))
        if "members" in table.meta:  # block units -> every member linear takes its block's spec
            units = {u: [m[0] for m in table.meta["members"][u]] for u in table.units}
            plan = Plan(expand_specs(plan.specs, units), plan.meta)
        plan.save(output)
    return results, table
