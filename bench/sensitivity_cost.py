"""What the gradient-based damage tables cost, in forward+backward passes over the calibration tokens.

    python bench/sensitivity_cost.py [--model smollm2-135m] [--calib-windows 16] [--seqlen 512]

Times, in one process and one after the other: one forward+backward pass (weight gradients of every
block linear) over all calibration windows; `fisher_table` (its pass + the damage of every linear
at every candidate config); `gradient_fisher_tables` (one pass, both tables); then the
forward+backward pass again, so drift of the machine shows. Ratios divide by the mean of the two
reference passes. The target (issue 3): all units x all configs for at most 2x one pass.
Run it alone on the machine; every figure is printed as measured.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from mixbits.config import candidate_configs, resolve_device, DEFAULT_BITS, DEFAULT_GROUPS
from mixbits.data.text import load_text
from mixbits.data.windows import calibration_windows
from mixbits.io import atomic_write_json
from mixbits.model.arch import find_linears
from mixbits.model.load import load_model, resolve_model_source
from mixbits.jobs.analyze import time_fwd_bwd
from mixbits.sensitivity.fisher import fisher_table
from mixbits.sensitivity.gradient import gradient_fisher_tables


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    a = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    a.add_argument("--model", default="smollm2-135m")
    a.add_argument("--calib-windows", type=int, default=16)
    a.add_argument("--seqlen", type=int, default=512)
    a.add_argument("--device", default="auto")
    a.add_argument("--output", type=Path, default=Path("runs/sensitivity-cost.json"))
    args = a.parse_args(argv)
    device = resolve_device(args.device)
    model, tokenizer = load_model(resolve_model_source(args.model), device=device)
    linears = find_linears(model)
    configs = candidate_configs(DEFAULT_BITS, DEFAULT_GROUPS)
    calib = calibration_windows(tokenizer, load_text("wiki", "calibration"), args.seqlen, args.calib_windows, 0)
    kw = dict(device=device, progress=False)
    first = time_fwd_bwd(model, calib, linears, device=device, sample=len(calib))
    rows = {
        "fisher_table": timed(lambda: fisher_table(model, calib, linears, configs, **kw)),
        "gradient_fisher_tables (both, one pass)": timed(lambda: gradient_fisher_tables(model, calib, linears,
                                                                                       configs, **kw)),
    }
    second = time_fwd_bwd(model, calib, linears, device=device, sample=len(calib))
    reference = (first + second) / 2
    result = {"model": args.model, "device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "calibration": {"windows": len(calib), "seqlen": calib.shape[1]}, "linears": len(linears),
              "configs": [c.label for c in configs], "fwd_bwd_s": [first, second],
              "rows": {k: {"seconds": v, "ratio": v / reference} for k, v in rows.items()}}
    atomic_write_json(args.output, result)
    print(f"`{args.model}`, {len(linears)} linears x {len(configs) - 1} configs, {len(calib)} x {calib.shape[1]} "
          f"calibration tokens, {device}, {torch.get_num_threads()} threads\n")
    print("| computation | seconds | × one fwd+bwd pass |\n|---|---:|---:|")
    print(f"| one forward+backward pass (before / after) | {first:.1f} / {second:.1f} | 1.00 |")
    for k, v in result["rows"].items():
        print(f"| {k} | {v['seconds']:.1f} | {v['ratio']:.2f} |")
    print("\n" + json.dumps({k: round(v["ratio"], 3) for k, v in result["rows"].items()}))
    return result


if __name__ == "__main__":
    main()
