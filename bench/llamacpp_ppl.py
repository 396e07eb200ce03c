"""Perplexity of a run's GGUF export in llama.cpp itself, beside mixbits' own on the same tokens.

    pip install -e '.[llamacpp]'          # llama-cpp-python; builds llama.cpp from source
    mixbits export --format gguf --run-dir runs/demo --nearest
    python bench/llamacpp_ppl.py --run-dir runs/demo --gguf runs/demo/export-gguf/model.gguf

Without --gguf the run is exported here first (as `mixbits export --format gguf --nearest` does).
llama.cpp gets mixbits' own token ids of the first N held-out test windows (no re-tokenization;
a BOS only where mixbits' windows have one), each window evaluated from an empty context, and
its logits are scored by mixbits' `evaluate_models`, the code that scores every mixbits model:
NLL of tokens 1..n-1 given their prefix. Beside it: mixbits' perplexity of the same file loaded
by transformers (dequantized to float) and of the in-memory model of the plan the file stores
(the `<gguf>.plan.json` that `mixbits export --nearest` writes beside it; without one, the run's
plan or, where GGUF cannot store it, the nearest plan it can, which is what --nearest wrote).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from mixbits.data.text import load_text
from mixbits.data.windows import eval_windows
from mixbits.eval.llamacpp import LlamaCppLM
from mixbits.eval.perplexity import evaluate_models
from mixbits.export.from_native import load_for_export, with_plan
from mixbits.export.roundtrip import ROUTES, export_route, in_memory_model, source_for
from mixbits.model.load import load_model
from mixbits.plan import Plan

GGUF_TRANSFORMERS = next(r for r in ROUTES if r.name == "gguf")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", type=Path, default=Path("runs/demo"), help="output folder of `mixbits run`")
    p.add_argument("--gguf", type=Path, default=None, help="a GGUF export of the run (default: export it now)")
    p.add_argument("--out-dir", type=Path, default=None, help="where to export without --gguf (RUN_DIR/llamacpp)")
    p.add_argument("--eval-windows", type=int, default=8, help="first N held-out test windows")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per window (llama.cpp's n_ctx)")
    p.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: torch's)")
    return p.parse_args(argv)


def gguf_and_source(args: argparse.Namespace, original):
    """(the GGUF file, the ExportSource whose plan it stores)."""
    source = load_for_export(args.run_dir / "model")
    plan_file = None if args.gguf is None else args.gguf.with_suffix(".plan.json")
    if plan_file is not None and plan_file.is_file():
        return args.gguf, with_plan(source, original, Plan.load(plan_file))
    chosen, _ = source_for("gguf", source, original)  # the run's plan, or the nearest one GGUF stores
    if args.gguf is None:
        return export_route(chosen, GGUF_TRANSFORMERS, args.out_dir or args.run_dir / "llamacpp"), chosen
    return args.gguf, chosen


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    run = json.loads((args.run_dir / "results.json").read_text())["config"]
    original, tokenizer = load_model(run["model"])
    windows = eval_windows(tokenizer, load_text(run["data"]["dataset"], "test"), args.seqlen, args.eval_windows)
    path, source = gguf_and_source(args, original)
    models = {"mixbits in-memory": in_memory_model(source),
              "transformers (GGUF dequantized)": GGUF_TRANSFORMERS.load(path, args.seqlen),
              "llama.cpp": LlamaCppLM(path, n_ctx=args.seqlen, n_threads=args.threads)}
    del original
    results = evaluate_models(models, windows, device=torch.device("cpu"), reference="mixbits in-memory")
    models["llama.cpp"].close()
    print(f"`{path}`, {windows.shape[0]} x {windows.shape[1]} held-out `{run['data']['dataset']}` test tokens "
          f"(mixbits' token ids)\n\n| model | perplexity | KL to in-memory (nats/token) | top-1 |\n|---|---:|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r.ppl:.2f} | {r.kl:.2e} | {100 * r.top1:.1f} % |")
    return {name: r.to_dict() for name, r in results.items()}


if __name__ == "__main__":
    main()
