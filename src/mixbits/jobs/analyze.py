"""`mixbits analyze`: compute sensitivity tables by several methods, check them against measured
damage on held-out text, and write the evidence.

    load model -> calibration windows -> tables (cached per method) [+ an imported seed file]
    -> [validation: measured damage on held-out windows of the validation split, Spearman ρ
        per method, cost per method in forward+backward passes, best method]
    -> sensitivity.json (the best method's table with every method's scores), validation.json,
       analysis.json (the summary returned), plots/scores.png, plots/validation.png

The best method is `validate.validate_methods`'s pick when validating, else the first method
asked for. Stages are chained here; every formula lives in its own module.

Two paths, chosen as `mixbits run` chooses (`AnalyzeConfig.stream`, default on):
* streamed: when every method asked for is computed from a block source (the Fisher, the gradient,
  the output error and the Hessian trace, per layer: `sensitivity.methods.cached_tables` runs
  `fisher_streamed`, one backward pass for the first two, `output_error_streamed` and
  `hessian_streamed`) and nothing else needs the weights, the model is opened lazily
  (`jobs.run_streamed.open_streamed`: the meta skeleton, each block read from the shards while it is
  worked on). Peak memory: one block in the compute dtype plus the block boundaries of the calibration
  windows (on disk under `offload_dir` when it is set), as for the Fisher stage of `mixbits run`, the
  Hessian's twice that (the hidden states and their tangents); never the whole model. The predicted
  peak (`model.budget_stages.predict_analyze`) is logged before any weight is read.
  Everything in analysis.json comes from the skeleton (linears, blocks, parameter count) and the
  table. Same numbers as the whole-model path (tested in float32), and the same cache key.
* whole model: otherwise (a measured method, --granularity block, --validate, --sensitivity-file, or
  --no-stream), the model loaded in float32; the log names the options that need it
  (`whole_model_reasons`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import torch
from torch import nn

from mixbits.errors import UserError
from mixbits.provenance import environment
from mixbits.config import resolve_device
from mixbits.data.text import load_text, resolve_text
from mixbits.data.windows import calibration_windows, eval_windows, text_fingerprint
from mixbits.io import atomic_write_json
from mixbits.jobs.analyze_config import AnalyzeConfig
from mixbits.jobs.run_streamed import boundaries_folder, open_streamed
from mixbits.model.arch import LinearInfo, find_linears
from mixbits.model.budget_stages import predict_analyze
from mixbits.model.load import load_model, resolve_model_source, validate_model_name
from mixbits.model.memory import model_shapes
from mixbits.report.sensitivity_plots import plot_predicted_vs_measured, plot_scores
from mixbits.sensitivity.capture import grad_only_on
from mixbits.sensitivity.damage_rows import damage_row_options
from mixbits.sensitivity.methods import STREAMED, cached_tables, primary_score
from mixbits.sensitivity.seedfile import read_seed_file, seed_table
from mixbits.sensitivity.table import DamageTable
from mixbits.sensitivity.units import block_units
from mixbits.sensitivity.validate import ranking, validate_methods

log = logging.getLogger(__name__)

ANALYZE_FORMAT = "mixbits.analyze/1"
STREAMED_METHODS = STREAMED  # what `sensitivity.methods.cached_tables` computes from a block source


def whole_model_reasons(cfg: AnalyzeConfig) -> list[str]:
    """The options of `cfg` that need the whole model in memory (not streamed yet)."""
    reasons = []
    others = [m for m in cfg.methods if m not in STREAMED_METHODS]
    if others:
        reasons.append(f"--methods {','.join(others)}")
    if cfg.granularity != "layer":
        reasons.append(f"--granularity {cfg.granularity}")
    if cfg.validate:
        reasons.append("--validate (measured damage)")
    if cfg.sensitivity_file is not None:
        reasons.append("--sensitivity-file (its damage proxy reads every weight)")
    return reasons


def time_fwd_bwd(model: nn.Module, windows: torch.Tensor, linears: dict[str, LinearInfo], *,
                 device: torch.device, sample: int = 4) -> float:
    """Seconds of one forward + backward (weight gradients of the linears) over all `windows`,
    timed on the first `sample` windows and scaled to the count."""
    k = max(1, min(sample, len(windows)))
    with grad_only_on(model, list(linears)) as weights:
        start = time.perf_counter()
        for window in windows[:k]:
            ids = window.unsqueeze(0).to(device)
            torch.autograd.grad(model(input_ids=ids, labels=ids).loss, weights)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
    return elapsed * len(windows) / k


def _tables(cfg: AnalyzeConfig, methods, model, linears, windows, configs, device,
            measure_configs=None, offload_dir=None) -> tuple[dict[str, DamageTable], set[str]]:
    """Tables of `methods` on `windows`, from the cache where possible; also the cached names.
    `model`: a loaded model, or a block source (streamed; `offload_dir` may then hold its boundaries)."""
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    return cached_tables(methods, model, windows, linears, configs, model_name=cfg.model, granularity=cfg.granularity,
                         device=device, progress=cfg.progress, measure_configs=measure_configs, generator=gen,
                         options=damage_row_options(methods, configs, cfg.damage_rows),
                         use_cache=cfg.use_cache, offload_dir=offload_dir)


def _validate(cfg, model, tokenizer, linears, calib, tables, device) -> tuple[dict | None, DamageTable | None, dict]:
    held = eval_windows(tokenizer, load_text(cfg.dataset, "validation"), cfg.seqlen, cfg.validate_windows)
    info = {"split": "validation", "windows": len(held), "seqlen": cfg.seqlen, "sha256": text_fingerprint(held)}
    specs = cfg.validation_specs()
    measured_tables, _ = _tables(cfg, [cfg.validate_with], model, linears, held, specs, device)
    measured = measured_tables[cfg.validate_with]
    comparable = {m: t for m, t in tables.items() if t.units == measured.units}
    for m in tables.keys() - comparable.keys():
        log.warning("%s scores other units than --granularity %s; it is not validated", m, cfg.granularity)
    if not comparable:
        return None, measured, info
    costs = {m: float(t.meta.get("seconds", float("nan"))) for m, t in comparable.items()}
    fwd_bwd = time_fwd_bwd(model, calib, linears, device=device)
    return validate_methods(comparable, measured, specs, costs, fwd_bwd), measured, info


def _with_all_scores(best: DamageTable, tables: dict[str, DamageTable]) -> DamageTable:
    """The best table, carrying every same-unit table's scores (a score name belongs to one method)."""
    scores, source = dict(best.scores), {k: best.method for k in best.scores}
    for m, t in tables.items():
        if t.units == best.units:
            for k, v in t.scores.items():
                if k not in scores:
                    scores[k], source[k] = v, m
    return dataclasses.replace(best, scores=scores, meta={**dict(best.meta), "scores_from": source})


def _write(cfg, best, tables, validation, measured, linears) -> dict[str, str]:
    out = Path(cfg.output_dir)
    files = {"sensitivity": out / "sensitivity.json"}
    best.save(files["sensitivity"])
    same = {m: t for m, t in tables.items() if t.units == best.units}
    block_of = [linears[u].block for u in best.units] if cfg.granularity == "layer" else None
    files["plot_scores"] = plot_scores(same, out / "plots" / "scores.png",
                                       score_keys={m: primary_score(t) for m, t in same.items()}, block_of=block_of)
    if validation is not None:
        files["validation"] = out / "validation.json"
        atomic_write_json(files["validation"], validation)
        files["plot_validation"] = plot_predicted_vs_measured(same, measured, validation,
                                                              out / "plots" / "validation.png")
    return {k: str(v) for k, v in files.items()}


def _summary(cfg, model, linears, calib, held_info, tables, cached, validation, best_name, best, files,
             streamed) -> dict:
    """analysis.json; `model` may be a meta skeleton (shapes only: nothing here reads a weight)."""
    return {
        "format": ANALYZE_FORMAT,
        "config": cfg.to_dict(),
        "model": {"name": cfg.model, "linears": len(linears), "blocks": len(block_units(linears)),
                  "parameters": sum(p.numel() for p in model.parameters()), "streamed": streamed},
        "data": {"dataset": cfg.dataset, "calibration": {"windows": len(calib), "seqlen": cfg.seqlen,
                 "sha256": text_fingerprint(calib), "seed": cfg.seed}, "validation": held_info},
        "methods": {m: {"kind": t.meta.get("kind"), "seconds": t.meta.get("seconds"), "cached": m in cached,
                        "score": primary_score(t)} for m, t in tables.items()},
        "best_method": best_name,
        "best_rule": validation["rule"] if validation else "first method asked for (no validation)",
        "validation": validation,
        "ranking": ranking(best, primary_score(tables[best_name])),
        "files": files,
    }


def analyze(cfg: AnalyzeConfig) -> dict:
    """The whole job of `mixbits analyze`; writes into cfg.output_dir and returns the summary."""
    resolve_text(cfg.dataset)
    validate_model_name(cfg.model)
    if cfg.sensitivity_file is not None and not Path(cfg.sensitivity_file).is_file():
        raise UserError(f"--sensitivity-file {str(cfg.sensitivity_file)!r} does not exist; check the path")
    device = resolve_device(cfg.device)
    whole = whole_model_reasons(cfg)
    stream = cfg.stream and not whole
    if cfg.stream and whole:
        log.info("%s: not streamed yet; this analysis loads the whole model in memory", ", ".join(whole))
    source = resolve_model_source(cfg.model)
    blocks = None
    if stream:
        blocks, tokenizer = open_streamed(cfg.model, source, device, cfg.compute_dtype)
        model = blocks.model  # the meta skeleton: shapes, linears and parameter count, no weights
        log.info("memory: %s", predict_analyze(cfg.methods, model_shapes(model), windows=cfg.calib_windows,
                                               seqlen=cfg.seqlen, device=device,
                                               checkpoint_dtype=blocks.checkpoint_dtype,
                                               compute_dtype=cfg.compute_dtype,
                                               offload=cfg.offload_dir is not None).describe())
    else:
        model, tokenizer = load_model(source, device=device)
    linears = find_linears(model)
    seed_scores = None  # read before any compute: a wrong length fails at once
    if cfg.sensitivity_file is not None:
        seed_scores = read_seed_file(cfg.sensitivity_file, len(block_units(linears)))
    calib = calibration_windows(tokenizer, load_text(cfg.dataset, "calibration"), cfg.seqlen, cfg.calib_windows, cfg.seed)
    configs = cfg.configs()
    measure = cfg.measure_specs()
    with boundaries_folder(cfg.offload_dir if stream else None) as folder:
        tables, cached = _tables(cfg, list(cfg.methods), blocks if stream else model, linears, calib, configs,
                                 device, measure, offload_dir=folder)
    if stream:  # said on the returned tables, never on the cached ones (one metadata rule)
        tables = {m: t if m in cached else t.with_meta(streamed=True) for m, t in tables.items()}
    if seed_scores is not None:
        tables["seed"] = seed_table(seed_scores, model, linears, configs, source=str(cfg.sensitivity_file))
    validation, measured, held_info = (None, None, None)
    if cfg.validate:
        validation, measured, held_info = _validate(cfg, model, tokenizer, linears, calib, tables, device)
    best_name = (validation or {}).get("best_method") or cfg.methods[0]
    best = _with_all_scores(tables[best_name], tables).with_meta(run={
        "config": cfg.to_dict(), "environment": environment(device),
        "data": {"dataset": cfg.dataset, "calibration_sha256": text_fingerprint(calib), "validation": held_info}})
    files = _write(cfg, best, tables, validation, measured, linears)
    summary = _summary(cfg, model, linears, calib, held_info, tables, cached, validation, best_name, best, files,
                       stream)
    atomic_write_json(Path(cfg.output_dir) / "analysis.json", summary)
    return summary
