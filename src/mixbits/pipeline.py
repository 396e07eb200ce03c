"""The one place that chains stages: load -> calibrate -> sensitivity -> allocate -> quantize ->
evaluate -> save. Every input is checked before the first expensive step.

Two paths, chosen by `RunConfig.stream`:
* streamed (the default): the model is opened lazily (meta skeleton, tensors read from the shards
  one block at a time) and every stage works block by block (`jobs.run_streamed`): the Fisher and
  the quantizer's gain, then ONE pass per variant that quantizes it and scores it together, the
  mixed model written block by block into out/model (resumable with `resume`). No copy of the
  model exists; the peak is about one block plus the activations at one block boundary.
  Zero-shot tasks then score the original and the written mixed model one at a time, each placed
  by accelerate within --max-memory (`model.dispatch`).
* whole model (`stream=False`, the reference the streamed path is tested against, and what
  iterative mode and --qat training still need: with those options the whole model is loaded,
  and the log says so): the model in float32 in memory, one quantized copy per variant.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mixbits.allocate.budget import Budget
from mixbits.allocate.feasibility import check_budget, uniform_baselines
from mixbits.allocate.optimal import Constraints, allocate_optimal, unit_groups
from mixbits.config import RunConfig, resolve_device
from mixbits.data.text import load_text, resolve_text
from mixbits.data.windows import calibration_windows, eval_windows, text_fingerprint
from mixbits.eval.perplexity import evaluate_models
from mixbits.jobs.gguf_budget import GGUFBudget, check_ggml_rows, counts_gguf, gguf_budget
from mixbits.jobs.run_streamed import (
    open_streamed,
    run_variants,
    streamed_fisher,
    streamed_zeroshot,
    whole_model_reasons,
)
from mixbits.model.budget import check_run_memory
from mixbits.model.stream import BlockSource, LoadedModel
from mixbits.allocate.iterative import sensitivity_order
from mixbits.jobs.iterative import iterative_quantize, iterative_summary
from mixbits.model.apply import round_to_storage
from mixbits.export.native import native_size_bytes, save_native
from mixbits.model.quantize import quantize_model
from mixbits.model.arch import LinearInfo, find_linears, fixed_bytes_of, tied_groups
from mixbits.model.load import check_context, load_model, resolve_model_source
from mixbits.outdir import Claim, claim
from mixbits.plan import Plan
from mixbits.recipe import save_recipe
from mixbits.report.results import build_layer_statistics, build_results, write_outputs
from mixbits.sensitivity.cache import cache_key_parts, cached_table
from mixbits.sensitivity.damage_rows import damage_row_options
from mixbits.sensitivity.follow import follow_quantizer, gain_cache_options, gain_table
from mixbits.sensitivity.methods import cached_tables
from mixbits.sensitivity.table import DamageTable
from mixbits.timing import StageTimer
from mixbits.train.windows import training_windows
from mixbits.train.run import train_model
from mixbits.train.schedule import block_sensitivity

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prepared:
    """Everything known after loading, before any calibration compute."""

    model: nn.Module
    tokenizer: object
    device: torch.device
    linears: dict[str, LinearInfo]
    shapes: dict[str, tuple[int, int]]
    groups: list[tuple[str, ...]]
    constraints: Constraints
    budget: Budget
    budget_bits: float
    fixed_bytes: int
    given_plan: Plan | None
    source: BlockSource | None = None  # streamed: the blocks' source (`model` is then its model, maybe a meta skeleton)
    gguf: GGUFBudget | None = None  # a size target over ggml candidates: the GGUF file it counts (jobs.gguf_budget)


def constraints_of(cfg: RunConfig) -> Constraints:
    a = cfg.allocation
    pins = tuple(Constraints.parse_pin(p) for p in a.pins)
    return Constraints(min_bits=a.min_bits, max_bits=a.max_bits, keep=a.keep, pins=pins, tie=a.tie)


def prepare(cfg: RunConfig, timer: StageTimer, loaded: tuple[nn.Module, object] | None = None, *,
            stream: bool = False) -> Prepared:
    """Validate every input (cheap checks first), load the model, check the budget.

    `loaded`: an already loaded (model, tokenizer) to use instead of loading `cfg.model`
    (`mixbits.api.quantize` passes a notebook's model); it is moved to the device and put in eval mode.
    `stream`: open `cfg.model` lazily instead (nothing but the skeleton is loaded; `Prepared.source`
    serves the blocks), or see `loaded` as a block source."""
    resolve_text(cfg.data.dataset)
    if cfg.tasks:  # names, and the data sets behind them, before anything expensive
        from mixbits.eval.zeroshot import check_options, resolve_tasks

        check_options(cfg.tasks, limit=cfg.task_limit, batch_size=8)
        resolve_tasks(cfg.tasks, limit=cfg.task_limit)
    device = resolve_device(cfg.device)
    constraints = constraints_of(cfg)
    given = Plan.load(cfg.plan) if cfg.plan is not None else None
    budget = Budget(cfg.allocation.target_bpw, cfg.allocation.target_size_mb)
    blocks = None
    with timer.stage("load"):
        if loaded is not None:
            model, tokenizer = loaded[0].to(device).eval(), loaded[1]
            blocks = LoadedModel(model, device) if stream else None
        else:
            source = resolve_model_source(cfg.model)
            check_context(source, cfg.data.seqlen, cfg.model)  # config.json only, before the weights
            check_run_memory(cfg, source, device=device)  # the predicted peak logged; refused over --max-memory
            if stream:
                blocks, tokenizer = open_streamed(cfg.model, source, device, cfg.compute_dtype, cfg.preload)
                model = blocks.model
            else:
                model, tokenizer = load_model(source, device=device)
    linears = find_linears(model)
    shapes = {n: (i.out_features, i.in_features) for n, i in linears.items()}
    groups = unit_groups(tuple(linears), tied_groups(model, linears), constraints.tie)
    fixed = fixed_bytes_of(model, shapes)  # tied tensors by identity: a meta skeleton counts as the model
    check_ggml_rows(cfg, shapes, cfg.model)
    gguf = None
    if given is not None:
        given.validate(shapes)
        budget = Budget(bpw=given.bits_per_weight(shapes))
        bits = budget.to_bits(sum(o * i for o, i in shapes.values()), fixed)
    elif counts_gguf(cfg):
        gguf = gguf_budget(cfg, model, tokenizer, shapes, groups, constraints)
        bits = gguf.budget_bits()
    else:
        bits = check_budget(shapes, cfg.allocation.configs(), groups, constraints, budget, fixed)
    return Prepared(model, tokenizer, device, linears, shapes, groups, constraints, budget, bits, fixed, given, blocks,
                    gguf)


def calibrate(cfg: RunConfig, p: Prepared, timer: StageTimer) -> tuple[torch.Tensor, torch.Tensor, dict]:
    d = cfg.data
    with timer.stage("data"):
        calib = calibration_windows(p.tokenizer, load_text(d.dataset, "calibration"), d.seqlen, d.calib_windows, d.seed)
        test = eval_windows(p.tokenizer, load_text(d.dataset, "test"), d.seqlen, d.eval_windows or None)
    info = {
        "dataset": d.dataset,
        "calibration": {"split": "calibration", "windows": len(calib), "seqlen": d.seqlen,
                        "tokens": calib.numel(), "sha256": text_fingerprint(calib), "seed": d.seed},
        "test": {"split": "test", "windows": len(test), "seqlen": d.seqlen,
                 "tokens": test.numel(), "sha256": text_fingerprint(test)},
    }
    return calib, test, info


def sensitivity(cfg: RunConfig, p: Prepared, calib: torch.Tensor, timer: StageTimer, data_info: dict) -> DamageTable:
    """The Fisher damage table, scaled by the quantizer's gain over RTN unless the quantizer is rtn
    or cfg.damage is "rtn" (`sensitivity.follow`); each table from the disk cache when the same
    model, tokens, configs and code ran before. The Fisher table comes from the one builder
    `mixbits analyze` uses too (`methods.cached_tables`), so either command reuses the other's;
    the run's provenance (model, calibration, tied groups, fixed bytes) is added afterwards. The ggml types'
    damage is measured on cfg.damage_rows rows per layer and scaled (`sensitivity.damage_rows`; the table's
    meta options and cache key say so)."""
    configs = cfg.allocation.configs()

    def gain() -> DamageTable:
        return gain_table(p.source or p.model, calib, p.linears, configs, quantizer=cfg.quantizer, device=p.device,
                          progress=cfg.progress, gptq=cfg.gptq, meta={"model": cfg.model, "calibration": data_info["calibration"]},
                          rows=cfg.gain_rows)

    with timer.stage("sensitivity"):
        if p.source is not None:  # block by block
            fisher = streamed_fisher(cfg, p.source, calib, p.linears, configs)
        else:
            fisher = cached_tables(["fisher"], p.model, calib, p.linears, configs, model_name=cfg.model,
                                   granularity="layer", device=p.device, progress=cfg.progress,
                                   options=damage_row_options(["fisher"], configs, cfg.damage_rows),
                                   use_cache=cfg.use_cache)[0]["fisher"]
        table = fisher.with_meta(model=cfg.model, calibration=data_info["calibration"],
                                           tied=[list(g) for g in p.groups if len(g) > 1],
                                           other_bytes_fp16=p.fixed_bytes)
        if cfg.quantizer != "rtn" and cfg.damage == "follow":
            method = f"gain_{cfg.quantizer}"
            options = gain_cache_options(cfg.quantizer, cfg.gptq, cfg.gain_rows)
            key = cache_key_parts(model_name=cfg.model, model=p.source or p.model, linears=p.linears,
                                  calibration_sha256=data_info["calibration"]["sha256"], configs=configs,
                                  method=method, granularity="layer", options=options)
            table = follow_quantizer(table, cached_table(key, gain) if cfg.use_cache else gain())
        return table


def iterate(cfg: RunConfig, p: Prepared, calib: torch.Tensor, table: DamageTable) -> tuple[Plan, dict, dict]:
    """Iterative mode (`mixbits.jobs.iterative`): the plan it reached, the models it made ("mixed", and
    the uniform model at the target config it took weights from: model, QuantizeReport) and the
    `iterative` section of results.json."""
    it, d = cfg.iterative, cfg.data
    val = eval_windows(p.tokenizer, load_text(d.dataset, "validation"), d.seqlen, it.windows)
    uniform = Plan.uniform(p.shapes, it.spec)
    q_model, q_report = quantize_model(p.model, uniform, quantizer=cfg.quantizer,
                                       windows=None if cfg.quantizer == "rtn" else calib, device=p.device,
                                       progress=cfg.progress, gptq=cfg.gptq)
    base = copy.deepcopy(p.model)
    round_to_storage(base, Plan({}))  # kept layers are stored in 16 bit: measure them that way

    def validation_ppl(model: nn.Module) -> float:
        return evaluate_models({"m": model}, val, device=p.device, progress=False)["m"].ppl

    order = sensitivity_order(table, p.groups, it.spec)
    mixed, result = iterative_quantize(base, q_model, order, it, p.shapes, validation_ppl)
    del base
    keep = result.plan.quantized()
    m_report = dataclasses.replace(q_report, layers={n: r for n, r in q_report.layers.items() if n in keep},
                                   qparams={n: q for n, q in q_report.qparams.items() if n in keep},
                                   g_idx={n: g for n, g in q_report.g_idx.items() if n in keep})
    summary = iterative_summary(result, it, p.shapes, {"split": "validation", "windows": len(val), "seqlen": d.seqlen},
                                f"predicted damage at {it.spec.label} ({table.method}), least first")
    return result.plan, {"mixed": (mixed, m_report), f"uniform {it.spec.label}": (q_model, q_report)}, summary


def train_plans(cfg: RunConfig, p: Prepared, plans: dict[str, Plan], models: dict, table: DamageTable | None) -> dict:
    """Block-AP (+ E2E-QP) of the mixed plan (and of the baselines with cfg.train_baselines), each from
    the run's quantizer. The post-training model and plan stay in `models` and `plans` as
    "<name> (init)"; the trained model takes its name. Returns name -> TrainReport."""
    tcfg = cfg.train
    windows = training_windows(p.tokenizer, tcfg)
    sensitivity = None
    if table is not None and tcfg.schedule != "fixed":
        scores = dict(zip(table.units, table.scores["fisher_trace"]))
        sensitivity = block_sensitivity(scores, {n: i.block for n, i in p.linears.items()})
    out, done = Path(cfg.output_dir), {}
    for name in [n for n in plans if n == "mixed" or (cfg.train_baselines and n.startswith("uniform"))]:
        checkpoint = out / "checkpoint" / name.replace(" ", "-")
        trained, report = train_model(p.model, plans[name], windows["calibration"], windows["validation"], tcfg,
                                      device=p.device, sensitivity=sensitivity, checkpoint_dir=checkpoint,
                                      resume=cfg.resume, progress=cfg.progress, gptq=cfg.gptq)
        models[f"{name} (init)"], models[name] = models[name], trained
        plans[f"{name} (init)"] = plans[name]
        done[name] = report
    return done


def run(cfg: RunConfig) -> dict:
    """The whole job of `mixbits run`; writes results into cfg.output_dir and returns them.

    The output folder is claimed before the model is loaded (`outdir.claim`: a new or empty folder,
    or an earlier run there with cfg.overwrite, replaced as a whole, or cfg.resume) and locked until
    the end, so a bad location costs nothing and two runs never write into one folder."""
    with claim(cfg.output_dir, "run", overwrite=cfg.overwrite, resume=cfg.resume, command="mixbits run") as owned:
        save_recipe(cfg, Path(cfg.output_dir) / "recipe.yaml")  # first, so that even a killed run can be repeated
        return _run(cfg, owned)


def _run(cfg: RunConfig, owned: Claim) -> dict:
    timer = StageTimer()
    whole = whole_model_reasons(cfg)
    stream = cfg.stream and not whole
    if cfg.stream and whole:
        log.info("%s: not streamed yet; this run loads the whole model in memory", ", ".join(whole))
    p = prepare(cfg, timer, stream=stream)
    calib, test, data_info = calibrate(cfg, p, timer)
    table, solution, plan, made, iterative = None, None, p.given_plan, {}, None
    if plan is None:
        table = sensitivity(cfg, p, calib, timer, data_info)
    if cfg.iterative is not None:
        with timer.stage("iterative"):
            plan, made, iterative = iterate(cfg, p, calib, table)
        budget = Budget(bpw=plan.bits_per_weight(p.shapes))  # baselines are judged at the size it reached
        p = dataclasses.replace(p, budget=budget, budget_bits=budget.to_bits(sum(o * i for o, i in p.shapes.values()),
                                                                             p.fixed_bytes))
    elif plan is None:
        with timer.stage("allocate"):
            priced = table if p.gguf is None else p.gguf.priced(table)  # GGUF target: options in file bytes
            specs, solution = allocate_optimal(priced, p.groups, p.budget_bits, p.constraints)
        rows = table.meta.get("options", {}).get("damage_rows")  # ggml damage sampled (`sensitivity.damage_rows`)
        plan = Plan(specs, {"strategy": "optimal", "budget": p.budget.label, "sensitivity": table.method,
                            **({"damage_rows": rows} if rows else {})})
        plan = plan if p.gguf is None else p.gguf.record(plan)
    plans = {"original": Plan({}), "mixed": plan}
    baselines = () if not cfg.baselines else p.gguf.baselines(cfg.allocation.configs()) if p.gguf is not None else \
        uniform_baselines(p.shapes, cfg.allocation.configs(), p.budget, p.fixed_bytes)
    for spec, fits in baselines:
        plans[f"uniform {spec.label}"] = Plan.uniform(p.shapes, spec, fits_budget=fits)
    for name in made:  # iterative: also the model with every unit at the target config (always smaller)
        plans.setdefault(name, Plan.uniform(p.shapes, cfg.iterative.spec, fits_budget=True))
    out = Path(cfg.output_dir)
    training, zeroshot = {}, None
    if stream:
        evals, reports, sizes = run_variants(cfg, p.source, p.tokenizer, plans, p.shapes, calib, test, out / "model",
                                             timer)
        if cfg.tasks:
            zeroshot = streamed_zeroshot(cfg, p.source, p.tokenizer, out / "model", timer)
    else:
        evals, reports, sizes, training, zeroshot = _whole_model_variants(cfg, p, plans, made, calib, test, table,
                                                                           timer)
    owned.record()  # the model is listed as this run's even if a later step fails
    results = build_results(cfg, p, data_info, evals, plans, sizes, solution, table, timer.seconds)
    results["quantizer"] = {name: r.to_dict() for name, r in reports.items() if name not in training}
    layers = build_layer_statistics(p.linears, table, plan)
    if iterative is not None:
        results["iterative"] = iterative
    if zeroshot is not None:
        results["zeroshot"] = zeroshot
    if training:
        results["training"] = {name: report.to_dict() for name, report in training.items()}
        layers["blocks"] = [b.to_dict() for b in training["mixed"].blocks]
    write_outputs(out, results, layers, plan, table)
    if cfg.report:
        write_run_report(out)
    return results


def _whole_model_variants(cfg: RunConfig, p: Prepared, plans: dict[str, Plan], made: dict, calib: torch.Tensor,
                          test: torch.Tensor, table: DamageTable | None, timer: StageTimer):
    """Today's whole-model path: a quantized copy per variant, training, evaluation, zero-shot tasks,
    the mixed model saved. Returns (evaluations, reports, sizes, training reports, zero-shot results)."""
    models, reports = {"original": p.model}, {}
    with timer.stage("quantize"):
        windows = None if cfg.quantizer == "rtn" else calib  # rtn needs no data
        for name, q in plans.items():
            if name in made:  # the iterative mode made these already
                models[name], reports[name] = made[name]
            elif name != "original":
                models[name], reports[name] = quantize_model(
                    p.model, q, quantizer=cfg.quantizer, windows=windows, device=p.device, progress=cfg.progress,
                    gptq=cfg.gptq)
    training = {}
    if cfg.train is not None:
        with timer.stage("train"):
            training = train_plans(cfg, p, plans, models, table)
        for name, report in training.items():
            reports[f"{name} (init)"], reports[name] = reports[name], report
    with timer.stage("evaluate"):
        evals = evaluate_models(models, test, device=p.device, reference="original", progress=cfg.progress)
    zeroshot = None
    if cfg.tasks:
        from mixbits.eval.zeroshot import evaluate_zeroshot

        with timer.stage("zeroshot"):
            zeroshot = evaluate_zeroshot({"original": p.model, "mixed": models["mixed"]}, p.tokenizer, cfg.tasks,
                                         device=p.device, limit=cfg.task_limit, seed=cfg.data.seed,
                                         progress=cfg.progress)
    with timer.stage("save"):
        sizes = {name: native_size_bytes(p.model, q) for name, q in plans.items() if name != "mixed"}
        sizes["mixed"] = save_native(models["mixed"], plans["mixed"], Path(cfg.output_dir) / "model", p.tokenizer,
                                     qparams=reports["mixed"].qparams)
    return evals, reports, sizes, training, zeroshot


def write_run_report(out: Path) -> Path:
    """report.html from the files just written; if it fails, the results stay saved and say how to retry."""
    from mixbits.report.html import write_report  # matplotlib only when a report is asked for

    try:
        return write_report(out)
    except Exception:
        log.error("the run's results are saved in %s, but its report failed; retry with `mixbits report %s`", out, out)
        raise
