"""Terminal tables of a run, a sweep and an analysis. Reads the results dicts; computes nothing."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def print_results(console: Console, results: dict) -> None:
    table = Table(title=f"{results['model']['name']} at {results['budget']['target']} "
                        f"({results['data']['test']['windows']} x {results['data']['test']['seqlen']} test tokens)")
    for col in ("model", "bpw", "MB on disk", "perplexity", "KL (nats/tok)", "top-1 agree"):
        table.add_column(col, justify="right" if col != "model" else "left", no_wrap=True)
    for name, m in results["models"].items():
        kl = "-" if name == "original" else f"{m['kl']:.4f}"
        top1 = "-" if name == "original" else f"{100 * m['top1']:.1f}%"
        label = name if m.get("fits_budget", True) else f"{name} (over budget)"
        table.add_row(label, f"{m['bpw']:.3f}", f"{m['bytes_on_disk'] / 1e6:.1f}", f"{m['ppl']:.3f}", kl, top1)
    console.print(table)
    if "iterative" in results:
        print_iterative(console, results["iterative"])
    console.print("stage times (s): " + ", ".join(f"{k} {v:.1f}" for k, v in results["timings_s"].items()))


def print_iterative(console: Console, it: dict) -> None:
    """The iterative path: one row per step, the rolled-back one marked."""
    table = Table(title=f"iterative to {it['spec']}, limit +{100 * it['max_ppl_increase']:g} % over validation ppl "
                        f"{it['original_ppl']:.3f}; stopped: {it['stopped']}")
    for col in ("step", "linears", "bpw", "val. ppl", "increase", ""):
        table.add_column(col, justify="right" if col else "left", no_wrap=True)
    for s in it["steps"]:
        table.add_row(str(s["step"]), f"+{len(s['units'])}", f"{s['bpw']:.3f}", f"{s['ppl']:.3f}",
                      f"{100 * s['increase']:+.2f} %", "kept" if s["accepted"] else "rolled back")
    console.print(table)


def print_sweep(console: Console, results: dict) -> None:
    rows = [r for r in results["rows"] if r["target_bpw"] is not None]
    budgets = sorted({r["target_bpw"] for r in rows})
    table = Table(title=f"held-out perplexity by strategy and budget (original {results['original']['ppl']:.3f})")
    table.add_column("strategy", no_wrap=True)
    for b in budgets:
        table.add_column(f"{b:g} bpw", justify="right")
    for name in dict.fromkeys(r["strategy"] for r in rows):
        cells = []
        for b in budgets:
            r = next((r for r in rows if r["strategy"] == name and r["target_bpw"] == b), None)
            cells.append("-" if r is None else f"{r['ppl']:.2f}" + ("" if r["miss"] == 0 else f" (+{r['miss']:.2f})"))
        table.add_row(name, *cells)
    console.print(table)
    uni = sorted((r for r in results["rows"] if r["strategy"] == "uniform" and r["target_bpw"] is None),
                 key=lambda r: r["bpw"])
    if uni:
        console.print("uniform: " + ", ".join(f"{r['rule'].split()[-1]} {r['bpw']:.2f} bpw ppl {r['ppl']:.2f}" for r in uni))


def print_analysis(console: Console, summary: dict, top: int = 10) -> None:
    table = Table(title=f"{summary['model']['name']}: most sensitive {summary['config']['granularity']}s "
                        f"by {summary['best_method']}")
    table.add_column("rank", justify="right")
    table.add_column("unit", no_wrap=True)
    table.add_column("score", justify="right")
    for i, (unit, score) in enumerate(summary["ranking"][:top], 1):
        table.add_row(str(i), unit, f"{score:.4g}")
    console.print(table)
    validation = summary.get("validation")
    if validation:
        v = Table(title=f"validation against {validation['measured_method']} on held-out windows "
                        f"({', '.join(validation['configs'])})")
        for col in ("method", "Spearman ρ", "seconds", "cost (fwd+bwd passes)"):
            v.add_column(col, justify="left" if col == "method" else "right")
        for name, r in validation["methods"].items():
            mark = " *" if name == validation["best_method"] else ""
            cost = "-" if r["cost_ratio"] is None else f"{r['cost_ratio']:.2f}"
            seconds = "-" if r["seconds"] is None else f"{r['seconds']:.1f}"
            v.add_row(name + mark, f"{r['spearman']:.3f}", seconds, cost)
        console.print(v)
        console.print(f"* best: {validation['rule']}")
