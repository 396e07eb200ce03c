"""Print the README's markdown tables from the JSON files that mixbits commands wrote.

    python bench/tables.py run runs/demo/results.json
    python bench/tables.py sweep runs/sweep-rtn/sweep.json
    python bench/tables.py analyze runs/analyze/analysis.json

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


def main(argv: list[str]) -> None:
    kinds = {"run": run_table, "sweep": sweep_table, "analyze": analyze_table}
    if len(argv) != 2 or argv[0] not in kinds:
        raise SystemExit(f"usage: python bench/tables.py {{{'|'.join(kinds)}}} FILE.json")
    print(kinds[argv[0]](json.loads(Path(argv[1]).read_text())))


if __name__ == "__main__":
    main(sys.argv[1:])
