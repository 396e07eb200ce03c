"""Seconds per ggml type of `kquant.choose_params` against the loop it replaced, measured in the same run.

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python bench/kquant_speed.py [--rows 576 --cols 1536] [--importance]

One float32 weight torch.randn(rows, cols) (generator seed 0; --importance adds a log-normal
importance exp(2 z) per input, as `choose_params` gets from an imatrix). For every type the slow
reference (tests/quant/kquant_reference.py, the search before it was batched over candidates) and
mixbits' search are each run --repeats times, alternating, and the fastest of each is kept, so load
from other processes on the machine hits both alike. `same` says whether the two grids are equal
bit for bit (d, dmin as bit patterns, sc, mn). The grid is what costs: `fake_quantize` adds one
nearest-code pass and one dequantize (a few ms).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mixbits.quant import kquant  # noqa: E402
from mixbits.quant.spec import GGML_TYPES  # noqa: E402
from tests.quant import kquant_reference as reference  # noqa: E402


def _best(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def _same(p, q) -> bool:
    bits = (lambda t: t.view(torch.int32) if t.dtype == torch.float32 else t)
    return all(torch.equal(bits(getattr(p, f)), bits(getattr(q, f))) for f in ("d", "dmin", "sc", "mn"))


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--rows", type=int, default=576)
    args.add_argument("--cols", type=int, default=1536)
    args.add_argument("--types", default=",".join(GGML_TYPES), help="comma-separated ggml type names")
    args.add_argument("--importance", action="store_true")
    args.add_argument("--repeats", type=int, default=2)
    a = args.parse_args()
    g = torch.Generator().manual_seed(0)
    w = torch.randn(a.rows, a.cols, generator=g)
    imp = torch.exp(2 * torch.randn(a.cols, generator=g)) if a.importance else None
    print(f"weight {a.rows}x{a.cols} float32, importance {'exp(2z)' if a.importance else 'none'}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), best of {a.repeats}\n")
    print("| type | reference s | mixbits s | speed-up | same |")
    print("|---|---:|---:|---:|---|")
    for name in a.types.split(","):
        spec = GGML_TYPES[name.strip().upper()]
        t_ref, t_new, p_ref, p_new = float("inf"), float("inf"), None, None
        for _ in range(a.repeats):  # alternate, so a burst of load elsewhere hits both
            t, p_ref = _best(lambda: reference.choose_params(w, spec, imp), 1)
            t_ref = min(t_ref, t)
            t, p_new = _best(lambda: kquant.choose_params(w, spec, imp), 1)
            t_new = min(t_new, t)
        print(f"| {spec.name} | {t_ref:.3f} | {t_new:.3f} | {t_ref / t_new:.1f}x | {_same(p_ref, p_new)} |",
              flush=True)


if __name__ == "__main__":
    main()
