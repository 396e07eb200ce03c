"""results.json, layer_statistics.json, plan.json and sensitivity.json of a run.

Schema of results.json (`mixbits.results/1`):
    config            the RunConfig as given
    environment       versions of python, torch, transformers, mixbits; device
    model             name, parameters, blocks, quantizable linears and their weights
    data              dataset, calibration and test windows (count, seqlen, tokens, sha256)
    evaluation        the perplexity/KL convention in words
    budget            target, budget in stored bits, the solver's status
    models            per variant ("original", "mixed", "uniform wXgY"): ppl, nll, kl, top1,
                      bpw (stored bits per weight over the quantizable linears, cost model),
                      linear_bytes (those layers' stored bytes, cost model), bytes_on_disk
                      (the native safetensors file, measured), predicted_damage
    timings_s         wall seconds per stage
    iterative         (with --iterative) the path: every step, its units, bpw, validation ppl, kept or not
    zeroshot          (with --tasks) lm-eval accuracy per task and model
    training          (with --qat) per trained plan, the TrainReport
This module formats and writes; it computes no new measurement.
"""

from __future__ import annotations

from pathlib import Path

from mixbits.allocate.registry import predicted_damage
from mixbits.io import atomic_write_json
from mixbits.eval.perplexity import CONVENTION
from mixbits.plan import Plan
from mixbits.provenance import environment
from mixbits.recipe import recipe_dict
from mixbits.quant.cost import layer_storage_bytes
from mixbits.quant.spec import KEEP
from mixbits.sensitivity.table import DamageTable

RESULTS_FORMAT = "mixbits.results/1"


def build_results(cfg, prepared, data_info, evals, plans, sizes, solution, table, timings) -> dict:
    shapes = prepared.shapes
    n_params = sum(t.numel() for t in prepared.model.parameters())
    variants = {}
    for name, result in evals.items():
        plan = plans[name]
        variants[name] = {
            **result.to_dict(),
            "bpw": plan.bits_per_weight(shapes),
            "linear_bytes": plan.storage_bytes(shapes),
            "bytes_on_disk": sizes[name],
            "fits_budget": bool(plan.meta.get("fits_budget", True)),
            "plan": {s.label: sum(1 for v in plan.specs.values() if v == s) for s in set(plan.specs.values())},
            "predicted_damage": None if table is None else predicted_damage(table, plan.specs),
        }
    return {
        "format": RESULTS_FORMAT,
        "config": cfg.to_dict(),
        "recipe": recipe_dict(cfg),  # the resolved recipe: `mixbits run --recipe` of it repeats the run
        "environment": environment(prepared.device),
        "model": {
            "name": cfg.model,
            "parameters": n_params,
            "blocks": len({i.block for i in prepared.linears.values()}),
            "quantizable_linears": len(shapes),
            "quantizable_weights": sum(o * i for o, i in shapes.values()),
            "other_bytes_fp16": prepared.fixed_bytes,
        },
        "data": data_info,
        "evaluation": {"convention": CONVENTION.format(seqlen=data_info["test"]["seqlen"]), "reference": "original"},
        "budget": {
            "target": prepared.budget.label,
            "bits": prepared.budget_bits,
            "plan_source": ("optimal allocation" if solution is not None else str(cfg.plan) if cfg.plan is not None
                            else "iterative mode" if cfg.iterative is not None else "given"),
            "solver": None if solution is None else {
                "method": solution.method, "optimal": solution.optimal, "cost_bits": solution.cost,
                "predicted_damage": solution.damage},
        },
        "models": variants,
        "timings_s": dict(timings),
    }


def build_layer_statistics(linears, table: DamageTable | None, plan: Plan) -> dict:
    """Per linear: shape, chosen spec, its stored bpw, and (with a table) scores and predicted damage."""
    index = table.index() if table is not None else {}
    col = {c: j for j, c in enumerate(table.configs)} if table is not None else {}
    layers = []
    for name, info in linears.items():
        spec = plan.specs.get(name, KEEP)
        row = {
            "name": name,
            "block": info.block,
            "shape": [info.out_features, info.in_features],
            "params": info.numel,
            "spec": spec.label,
            "bits": spec.bits,
            "group_size": getattr(spec, "group_size", None),  # None for a ggml type (its label names it)
            "bpw": 8 * layer_storage_bytes(info.out_features, info.in_features, spec) / info.numel,
        }
        if table is not None:
            u = index[name]
            row["scores"] = {k: float(v[u]) for k, v in table.scores.items()}
            row["predicted_damage"] = float(table.damage[u, col[spec]])
        layers.append(row)
    method = table.method if table is not None else None
    return {"format": "mixbits.layer_statistics/1", "sensitivity_method": method, "layers": layers}


def write_outputs(out: Path, results: dict, layers: dict, plan: Plan, table: DamageTable | None) -> list[str]:
    """Write the run's result files into `out`; returns the names actually written (no
    sensitivity.json when a given plan skipped the sensitivity stage)."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "results.json", results)
    atomic_write_json(out / "layer_statistics.json", layers)
    plan.save(out / "plan.json")
    written = ["results.json", "layer_statistics.json", "plan.json"]
    if table is not None:  # the table carries what produced it: the run's config, data hashes and versions
        run = {k: results[k] for k in ("config", "environment", "data")}
        table.with_meta(run=run).save(out / "sensitivity.json")
        written.append("sensitivity.json")
    return written
