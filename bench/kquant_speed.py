"""Seconds per ggml type of `kquant.choose_params` against the loop it replaced, measured in the same run.

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python bench/kquant_speed.py [--rows 576 --cols 1536] [--importance]
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python bench/kquant_speed.py --peak --rows 2048 --cols 4096 --types Q4_K

One float32 weight torch.randn(rows, cols) (generator seed 0; --importance adds a log-normal
importance exp(2 z) per input, as `choose_params` gets from an imatrix). For every type the slow
reference (tests/quant/kquant_reference.py, the search before it was batched over candidates) and
mixbits' search are each run --repeats times, alternating, and the fastest of each is kept, so load
from other processes on the machine hits both alike. `same` says whether the two grids are equal
bit for bit (d, dmin as bit patterns, sc, mn). The grid is what costs: `fake_quantize` adds one
nearest-code pass and one dequantize (a few ms). --peak instead runs each search once in its own
process and prints the growth of its peak resident memory over the loaded weight.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mixbits.quant import kquant  # noqa: E402
from mixbits.quant.spec import GGML_TYPES  # noqa: E402
from tests.quant import kquant_reference as reference  # noqa: E402


def _timed(fn) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def _peak_mib(search: str, spec, w, imp) -> float:
    """Run in a child process: peak RSS growth (MiB) of one search beyond the loaded weight."""
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    (reference if search == "reference" else kquant).choose_params(w, spec, imp)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024


def _same(p, q) -> bool:
    bits = (lambda t: t.view(torch.int32) if t.dtype == torch.float32 else t)
    return all(torch.equal(bits(getattr(p, f)), bits(getattr(q, f))) for f in ("d", "dmin", "sc", "mn"))


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--rows", type=int, default=576)
    args.add_argument("--cols", type=int, default=1536)
    args.add_argument("--types", default=",".join(n for n, s in GGML_TYPES.items() if not s.levels),
                      help="comma-separated ggml type names (uniform grids: the reference loop has no IQ4_NL)")
    args.add_argument("--importance", action="store_true")
    args.add_argument("--repeats", type=int, default=2)
    args.add_argument("--peak", action="store_true", help="peak memory of each search instead of time")
    args.add_argument("--child", choices=["reference", "mixbits"], help=argparse.SUPPRESS)
    a = args.parse_args()
    g = torch.Generator().manual_seed(0)
    w = torch.randn(a.rows, a.cols, generator=g)
    imp = torch.exp(2 * torch.randn(a.cols, generator=g)) if a.importance else None
    if a.child:
        print(_peak_mib(a.child, GGML_TYPES[a.types.upper()], w, imp))
        return
    if a.peak:
        print(f"weight {a.rows}x{a.cols} float32: peak resident memory of one search above the loaded weight\n")
        print("| type | reference MiB | mixbits MiB |")
        print("|---|---:|---:|")
        for name in a.types.split(","):
            child = [sys.executable, __file__, "--rows", str(a.rows), "--cols", str(a.cols), "--types", name.strip()]
            child += ["--importance"] if a.importance else []
            mib = [float(subprocess.run(child + ["--child", c], check=True, capture_output=True, text=True).stdout)
                   for c in ("reference", "mixbits")]
            print(f"| {name.strip().upper()} | {mib[0]:.0f} | {mib[1]:.0f} |", flush=True)
        return
    print(f"weight {a.rows}x{a.cols} float32, importance {'exp(2z)' if a.importance else 'none'}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), best of {a.repeats}\n")
    print("| type | reference s | mixbits s | speed-up | same |")
    print("|---|---:|---:|---:|---|")
    for name in a.types.split(","):
        spec = GGML_TYPES[name.strip().upper()]
        t_ref, t_new, p_ref, p_new = float("inf"), float("inf"), None, None
        for _ in range(a.repeats):  # alternate, so a burst of load elsewhere hits both
            t, p_ref = _timed(lambda: reference.choose_params(w, spec, imp))
            t_ref = min(t_ref, t)
            t, p_new = _timed(lambda: kquant.choose_params(w, spec, imp))
            t_new = min(t_new, t)
        print(f"| {spec.name} | {t_ref:.3f} | {t_new:.3f} | {t_ref / t_new:.1f}x | {_same(p_ref, p_new)} |",
              flush=True)


if __name__ == "__main__":
    main()
