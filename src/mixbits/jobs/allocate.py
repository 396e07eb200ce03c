"""`mixbits allocate`: a saved damage table + a strategy + a budget -> a plan, no weights needed.

Tied groups come from the table's meta (written by `mixbits run`/`analyze`), or, for tables
written elsewhere, from the name suffixes of the architecture table. Block tables keep their
members' exact costs and expand to a per-linear plan.

Which file a size budget counts. A plan that may hold ggml types (the candidates offered include
one: `--candidates gguf|both`, or a table computed over them) can only be stored as GGUF, so
`--target-size-mb` then counts the bytes of the GGUF file `mixbits export --format gguf` writes
(`export.gguf_size`: every tensor, header, metadata with the tokenizer, padding), read from the
model's config and tokenizer (no weights): each option is priced at its GGUF bytes
(`allocate.file_cost`), options GGUF cannot store on a row are never chosen, and the file lands at
or below the target. Otherwise the budget counts the native model (`--fixed-bytes` + the cost model).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from mixbits.allocate.budget import Budget
from mixbits.allocate.feasibility import check_table_budget
from mixbits.allocate.file_cost import file_cost_table
from mixbits.allocate.optimal import Constraints, unit_groups
from mixbits.allocate.registry import BUDGETED, STRATEGIES, StrategyResult, run_strategy
from mixbits.allocate.solver import REL_TOL
from mixbits.config import CANDIDATE_SETS
from mixbits.errors import UserError
from mixbits.export.gguf_size import GGUFSize, gguf_size, gguf_weight_bytes, meta_model
from mixbits.model.arch import ARCHS
from mixbits.model.load import resolve_model_source, with_pad_token
from mixbits.parsing import parse_names
from mixbits.plan import Plan
from mixbits.quant.spec import GGMLSpec, QuantSpec
from mixbits.sensitivity.table import DamageTable
from mixbits.sensitivity.units import as_block_table, expand_specs

GGUF_NAME = "model"  # general.name of the file `mixbits export --format gguf` writes by default, model.gguf


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


def _offered(spec, bits, group_sizes, candidates) -> bool:
    ggml = isinstance(spec, GGMLSpec)
    if spec.keep:
        return True
    if (candidates == "gguf" and not ggml) or (candidates == "affine" and ggml):
        return False
    return (bits is None or spec.bits in bits) and (ggml or group_sizes is None or spec.group_size in group_sizes)


def _restrict(table: DamageTable, bits, group_sizes, candidates=None) -> DamageTable:
    if candidates is not None and candidates not in CANDIDATE_SETS:
        raise UserError(f"--candidates {candidates!r} is not known; use one of {', '.join(CANDIDATE_SETS)}")
    cols = [j for j, c in enumerate(table.configs) if _offered(c, bits, group_sizes, candidates)]
    if not any(not table.configs[j].keep for j in cols):
        what = "--bits/--group-sizes" if candidates is None else "--candidates/--bits/--group-sizes"
        raise UserError(f"{what} leave no quantizing config; the table has {[c.label for c in table.configs]}"
                        + ("; compute a table over the ggml types (allocation.candidates gguf)"
                           if candidates == "gguf" else ""))
    if len(cols) == len(table.configs):
        return table
    return dataclasses.replace(table, configs=tuple(table.configs[j] for j in cols), damage=table.damage[:, cols])


@dataclass(frozen=True, eq=False)
class Allocation:
    """What `allocate_from_table` gives: a result per strategy, the table allocated on (priced in
    GGUF bytes when the budget counts a GGUF file), and for such a budget the target and each
    strategy's exact predicted file size in bytes."""

    results: dict[str, StrategyResult]
    table: DamageTable
    target_bytes: int | None = None
    file_bytes: dict[str, int] = dataclasses.field(default_factory=dict)


def allocate_from_table(
    path: Path, *, strategy: str, target_bpw=None, target_size_mb=None, fixed_bytes=None, bits=None,
    group_sizes=None, min_bits=2, max_bits=16, keep=None, pins=(), tie=True, score=None, alpha=0.5,
    spec=None, output: Path | None = None, candidates: str | None = None, model: str | None = None,
    gguf_pre: str = "default",
) -> Allocation:
    """Run one or several strategies (comma list, or 'all') on a saved table; write the first plan.
    `candidates` (affine, gguf, both; None: every config of the table) restricts the configs;
    `model` and `gguf_pre` say which GGUF file a size budget over ggml types counts."""
    if fixed_bytes is not None and fixed_bytes < 0:
        raise UserError(f"--fixed-bytes {fixed_bytes} is negative; give the bytes stored outside the block "
                        "linears (results.json 'other_bytes_fp16'), 0 or more")
    table = _restrict(as_block_table(DamageTable.load(path)), bits, group_sizes, candidates)
    names = list(parse_names(strategy, tuple(STRATEGIES)))
    constraints = Constraints(min_bits=min_bits, max_bits=max_bits, keep=keep,
                              pins=tuple(Constraints.parse_pin(p) for p in pins), tie=tie)
    groups = unit_groups(table.units, table.meta.get("tied") or tied_by_name(table.units), tie)
    budget_bits, size, stored_as, target = None, None, "model", None
    if target_size_mb is not None and any(isinstance(c, GGMLSpec) for c in table.configs):
        size, target = _gguf_file(table, model, fixed_bytes, gguf_pre), math.floor(target_size_mb * 1e6)
        table, fixed_bytes, stored_as = file_cost_table(table, gguf_weight_bytes, "GGUF file"), size.fixed, "GGUF file"
    if target_bpw is not None or target_size_mb is not None:
        if target_size_mb is not None and fixed_bytes is None:
            fixed_bytes = table.meta.get("other_bytes_fp16")
            if fixed_bytes is None:
                raise UserError("--target-size-mb needs --fixed-bytes (bytes outside the block linears, as in "
                                 "results.json 'other_bytes_fp16'); or give --target-bpw")
        budget = Budget(bpw=target_bpw, size_mb=target_size_mb)
        budget_bits = check_table_budget(table, groups, constraints, budget, fixed_bytes or 0, stored_as)
        if size is not None:  # whole bytes, and the solver's relative slack kept below the target
            budget_bits = 8.0 * (target - size.fixed) * (1 - 2 * REL_TOL)
    uniform_spec = QuantSpec.parse(spec) if spec else None
    results = {}
    for name in names:
        if budget_bits is None and strategy == "all" and name in BUDGETED - {"adaptive", "power_law"}:
            continue  # needs a budget; an explicit request still gets the error
        results[name] = run_strategy(name, table, groups, budget_bits, score=score, alpha=alpha,
                                     spec=uniform_spec, constraints=constraints)
    plans = {name: _plan(table, r, path) for name, r in results.items()}
    file_bytes = {name: size.file_bytes(plan) for name, plan in plans.items()} if size is not None else {}
    if output is not None and plans:
        first = next(iter(plans))
        plan = plans[first]
        if size is not None:
            plan = Plan(plan.specs, {**plan.meta, "gguf": {"file_bytes": file_bytes[first], "target_bytes": target,
                                                           "general_name": GGUF_NAME, "tokenizer_pre": gguf_pre}})
        plan.save(output)
    return Allocation(results, table, target, file_bytes)


def _plan(table: DamageTable, result: StrategyResult, path: Path) -> Plan:
    plan = result.to_plan(sensitivity=str(path))
    if "members" in table.meta:  # block units -> every member linear takes its block's spec
        units = {u: [m[0] for m in table.meta["members"][u]] for u in table.units}
        plan = Plan(expand_specs(plan.specs, units), plan.meta)
    return plan


def _gguf_file(table: DamageTable, model: str | None, fixed_bytes, gguf_pre: str) -> GGUFSize:
    """The GGUF file a size budget over ggml types counts, from the model's config and tokenizer."""
    if fixed_bytes is not None:
        raise UserError("--fixed-bytes is for the native model; with ggml candidates --target-size-mb counts the "
                        "GGUF file, whose fixed bytes come from the model (--model): drop --fixed-bytes, or give "
                        "--candidates affine")
    name = model or table.meta.get("model")
    if not name:
        raise UserError("--target-size-mb over ggml types counts the GGUF file, which needs the model's config and "
                        "tokenizer; the table names no model: pass --model NAME_OR_FOLDER")
    config, tokenizer = _config_and_tokenizer(str(name))
    size = gguf_size(meta_model(config), tokenizer, tokenizer_pre=gguf_pre, name=GGUF_NAME)
    units = set(size.shapes)
    members = {m[0] for ms in table.meta["members"].values() for m in ms} if "members" in table.meta else set(table.units)
    if members != units:
        odd = sorted(members ^ units)[:3]
        raise UserError(f"model {name!r} does not match the table: its block linears and the table's units differ "
                        f"(e.g. {odd}); pass the model the table was computed on (--model)")
    return size


def _config_and_tokenizer(name: str):
    """Config and tokenizer of a model (no weights), the tokenizer with its pad token set as
    `load_model` sets it, so the metadata is what a run saves and an export writes."""
    from transformers import AutoConfig, AutoTokenizer

    source = resolve_model_source(name)
    try:
        config = AutoConfig.from_pretrained(source)
    except OSError as err:
        raise UserError(f"--model {name!r}: no config.json could be read ({err}); give a model folder, an embedded "
                        "model name or a hub id") from err
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError):
        tokenizer = None  # no tokenizer: the export writes the model alone
    return config, with_pad_token(tokenizer)
