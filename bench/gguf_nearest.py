"""A run's plan exported as GGUF with --nearest: which layers move, and the file's bytes against the prediction.

    python bench/gguf_nearest.py runs/demo [--gguf-pre default]

Runs `mixbits export --format gguf --nearest` into RUN/export-gguf-nearest/model.gguf (replacing an earlier
one), then prints, per planned spec, how many layers kept their code bits and how many moved, whether every
moved layer is one whose row allows no GGUF type at its planned bits (576-wide rows of SmolLM2 below 4 bits,
or at 6), and the file's bytes beside `export.gguf_size`'s prediction for the exported plan.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

from mixbits.export.gguf_size import gguf_size, meta_model
from mixbits.jobs.allocate import _config_and_tokenizer
from mixbits.model.apply import layer_shapes
from mixbits.plan import Plan
from mixbits.quant.spec import ggml_types_for_row


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("run_dir", type=Path)
    args.add_argument("--gguf-pre", default="default")
    a = args.parse_args()
    out = a.run_dir / "export-gguf-nearest"
    cli = str(Path(sys.executable).parent / "mixbits")
    subprocess.run([cli, "export", "--format", "gguf", "--run-dir", str(a.run_dir), "--nearest", "--out", str(out),
                    "--gguf-pre", a.gguf_pre, "--overwrite"], check=True)
    path = out / "model.gguf"
    planned, written = Plan.load(a.run_dir / "plan.json"), Plan.load(path.with_suffix(".plan.json"))
    model = json.loads((a.run_dir / "results.json").read_text())["config"]["model"]
    config, tokenizer = _config_and_tokenizer(model)
    skeleton = meta_model(config)
    shapes = layer_shapes(skeleton)
    rows = Counter()
    for name, spec in planned.quantized().items():
        new = written.specs[name]
        no_type = spec.bits not in (4, 5, 8) and not any(t.code_bits == spec.bits
                                                         for t in ggml_types_for_row(shapes[name][1]))
        rows[(spec.label, shapes[name][1], new.label, new.bits != spec.bits, no_type)] += 1
    print("| planned | row length | exported as | layers | moved | row allows no GGUF type at its bits |")
    print("|---|---:|---|---:|---|---|")
    for (label, row, new, moved, no_type), n in sorted(rows.items()):
        print(f"| {label} | {row} | {new} | {n} | {'yes' if moved else 'no'} | {'yes' if no_type else 'no'} |")
    moved = sum(n for k, n in rows.items() if k[3])
    only_rows = all(k[3] == k[4] for k in rows)
    predicted = gguf_size(skeleton, tokenizer, tokenizer_pre=a.gguf_pre, name="model").file_bytes(written)
    print(f"\nmoved: {moved} of {sum(rows.values())} layers; moved exactly where the row allows no type at the "
          f"planned bits: {only_rows}\nfile {path.stat().st_size} bytes, predicted {predicted} bytes")


if __name__ == "__main__":
    main()
