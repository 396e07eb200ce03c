"""Export a finished run in every format, load each export back through the engine that reads
that format, and score the loaded model beside the in-memory quantized model of the same plan
(the nearest one the format stores, as `mixbits export --nearest` writes it) on the same held-out
test tokens: perplexity of both, KL(in-memory || loaded) and top-1 agreement.

    python bench/export_table.py --run-dir runs/demo --out-dir runs/export-table --eval-windows 8

Writes OUT_DIR/export_table.json (every figure, the command and the environment) and prints the
markdown table of the README. Optional engines join when importable: GPTQModel (`gptqmodel`) and
llama.cpp (`llama_cpp`, `pip install mixbits[llamacpp]`). The exporting and loading live in
`mixbits.export.roundtrip`; this script only picks the run, the tokens and the table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import platform
import sys
from importlib import metadata
from pathlib import Path

import torch

from mixbits.data.text import load_text
from mixbits.data.windows import eval_windows
from mixbits.export.from_native import load_for_export
from mixbits.export.roundtrip import ROUTES, available, measure_format
from mixbits.io import atomic_write_json
from mixbits.model.apply import layer_shapes
from mixbits.model.load import load_model

FORMATS = ("native", "gptq", "compressed", "gguf")
TESTS = {  # the tests under tests/export/ that check each route on a tiny random model
    "native": "test_roundtrip.py", "gptq": "test_gptq.py, test_roundtrip.py",
    "gptqmodel": "test_roundtrip.py (needs gptqmodel)", "compressed": "test_compressed.py, "
    "test_roundtrip.py", "gguf": "test_gguf.py, test_roundtrip.py",
    "llama.cpp": "test_gguf.py, test_roundtrip.py (need llama_cpp)",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", type=Path, default=Path("runs/demo"), help="output folder of `mixbits run`")
    p.add_argument("--out-dir", type=Path, default=None, help="where exports and the JSON go (RUN_DIR/export-table)")
    p.add_argument("--eval-windows", type=int, default=8, help="first N held-out test windows")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per window")
    p.add_argument("--formats", default=",".join(FORMATS), help="comma-separated subset of " + ", ".join(FORMATS))
    return p.parse_args(argv)


def environment() -> dict:
    import transformers

    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "transformers": transformers.__version__, "threads": torch.get_num_threads()}
    for package in ("compressed-tensors", "gguf", "gptqmodel", "llama-cpp-python"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def table(report: dict) -> str:
    lines = [f"`{report['model']}`, plan `{report['plan']}` ({report['plan_bpw']:.3f} bpw), "
             f"{report['windows']} x {report['seqlen']} held-out `{report['dataset']}` test tokens, "
             f"torch {report['environment']['torch']}",
             "",
             "| format | loaded by | checked in | layers changed by --nearest | plan bpw | MB on disk "
             "| ppl in memory | ppl loaded | KL (nats/token) | top-1 |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        label = r["route"] if r["route"] == r["format"] else f"{r['format']} ({r['route']})"
        lines.append(f"| {label} | {r['engine']} | {TESTS[r['route']]} | {r['changed_layers']} | {r['bpw']:.3f} "
                     f"| {r['bytes'] / 1e6:.1f} | {r['ppl_in_memory']:.2f} | {r['ppl_loaded']:.2f} "
                     f"| {r['kl']:.2e} | {100 * r['top1']:.1f} % |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out_dir = args.out_dir or args.run_dir / "export-table"
    run = json.loads((args.run_dir / "results.json").read_text())["config"]
    source = load_for_export(args.run_dir / "model")
    original, tokenizer = load_model(run["model"])
    docs = load_text(run["data"]["dataset"], "test")
    windows = eval_windows(tokenizer, docs, args.seqlen, args.eval_windows)
    routes = available(ROUTES)
    rows = []
    for fmt in [f.strip() for f in args.formats.split(",") if f.strip()]:
        rows += measure_format(fmt, source, original, windows, out_dir, routes)
    report = {
        "format": "mixbits.export_table/1", "command": " ".join(["python", "bench/export_table.py", *(sys.argv[1:] if argv is None else argv)]),
        "date": datetime.date.today().isoformat(), "model": run["model"], "run_dir": str(args.run_dir),
        "plan": f"{run['allocation']['target_bpw']} bpw" if run["allocation"].get("target_bpw") else "run plan",
        "plan_bpw": source.plan.bits_per_weight(layer_shapes(source.model)),
        "dataset": run["data"]["dataset"], "windows": int(windows.shape[0]), "seqlen": int(windows.shape[1]),
        "skipped_routes": [r.name for r in ROUTES if r not in routes], "environment": environment(), "rows": rows,
    }
    atomic_write_json(out_dir / "export_table.json", report)
    print(table(report))
    return report


if __name__ == "__main__":
    main()
