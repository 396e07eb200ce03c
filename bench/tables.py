"""Print the README's markdown tables from the JSON files that mixbits commands wrote.

    python bench/tables.py run runs/demo/results.json
    python bench/tables.py sweep runs/sweep-rtn/sweep.json
    python bench/tables.py analyze runs/analyze/analysis.json
    python bench/tables.py quantizers runs/quantizers-{rtn,clip,gptq}/sweep.json
    python bench/tables.py classify runs/classify-minilm/classify.json
    python bench/tables.py zeroshot runs/demo/results.json      (or a zeroshot.json)

It formats; every figure comes from the file, which comes from the command recorded in it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def run_table(r: dict) -> str:
    lines = [f"`{r['model']['name']}`, target {r['budget']['target']}, quantizer "
             f"`{r['config'].get('quantizer', 'rtn')}`, {r['data']['test']['windows']} x {r['data']['test']['seqlen']} "
             f"held-out `{r['data']['dataset']}` test tokens, {r['environment']['device']}, torch {r['environment']['torch']}",
             "",
             "| model | bpw | MB on disk | perplexity | KL (nats/token) | top-1 agreement |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, m in r["models"].items():
        label = name if m.get("fits_budget", True) else f"{name} (over budget)"
        kl = "–" if name == "original" else f"{m['kl']:.4f}"
        top1 = "–" if name == "original" else f"{100 * m['top1']:.1f} %"
        lines.append(f"| {label} | {m['bpw']:.3f} | {m['bytes_on_disk'] / 1e6:.1f} | {m['ppl']:.2f} | {kl} | {top1} |")
    lines.append("")
    lines.append("Stage times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in r["timings_s"].items()))
    return "\n".join(lines)


def sweep_table(r: dict) -> str:
    rows = [x for x in r["rows"] if x["target_bpw"] is not None]
    budgets = sorted({x["target_bpw"] for x in rows})
    head = "| strategy | " + " | ".join(f"{b:g} bpw" for b in budgets) + " |"
    lines = [f"`{r['model']}`, quantizer `{r['quantizer']}`, damage `{r['sensitivity']}`, "
             f"{r['data']['test']['windows']} x {r['data']['test']['seqlen']} held-out tokens; original ppl "
             f"{r['original']['ppl']:.2f}. Cells: perplexity (achieved bpw; `+x` = over the budget by x bpw).", "",
             head, "|---|" + "---:|" * len(budgets)]
    best = {b: min(x["ppl"] for x in rows if x["target_bpw"] == b and x["miss"] == 0) for b in budgets}
    for name in dict.fromkeys(x["strategy"] for x in rows):
        cells = []
        for b in budgets:
            x = next((x for x in rows if x["strategy"] == name and x["target_bpw"] == b), None)
            if x is None:
                cells.append("–")
                continue
            mark = "**" if x["miss"] == 0 and x["ppl"] == best[b] else ""
            miss = f", +{x['miss']:.2f}" if x["miss"] else ""
            cells.append(f"{mark}{x['ppl']:.2f}{mark} ({x['bpw']:.2f}{miss})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    uni = sorted((x for x in r["rows"] if x["strategy"] == "uniform" and x["target_bpw"] is None), key=lambda x: x["bpw"])
    if uni:
        lines += ["", "| uniform config | bpw | MB | perplexity | KL |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {x['rule'].split()[-1]} | {x['bpw']:.3f} | {x['mb']:.1f} | {x['ppl']:.2f} | {x['kl']:.4f} |" for x in uni]
    return "\n".join(lines)


def analyze_table(r: dict) -> str:
    v = r["validation"]
    lines = [f"`{r['model']['name']}`, {r['config']['granularity']} granularity, measured damage: "
             f"{v['measured_method']} on held-out windows at {', '.join(v['configs'])}", "",
             "| method | Spearman ρ | seconds | cost (× one fwd+bwd over the calibration tokens) |",
             "|---|---:|---:|---:|"]
    for name, m in v["methods"].items():
        mark = " (chosen)" if name == v["best_method"] else ""
        cost = "–" if m["cost_ratio"] is None else f"{m['cost_ratio']:.2f}"
        sec = "–" if m["seconds"] is None else f"{m['seconds']:.1f}"
        lines.append(f"| {name}{mark} | {m['spearman']:.3f} | {sec} | {cost} |")
    lines += ["", f"Rule: {v['rule']}"]
    return "\n".join(lines)


def _cost(sweep: dict, row: dict) -> float:
    """Wall time of a row in forward passes over the calibration tokens: the quantizer's own time,
    plus the sensitivity stage for plans allocated from it (uniform plans need none)."""
    seconds = row["quantize_s"] + (sweep["timings_s"]["sensitivity"] if row["strategy"] != "uniform" else 0.0)
    return seconds / sweep["forward_s"]


def _quantizer(sweep: dict) -> str:
    """The quantizer's name; GPTQ with its group-scale rule (files without the field ran min-max)."""
    if sweep["quantizer"] != "gptq":
        return sweep["quantizer"]
    return "gptq + clip" if (sweep.get("gptq") or {}).get("clip") else "gptq (min-max)"


def quantizers_table(sweeps: list[dict], tolerance: float = 0.02) -> str:
    """{quantizer} x {uniform, optimal} at every budget: perplexity and cost; the default is the
    quantizer of the lowest optimal perplexity, the cheapest within `tolerance` of it, summed over budgets."""
    budgets = sorted({x["target_bpw"] for s in sweeps for x in s["rows"] if x["target_bpw"] is not None})
    first = sweeps[0]
    lines = [f"`{first['model']}`, {first['data']['test']['windows']} x {first['data']['test']['seqlen']} held-out "
             f"tokens, original ppl {first['original']['ppl']:.2f}; cells: perplexity (bpw) and wall time in forward "
             f"passes over the {first['data']['calibration']['windows']} x {first['data']['calibration']['seqlen']} "
             "calibration tokens, measured in the same run (optimal: sensitivity + quantization; uniform: "
             "quantization)", "",
             "| quantizer | plan | damage table | " + " | ".join(f"{b:g} bpw | time (× fwd)" for b in budgets) + " |",
             "|---|---|---|" + "---:|---:|" * len(budgets)]
    totals = {}
    for s in sweeps:
        for strategy in ("uniform", "optimal"):
            cells = []
            for b in budgets:
                x = next((x for x in s["rows"] if x["strategy"] == strategy and x["target_bpw"] == b), None)
                cells += ["–", "–"] if x is None else [f"{x['ppl']:.2f} ({x['bpw']:.2f})", f"{_cost(s, x):.1f}"]
                if x is not None and strategy == "optimal":
                    ppl, cost = totals.get(_quantizer(s), (0.0, 0.0))
                    totals[_quantizer(s)] = (ppl + x["ppl"], cost + _cost(s, x))
            follows = "gain_" in s.get("damage", "")
            damage = "–" if strategy != "optimal" else f"{s['sensitivity']} × gain_{s['quantizer']}" if follows \
                else s["sensitivity"]
            lines.append(f"| {_quantizer(s)} | {strategy} | {damage} | " + " | ".join(cells) + " |")
    best = min(p for p, _ in totals.values())
    near = {q: c for q, (p, c) in totals.items() if p <= best * (1 + tolerance)}
    choice = min(near, key=near.get)
    lines += ["", f"Default: `{choice}` (rule: the lowest summed perplexity of `optimal` over the budgets; among "
              f"quantizers within {100 * tolerance:g} % of it, the lowest summed time)."]
    return "\n".join(lines)


def classify_table(r: dict) -> str:
    ev, orig = r["evaluation"], r["original"]
    lines = [f"`{r['model']['name']}` on `{r['data']['dataset']}`, {ev['int4']} round-to-nearest, "
             f"{ev['test_examples']} test sentences (one = {100 * ev['one_example']:.2f} points; original ± "
             f"{100 * ev['original_standard_error']:.1f} points standard error), {r['environment']['device']}",
             "",
             "| model | layers 4/6/8 bit | bpw | MB | test accuracy | lost / gained sentences | McNemar p |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for row in r["strategies"]:
        bits = "/".join(str(row["layers_by_bits"].get(b, 0)) for b in ("4", "6", "8"))
        flips = "–" if row["name"] == "original" else f"{row['lost']} / {row['gained']}"
        p = "–" if row["name"] == "original" else f"{row['mcnemar_p']:.2f}"
        lines.append(f"| {row['name']} | {bits} | {row['bpw']:.3f} | {row['mb']:.1f} | {100 * row['accuracy']:.1f} % "
                     f"| {flips} | {p} |")
    flips = [round(row["accuracy_drop"] / ev["one_example"]) for row in r["layers"]]
    counts = ", ".join(f"{k}: {flips.count(k)}" for k in sorted(set(flips)))
    lines += ["", f"Original training accuracy {100 * orig['train_accuracy']:.1f} %. Test sentences lost by each "
              f"linear alone at {ev['int4']} (net), layers per count: {counts}."]
    return "\n".join(lines)


def zeroshot_table(r: dict) -> str:
    """Zero-shot accuracy per task and model (a zeroshot.json, or results.json with a zeroshot section);
    `*` marks a score above chance by more than two standard errors."""
    z = r.get("zeroshot", r)
    labels = list(next(iter(z["tasks"].values()))["models"])
    lines = [f"lm-eval {z['lm_eval']}, {z['num_fewshot']}-shot, first {z['limit']} documents per task; "
             "acc / acc_norm ± standard error; `*` = above chance by > 2 standard errors", "",
             "| task | docs | chance | " + " | ".join(f"{m} acc | {m} acc_norm" for m in labels) + " |",
             "|---|---:|---:|" + "---:|---:|" * len(labels)]

    def cell(v: float, se: float, chance: float | None) -> str:
        star = " *" if chance is not None and v - chance > 2 * se else ""
        return f"{v:.3f} ± {se:.3f}{star}"

    for task, e in z["tasks"].items():
        cells = []
        for m in labels:
            s = e["models"][m]
            cells += [cell(s["acc"], s["acc_stderr"], e["chance"]), cell(s["acc_norm"], s["acc_norm_stderr"], e["chance"])]
        chance = "–" if e["chance"] is None else f"{e['chance']:.3f}"
        lines.append(f"| {task} | {e['docs']} | {chance} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    kinds = {"run": run_table, "sweep": sweep_table, "analyze": analyze_table, "classify": classify_table,
             "zeroshot": zeroshot_table}
    if len(argv) >= 2 and argv[0] == "quantizers":
        print(quantizers_table([json.loads(Path(f).read_text()) for f in argv[1:]]))
        return
    if len(argv) != 2 or argv[0] not in kinds:
        raise SystemExit(f"usage: python bench/tables.py {{{'|'.join(kinds)}}} FILE.json, "
                         "or quantizers SWEEP.json [SWEEP.json ...]")
    print(kinds[argv[0]](json.loads(Path(argv[1]).read_text())))


if __name__ == "__main__":
    main(sys.argv[1:])
