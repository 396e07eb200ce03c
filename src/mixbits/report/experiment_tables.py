"""Terminal tables of `mixbits compare` (comparison_summary.json) and `mixbits ablate`
(ablation.json): one table for the models, one per ablation section. Reads; computes nothing
but ratios of the numbers it is given."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

TITLES = {
    "strategy": "strategy: the seed's presets vs the exact optimum at the same stored size",
    "training": "training adaptation: Block-AP schedules at equal total epochs",
    "budget": "target bits: optimal vs the richest uniform config within each budget",
}


def _f(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def print_comparison(console: Console, summary: dict) -> None:
    table = Table(title="models compared at the same budget, on their own held-out windows")
    for col in ("model", "params (M)", "orig ppl", "orig MB", "mixed ppl", "mixed bpw", "mixed MB", "compression",
                "best uniform within budget"):
        table.add_column(col, justify="left" if col in ("model", "best uniform within budget") else "right")
    for name, m in summary["models"].items():
        fits = {k: u for k, u in m["uniform"].items() if u["fits_budget"]}
        best = min(fits.items(), key=lambda kv: kv[1]["ppl"], default=None)
        uniform = "-" if best is None else f"{best[0]}: {best[1]['ppl']:.3f}"
        table.add_row(name, f"{m['parameters'] / 1e6:.2f}", f"{m['original']['ppl']:.3f}",
                      f"{m['original']['bytes_on_disk'] / 1e6:.4g}", f"{m['mixed']['ppl']:.3f}",
                      f"{m['mixed']['bpw']:.3f}", f"{m['mixed']['bytes_on_disk'] / 1e6:.4g}",
                      f"{m['mixed']['compression']:.2f}x", uniform)
    console.print(table)


def _columns(name: str) -> list[tuple[str, str, str]]:
    """(header, row key, format) per column of a section."""
    lead = {"strategy": [("arm", "arm", "s"), ("target", "target", "s")],
            "training": [("arm", "arm", "s"), ("init", "init", "s"), ("total epochs", "total_epochs", ".2f"),
                         ("blocks improved", "improved_blocks", "d")],
            "budget": [("target bpw", "target_bpw", "g"), ("arm", "arm", "s")]}[name]
    tail = [("bpw", "bpw", ".3f"), ("MB", "mb", ".4g"), ("ppl", "ppl", ".3f"), ("KL", "kl", ".4f"),
            ("seconds", "seconds", ".1f")]
    if name != "training":
        tail.insert(4, ("predicted damage", "predicted_damage", ".4g"))
    return lead + tail


def print_ablation_section(console: Console, name: str, section: dict, original_ppl: float | None = None) -> None:
    title = TITLES.get(name, name) + ("" if original_ppl is None else f" (original ppl {original_ppl:.3f})")
    table = Table(title=title)
    columns = _columns(name)
    for header, _, fmt in columns:
        table.add_column(header, justify="left" if fmt == "s" else "right", no_wrap=True)
    for row in section["rows"]:
        table.add_row(*(_f(row.get(key), fmt) for _, key, fmt in columns))
    console.print(table)


def print_ablation(console: Console, results: dict) -> None:
    for name, section in results["sections"].items():
        print_ablation_section(console, name, section, results.get("original", {}).get("ppl"))
