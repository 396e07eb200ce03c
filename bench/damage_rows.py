"""Runs that differ only in `--damage-rows`: what sampling the ggml types' damage costs and changes.

    OMP_NUM_THREADS=1 mixbits run --model smollm2-135m --candidates gguf --target-size-mb 118 --damage rtn \\
        --quantizer rtn --no-baselines --no-cache --damage-rows 0 --output-dir runs/rows-all     # and 64, 128
    python bench/damage_rows.py runs/rows-all runs/rows-64 runs/rows-128 [--out rows.md]

The first folder is the reference: its sensitivity.json must hold every row's damage (`--damage-rows 0`).
Per run, one row of a markdown table: the rows sampled, the sensitivity stage's seconds (results.json
`timings_s`), the layers whose type differs from the reference plan, each plan's predicted damage
under the REFERENCE table (Σ_u damage_full[u, type_u]: how much worse the sampled plan is by the
measure the full table optimizes), the GGUF bytes the plan predicts, and the mixed model's
perplexity, KL to the original and top-1 agreement (results.json). Also the sampled table's error on
the ggml entries: the median of |damage_R / damage_full − 1| over the entries, and the summed error
Σ|damage_R − damage_full| / Σ damage_full (an entry whose damage is ~0, as a type whose grid holds the
weights almost exactly, has a large relative error of no weight; the sum weighs each by its damage).
Reads run folders only; computes nothing but sums over the saved tables.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np

from mixbits.allocate.registry import predicted_damage
from mixbits.plan import Plan
from mixbits.quant.spec import GGMLSpec
from mixbits.sensitivity.table import DamageTable

COLUMNS = ("run", "damage rows", "sensitivity s", "layers typed differently", "predicted damage (full table)",
           "vs reference", "GGUF bytes", "ppl", "KL", "top-1", "ggml entries: median / summed error")


def load(folder: Path) -> dict:
    results = json.loads((folder / "results.json").read_text())
    return {"folder": folder, "results": results, "plan": Plan.load(folder / "plan.json"),
            "table": DamageTable.load(folder / "sensitivity.json"),
            "rows": results["config"].get("damage_rows") or "all"}


def entry_error(table: DamageTable, reference: DamageTable) -> tuple[float, float]:
    """Median of |damage / reference − 1| and Σ|damage − reference| / Σ reference over the measured ggml
    entries."""
    if table.units != reference.units or table.configs != reference.configs:
        raise SystemExit(f"{table.method} tables over other layers or configs: compare runs of one model and "
                         "candidates")
    ggml = [j for j, c in enumerate(table.configs) if isinstance(c, GGMLSpec)]
    est, ref = table.damage[:, ggml], reference.damage[:, ggml]
    ok = np.isfinite(ref) & (ref > 0)
    return (float(np.median(np.abs(est[ok] / ref[ok] - 1))),
            float(np.abs(est[ok] - ref[ok]).sum() / ref[ok].sum()))


def compare(runs: list[dict]) -> list[dict]:
    ref = runs[0]
    if ref["table"].meta.get("options", {}).get("damage_rows"):
        raise SystemExit(f"{ref['folder']}: the reference must measure every row (run it with --damage-rows 0)")
    ref_specs = ref["plan"].quantized()
    base = predicted_damage(ref["table"], ref_specs)
    rows = []
    for run in runs:
        specs = run["plan"].quantized()
        mixed = run["results"]["models"]["mixed"]
        damage = predicted_damage(ref["table"], specs)
        rows.append({
            "run": str(run["folder"]), "damage rows": run["rows"],
            "sensitivity s": round(run["results"]["timings_s"]["sensitivity"], 1),
            "layers typed differently": sum(specs.get(n) != ref_specs.get(n) for n in ref["table"].units),
            "predicted damage (full table)": damage, "vs reference": damage / base - 1,
            "GGUF bytes": run["plan"].meta.get("gguf", {}).get("file_bytes"),
            "ppl": mixed["ppl"], "KL": mixed["kl"], "top-1": mixed["top1"],
            "ggml entries: median / summed error": entry_error(run["table"], ref["table"]),
        })
    return rows


def markdown(rows: list[dict]) -> str:
    def cell(key, value):
        if key == "vs reference":
            return f"{100 * value:+.2f} %"
        if key == "ggml entries: median / summed error":
            return f"{100 * value[0]:.1f} % / {100 * value[1]:.1f} %"
        if key == "GGUF bytes":
            return "-" if value is None else f"{value:,}"
        if key == "top-1":
            return f"{100 * value:.1f} %"
        if key == "ppl":
            return f"{value:.3f}"
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(k, r[k]) for k in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    a = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    a.add_argument("runs", nargs="+", type=Path, help="run folders; the first measured every row")
    a.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = a.parse_args(argv)
    text = "    python bench/damage_rows.py " + shlex.join(sys.argv[1:] if argv is None else argv) + "\n\n"
    text += markdown(compare([load(f) for f in args.runs]))
    if args.out is not None:
        args.out.write_text(text + "\n")
    print(text)
    return text


if __name__ == "__main__":
    main()
