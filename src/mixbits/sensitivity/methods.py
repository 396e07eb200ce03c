"""Every sensitivity method as data, and one call that computes any set of them.

`METHODS` maps a name to the function that computes its damage table, whether it runs
backward passes, and its kind:

* "predicted": a model of the loss increase from per-linear statistics (Fisher, gradient,
  Hessian, output error). The model is additive over linears, so block damage is the sum of
  the members' (`units.to_block_table`), and every config costs only a fake-quantization.
* "measured": the damage itself, by quantizing a unit and running the windows (divergence,
  ablation). Block units quantize all their linears together; each config costs passes.

`compute_tables` runs the methods asked for, sharing the one calibration gradient pass between
"fisher" and "gradient" (`gradient.gradient_fisher_tables`) when both are asked, and records in
every table's meta: method, kind, granularity, configs_measured, seconds (wall time of the
method; a shared pass is charged in full to both, with "shared_pass_with" naming the other),
windows, tokens, options and quantizer "rtn".

`cached_tables` is the one builder of cached tables, used by `mixbits run` (its Fisher table)
and `mixbits analyze` alike. Given a `BlockSource` (the streamed run's lazy checkpoint) instead of
a loaded model, it computes the Fisher and the gradient table (`fisher_streamed`, one pass for
both), the output error (`output_error_streamed`) and the Hessian trace (`hessian_streamed`, the
same probes from the same generator) block by block: the same numbers, so the same key and the
same cached file. One key rule (`sensitivity.cache.cache_key_parts`, with the
method's options, the measured configs and the random seed where they matter) and one
metadata rule (the meta `compute_tables` records, nothing else; callers add their own
provenance to the table they get back with `DamageTable.with_meta`, never to the cached one).
So the same model, tokens and configs give the same cached file whichever command made it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Literal

import numpy as np
import torch
from torch import nn

from mixbits.errors import UserError
from mixbits.model.arch import LinearInfo
from mixbits.model.stream import BlockSource
from mixbits.quant.spec import QuantSpec
from mixbits.data.windows import text_fingerprint
from mixbits.sensitivity.ablation import ablation_table
from mixbits.sensitivity.cache import cache_key_parts, load_cached, store_cached
from mixbits.sensitivity.divergence import divergence_table
from mixbits.sensitivity.fisher import fisher_table
from mixbits.sensitivity.fisher_streamed import streamed_fisher_table, streamed_gradient_fisher_tables
from mixbits.sensitivity.gradient import gradient_fisher_tables, gradient_table
from mixbits.sensitivity.hessian import hessian_table
from mixbits.sensitivity.hessian_streamed import check_streamed_options, streamed_hessian_table
from mixbits.sensitivity.output_error import output_error_table
from mixbits.sensitivity.output_error_streamed import streamed_output_error_table
from mixbits.sensitivity.table import DamageTable
from mixbits.sensitivity.units import (
    block_table, check_granularity, measured_columns, measured_labels, reference_column, to_block_table, units_of,
)

log = logging.getLogger(__name__)

Kind = Literal["predicted", "measured"]
Raw = tuple[np.ndarray, dict[str, np.ndarray]]


@dataclass(frozen=True)
class Method:
    fn: Callable[..., Raw]
    needs_gradients: bool
    kind: Kind
    score: str  # the scalar score that ranks units (a key of the function's scores)


METHODS: Mapping[str, Method] = MappingProxyType({
    "fisher": Method(fisher_table, True, "predicted", "fisher_trace"),
    "gradient": Method(gradient_table, True, "predicted", "gradient_l1"),
    "hessian": Method(hessian_table, True, "predicted", "hessian_trace"),
    "output_error": Method(output_error_table, False, "predicted", "output_error"),
    "divergence": Method(divergence_table, False, "measured", "kl"),
    "ablation": Method(ablation_table, False, "measured", "delta_ppl"),
})
SHARED_PASS = ("fisher", "gradient")


def check_methods(methods: Sequence[str]) -> list[str]:
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise UserError(f"unknown sensitivity method(s) {unknown or methods!r}; choose from {list(METHODS)}")
    if len(set(methods)) != len(methods):
        raise UserError(f"methods {list(methods)} name one method twice")
    return list(methods)


def _kwargs(name: str, options: Mapping[str, Mapping[str, object]], generator: torch.Generator | None) -> dict:
    kwargs = dict(options.get(name, {}))
    if name == "hessian" and generator is not None:
        kwargs.setdefault("generator", generator)
    return kwargs


def _run(name, model, windows, linears, configs, granularity, *, device, progress, measure_configs,
         options, generator, offload_dir) -> Raw:
    if not isinstance(model, nn.Module):  # a block source (checked by _check_source): block by block
        if name == "output_error":
            return streamed_output_error_table(model, windows, linears, configs, device=device, progress=progress,
                                               **options.get(name, {}))
        if name == "hessian":
            return streamed_hessian_table(model, windows, linears, configs, device=device, progress=progress,
                                          offload_dir=offload_dir, **_kwargs(name, options, generator))
        if name == "gradient":
            return streamed_gradient_fisher_tables(model, windows, linears, configs, device=device, progress=progress,
                                                   offload_dir=offload_dir, **options.get(name, {}))["gradient"]
        return streamed_fisher_table(model, windows, linears, configs, device=device, progress=progress,
                                     offload_dir=offload_dir, **options.get(name, {}))
    method = METHODS[name]
    kwargs = _kwargs(name, options, generator)
    if method.kind == "measured":
        units = units_of(linears, granularity)
        return method.fn(model, windows, units, configs, device=device, progress=progress,
                         measure_configs=measure_configs, **kwargs)
    return method.fn(model, windows, linears, configs, device=device, progress=progress, **kwargs)


def _shared_damage_rows(options: Mapping[str, Mapping[str, object]]) -> int | None:
    """The `damage_rows` of the shared fisher + gradient pass: one δ feeds both tables, so both must ask the same."""
    rows = {m: options.get(m, {}).get("damage_rows") for m in SHARED_PASS}
    if len(set(rows.values())) > 1:
        raise UserError(f"fisher and gradient share one pass, so their damage_rows must agree; got {rows}")
    return rows["fisher"]


def _raw_tables(methods, model, windows, linears, configs, granularity, **kw) -> dict[str, tuple[Raw, float, dict]]:
    """method -> ((damage, scores), seconds, extra meta), in the order asked."""
    out: dict[str, tuple[Raw, float, dict]] = {}
    if all(m in methods for m in SHARED_PASS):
        log.info("fisher + gradient: one shared gradient pass")
        start = time.perf_counter()
        absolute = bool(kw["options"].get("gradient", {}).get("absolute", False))
        rows = _shared_damage_rows(kw["options"])
        if isinstance(model, nn.Module):
            both = gradient_fisher_tables(model, windows, linears, configs, device=kw["device"],
                                          progress=kw["progress"], absolute=absolute, damage_rows=rows)
        else:  # a block source: the same pass block by block
            both = streamed_gradient_fisher_tables(model, windows, linears, configs, device=kw["device"],
                                                   progress=kw["progress"], absolute=absolute,
                                                   offload_dir=kw["offload_dir"], damage_rows=rows)
        seconds = time.perf_counter() - start
        for m, other in zip(SHARED_PASS, reversed(SHARED_PASS)):
            out[m] = (both[m], seconds, {"shared_pass_with": other})
    for m in methods:
        if m in out:
            continue
        log.info("sensitivity method %s ...", m)
        start = time.perf_counter()
        raw = _run(m, model, windows, linears, configs, granularity, **kw)
        out[m] = (raw, time.perf_counter() - start, {})
        log.info("sensitivity method %s done in %.1f s", m, out[m][1])
    return {m: out[m] for m in methods}


STREAMED = ("fisher", "gradient", "output_error", "hessian")  # what a block source computes, block by block


def _check_source(methods: Sequence[str], model: nn.Module | BlockSource, granularity: str,
                  options: Mapping[str, Mapping[str, object]]) -> None:
    """A block source serves the Fisher, gradient, output-error and Hessian-trace tables (per layer, or
    summed per block); every other method, and the Hessian's top eigenvalue, needs the whole model."""
    if isinstance(model, nn.Module):
        return
    others = [m for m in methods if m not in STREAMED]
    if others:
        raise UserError(f"methods {others} need the whole model in memory; a model streamed block by block gives "
                        f"the {', '.join(STREAMED)} tables")
    if "hessian" in methods:
        check_streamed_options(options.get("hessian", {}))


def _check_options(options: Mapping[str, Mapping[str, object]] | None, methods: list[str]) -> dict:
    """`options` as a dict, refused when it names a method that is not asked for."""
    options = dict(options or {})
    unknown = [m for m in options if m not in methods]
    if unknown:
        raise UserError(f"options given for {unknown}, which are not among the methods {methods}")
    return options


def _jsonable(options: Mapping[str, object]) -> dict:
    return {k: (v if isinstance(v, (int, float, str, bool, type(None))) else repr(v)) for k, v in options.items()}


def compute_tables(
    methods: Sequence[str],
    model: nn.Module | BlockSource,
    windows: torch.Tensor,
    linears: Mapping[str, LinearInfo],
    configs: Sequence[QuantSpec],
    *,
    granularity: str = "layer",
    device: torch.device,
    progress: bool = True,
    measure_configs: Sequence[QuantSpec] | None = None,
    generator: torch.Generator | None = None,
    options: Mapping[str, Mapping[str, object]] | None = None,
    offload_dir: str | Path | None = None,
) -> dict[str, DamageTable]:
    """{method: DamageTable} over the units of `granularity` ("layer" | "block").

    `windows` LongTensor [n, seqlen] (calibration / profiling); `measure_configs` limits the
    configs that measured methods run (NaN elsewhere; predicted methods compute all);
    `generator` feeds the Hessian's random probes; `options[method]` are extra keyword
    arguments of that method's function (e.g. {"hessian": {"probes": 4}}). `model`: a loaded
    model, or a `BlockSource` for the methods in `STREAMED` (then `offload_dir` may hold their block
    boundaries on disk; see `fisher_streamed`).
    """
    methods = check_methods(methods)
    granularity = check_granularity(granularity)
    options = _check_options(options, methods)
    _check_source(methods, model, granularity, options)
    configs = tuple(configs)
    if not configs:
        raise UserError("configs is empty; pass the candidate QuantSpecs (e.g. config.candidate_configs(...))")
    cols = measured_columns(configs, measure_configs)  # fail before any compute
    if any(METHODS[m].kind == "measured" for m in methods):
        reference_column(configs, cols)
    raw = _raw_tables(methods, model, windows, linears, configs, granularity, device=device, progress=progress,
                      measure_configs=measure_configs, options=options, generator=generator,
                      offload_dir=offload_dir)
    tables = {}
    for name, ((damage, scores), seconds, extra) in raw.items():
        kind = METHODS[name].kind
        meta = {"method": name, "kind": kind, "granularity": granularity,
                "configs_measured": measured_labels(damage, configs), "seconds": seconds,
                "windows": int(len(windows)), "tokens": int(windows.numel()),
                "options": _jsonable(options.get(name, {})), "quantizer": "rtn", **extra}
        if kind == "measured" and granularity == "block":
            tables[name] = block_table(units_of(linears, "block"), linears, configs, damage, name, scores, meta)
            continue
        table = DamageTable(units=tuple(linears), shapes=tuple((i.out_features, i.in_features) for i in linears.values()),
                            configs=configs, damage=damage, method=name, scores=scores,
                            meta={**meta, "granularity": "layer"})
        tables[name] = to_block_table(table, linears) if granularity == "block" else table
    return tables


def _key_options(name: str, options: Mapping[str, Mapping[str, object]], measure_configs,
                 generator: torch.Generator | None) -> dict:
    """The options that change `name`'s table, as recorded in its cache key."""
    out = _jsonable(options.get(name, {}))
    if METHODS[name].kind == "measured" and measure_configs is not None:
        out["measure_configs"] = [c.label for c in measure_configs]
    if name == "hessian" and generator is not None:
        out["seed"] = int(generator.initial_seed())  # the random probes
    return out


def cached_tables(
    methods: Sequence[str],
    model: nn.Module | BlockSource,
    windows: torch.Tensor,
    linears: Mapping[str, LinearInfo],
    configs: Sequence[QuantSpec],
    *,
    model_name: str,
    granularity: str = "layer",
    device: torch.device,
    progress: bool = True,
    measure_configs: Sequence[QuantSpec] | None = None,
    generator: torch.Generator | None = None,
    options: Mapping[str, Mapping[str, object]] | None = None,
    use_cache: bool = True,
    offload_dir: str | Path | None = None,
) -> tuple[dict[str, DamageTable], set[str]]:
    """`compute_tables` through the disk cache: ({method: table}, the methods served from it).

    Arguments as `compute_tables`; `model_name` is recorded in the key beside the weights'
    fingerprint. Missing methods are computed together (fisher + gradient share one pass) and
    stored; with `use_cache=False` nothing is read or written.
    """
    methods, configs = check_methods(methods), tuple(configs)
    options = _check_options(options, methods)
    _check_source(methods, model, granularity, options)
    calibration = text_fingerprint(windows)
    parts = {m: cache_key_parts(model_name=model_name, model=model, linears=linears, calibration_sha256=calibration,
                                configs=configs, method=m, granularity=granularity,
                                options=_key_options(m, options, measure_configs, generator))
             for m in methods} if use_cache else {}
    found = {m: load_cached(parts[m]) for m in methods} if use_cache else {}
    cached = {m for m, t in found.items() if t is not None}
    missing = [m for m in methods if m not in cached]
    if missing:
        fresh = compute_tables(missing, model, windows, linears, configs, granularity=granularity, device=device,
                               progress=progress, measure_configs=measure_configs, generator=generator,
                               options={m: o for m, o in options.items() if m in missing}, offload_dir=offload_dir)
        for m, table in fresh.items():
            found[m] = table
            if use_cache:
                store_cached(parts[m], table)
    return {m: found[m] for m in methods}, cached


def primary_score(table: DamageTable) -> str:
    """The score key that ranks units of `table`: its method's, else the table's first score."""
    method = METHODS.get(table.method)
    if method is not None and method.score in table.scores:
        return method.score
    if not table.scores:
        raise UserError(f"the {table.method} table has no scores to rank units by")
    return next(iter(table.scores))
