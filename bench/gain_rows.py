"""GPTQ's gain measured on every output row or on a sample of rows (`mixbits run --gain-rows`):
its time, how far the sampled gains are from the every-row ones, and what the plans they choose score.

    OMP_NUM_THREADS=1 python bench/gain_rows.py --model smollm2-135m --rows 128,256 \\
        --budgets 3,3.5,4,4.25 --out runs/gain_rows
    python bench/gain_rows.py --quick --out /tmp/gain_rows     # tiny random Llama: a smoke run

Steps, in one process, on the calibration windows `mixbits run` samples: the Fisher table (what
`--damage rtn` allocates on); the gain table of the run's quantizer (GPTQ with clip-searched group
scales; `sensitivity.follow.gain_table`) on every row and at each sample size, each computed afresh
and timed; per sample size, the relative difference |g_sampled / g_every_row - 1| over every layer
and quantizing config (max, 95th percentile, median). Then, per budget, the optimal plan on
Fisher x gain (every row, each sample size) and on Fisher alone (`--damage rtn`); each distinct
plan is quantized with GPTQ once, as `mixbits run` quantizes (sequential blocks, clip search), and
scored on the held-out windows of two domains: perplexity and KL(original || model) per token.
Tables are kept in OUT/tables (a rerun reuses them; --fresh recomputes), results in OUT/gain_rows.json
and OUT/gain_rows.md.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _measure import machine_info  # noqa: E402
from mixbits.allocate.budget import Budget  # noqa: E402
from mixbits.allocate.feasibility import check_budget  # noqa: E402
from mixbits.allocate.registry import run_strategy  # noqa: E402
from mixbits.config import AllocationConfig, DataConfig, RunConfig  # noqa: E402
from mixbits.data.text import load_text  # noqa: E402
from mixbits.data.windows import eval_windows  # noqa: E402
from mixbits.eval.perplexity import evaluate_models  # noqa: E402
from mixbits.io import atomic_write_json, atomic_write_text  # noqa: E402
from mixbits.model.quantize import quantize_model  # noqa: E402
from mixbits.pipeline import calibrate, prepare, sensitivity  # noqa: E402
from mixbits.plan import Plan  # noqa: E402
from mixbits.sensitivity.follow import follow_quantizer, gain_table  # noqa: E402
from mixbits.sensitivity.table import DamageTable  # noqa: E402
from mixbits.timing import StageTimer  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    a = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    a.add_argument("--model", default="smollm2-135m")
    a.add_argument("--dataset", default="wiki")
    a.add_argument("--second-domain", default="canterbury")
    a.add_argument("--calib-windows", type=int, default=16)
    a.add_argument("--seqlen", type=int, default=512)
    a.add_argument("--eval-windows", type=int, default=8)
    a.add_argument("--rows", default="128,256", help="sample sizes to measure beside every row")
    a.add_argument("--budgets", default="3,3.5,4,4.25", help="bpw of the plans scored")
    a.add_argument("--device", default="cpu")
    a.add_argument("--out", type=Path, default=Path("runs/gain_rows"))
    a.add_argument("--fresh", action="store_true", help="recompute the tables kept in OUT/tables")
    a.add_argument("--quick", action="store_true")
    args = a.parse_args(argv)
    args.rows = tuple(int(r) for r in args.rows.split(",") if r.strip())
    args.budgets = tuple(float(b) for b in args.budgets.split(",") if b.strip())
    return args


def _domain(name: str) -> str:
    return Path(name).stem if name.endswith((".txt", ".jsonl")) else name


def _table(path: Path, fresh: bool, compute) -> tuple[DamageTable, float | None]:
    """(table, seconds to compute it; None when read back from an earlier run's file)."""
    if path.is_file() and not fresh:
        return DamageTable.from_dict(json.loads(path.read_text())["table"]), None
    began = time.perf_counter()
    table = compute()
    seconds = time.perf_counter() - began
    atomic_write_json(path, {"table": table.to_dict(), "seconds": seconds})
    return table, seconds


def agreement(sampled: np.ndarray, full: np.ndarray) -> dict:
    """|sampled / full - 1| over every layer and quantizing config (keep's gain is 1 in both)."""
    rel = np.abs(sampled[:, :-1] / full[:, :-1] - 1.0).ravel()
    return {"max": float(rel.max()), "p95": float(np.percentile(rel, 95)), "median": float(np.median(rel))}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.quick:
        from quality_quick import quick_data

        args.model, args.dataset, args.second_domain = quick_data(args.out / "quick-data")
        args.seqlen, args.calib_windows, args.eval_windows, args.rows = 64, 4, 2, (8,)
    cfg = RunConfig(model=args.model, output_dir=args.out, device=args.device, progress=False, report=False,
                    use_cache=False, data=DataConfig(dataset=args.dataset, seqlen=args.seqlen,
                                                     calib_windows=args.calib_windows, eval_windows=args.eval_windows),
                    allocation=AllocationConfig(target_bpw=max(args.budgets)))
    p = prepare(cfg, StageTimer())
    calib, test, info = calibrate(cfg, p, StageTimer())
    domains = {_domain(args.dataset): test, _domain(args.second_domain): eval_windows(p.tokenizer, load_text(args.second_domain, "test"),
                                                                     args.seqlen, args.eval_windows)}
    tables, seconds = args.out / "tables", {}
    fisher, seconds["fisher"] = _table(tables / "fisher.json", args.fresh,
                                       lambda: sensitivity(replace(cfg, damage="rtn"), p, calib, StageTimer(), info))
    gains = {}
    for rows in (None, *args.rows):
        name = "every row" if rows is None else f"{rows} rows"
        gains[name], seconds[f"gain, {name}"] = _table(
            tables / f"gain_{rows or 'all'}.json", args.fresh,
            lambda rows=rows: gain_table(p.model, calib, p.linears, cfg.allocation.configs(), quantizer=cfg.quantizer,
                                         device=p.device, progress=False, gptq=cfg.gptq, rows=rows))
    agree = {name: agreement(g.damage, gains["every row"].damage) for name, g in gains.items() if name != "every row"}
    damage = {"rtn damage (Fisher)": fisher} | {f"follow, {n}": follow_quantizer(fisher, g) for n, g in gains.items()}

    results = []
    for bpw in args.budgets:
        bits = check_budget(p.shapes, cfg.allocation.configs(), p.groups, p.constraints, Budget(bpw=bpw), p.fixed_bytes)
        plans = {arm: run_strategy("optimal", t, p.groups, bits, constraints=p.constraints).specs
                 for arm, t in damage.items()}
        unique: dict[tuple, list[str]] = {}
        for arm, specs in plans.items():
            unique.setdefault(tuple(sorted((u, s.label) for u, s in specs.items())), []).append(arm)
        models = {"original": p.model}
        for i, arms in enumerate(unique.values()):
            models[str(i)], _ = quantize_model(p.model, Plan(plans[arms[0]]), quantizer=cfg.quantizer, windows=calib,
                                               device=p.device, progress=False, gptq=cfg.gptq)
        scores = {d: evaluate_models(models, w, device=p.device, reference="original", progress=False)
                  for d, w in domains.items()}
        index = {arm: (i, arms[0]) for i, arms in enumerate(unique.values()) for arm in arms}
        for arm in plans:  # in the order of `damage`
            i, first = index[arm]
            results.append({"bpw_budget": bpw, "arm": arm, "bpw": Plan(plans[arm]).bits_per_weight(p.shapes),
                            "same_plan_as": first if arm != first else None,
                            **{d: {"ppl": s[str(i)].ppl, "kl": s[str(i)].kl} for d, s in scores.items()}})
        del models
        print(f"{bpw:g} bpw: {len(unique)} distinct plan(s) of {len(plans)}", flush=True)
        write(args, argv, info, seconds, agree, results, domains)  # a killed run keeps the finished budgets
    return write(args, argv, info, seconds, agree, results, domains)


def write(args, argv, info, seconds, agree, results, domains) -> dict:
    data = {"meta": {"command": shlex.join(["python", "bench/gain_rows.py", *(sys.argv[1:] if argv is None else argv)]),
                     "model": args.model, "calibration": info["calibration"], "eval_windows": args.eval_windows,
                     "threads": torch.get_num_threads(), "machine": machine_info(torch.device(args.device))},
            "seconds": seconds, "agreement": agree, "results": results}
    atomic_write_json(args.out / "gain_rows.json", data)
    atomic_write_text(args.out / "gain_rows.md", report(data, tuple(domains)) + "\n")
    return data


def report(data: dict, domains: tuple[str, ...]) -> str:
    m = data["meta"]
    secs = ", ".join(f"{k} {v:.1f} s" if v is not None else f"{k} (read back)" for k, v in data["seconds"].items())
    lines = [f"`{m['command']}`", "", f"{m['machine']['date']}, {m['machine']['cpu']}, {m['threads']} torch "
             f"thread(s); calibration {m['calibration']['windows']} x {m['calibration']['seqlen']}; "
             f"{m['eval_windows']} held-out windows per domain.", "", f"Seconds: {secs}.", "",
             "| gain on | max rel. diff | 95th pct | median |", "|---|---:|---:|---:|"]
    lines += [f"| {n} | {a['max']:.4f} | {a['p95']:.4f} | {a['median']:.4f} |" for n, a in data["agreement"].items()]
    lines += ["", "| budget | damage | bpw | " + " | ".join(f"{d} ppl | {d} KL" for d in domains) + " | note |",
              "|---|---|---:|" + "---:|---:|" * len(domains) + "---|"]
    for r in data["results"]:
        cells = " | ".join(f"{r[d]['ppl']:.2f} | {r[d]['kl']:.4f}" for d in domains)
        note = f"same plan as {r['same_plan_as']}" if r["same_plan_as"] else ""
        lines.append(f"| {r['bpw_budget']:g} | {r['arm']} | {r['bpw']:.3f} | {cells} | {note} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
