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

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python bench/kquant_speed.py --model smollm2-135m [--blocks 0,15,29]

    python bench/kquant_speed.py --threads 2 --omp --types Q4_K,Q4_0,Q6_K

--omp instead times mixbits' search two ways at --threads torch threads, alternating: as it runs (row
chunks on one intra-op thread each, spread over the threads: `quant.workers`), and as it ran before
(the chunks one after the other, each op on torch's OpenMP pool of --threads), with a bit-for-bit check.

--model instead weighs cheaper searches against the full one on a real model's linears (those of
--blocks), uniform and with importance diag(H) (H = X^T X of --gram-windows x 256 tokens of wiki's
calibration split, seed 0): for each ggml type, the weighted error sum a (w - w_hat)^2 / sum a w^2
over those linears and the seconds of `kquant.fake_quantize`, for the full search and each variant
in VARIANTS (fewer clip fractions, fewer least-squares rounds). The variants are not options of the
library: the bench patches kquant's module constants for the duration of each.
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


# step 1's candidates and rounds (kquant._CLIPS, _STEPS, _ROUNDS); asymmetric types use the first 4 clips at either end
VARIANTS = {
    "full": ((0.0, 0.1, 0.2, 0.3, 0.4), (-0.5, 0.0, 0.5), 2),
    "clips <= 0.3": ((0.0, 0.1, 0.2, 0.3), (-0.5, 0.0, 0.5), 2),
    "clips <= 0.2": ((0.0, 0.1, 0.2), (-0.5, 0.0, 0.5), 2),
    "1 round": ((0.0, 0.1, 0.2, 0.3, 0.4), (-0.5, 0.0, 0.5), 1),
}


def _real_cases(model_name: str, blocks: list[int], windows: int) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """(weight, None) and (weight, diag H) of every linear of `blocks` of the model."""
    from mixbits.data.text import load_text
    from mixbits.data.windows import calibration_windows
    from mixbits.model.arch import find_linears, get_weight
    from mixbits.model.load import load_model, resolve_model_source
    from mixbits.sensitivity.capture import collect_gram

    model, tokenizer = load_model(resolve_model_source(model_name), device="cpu")
    linears = {n: i for n, i in find_linears(model).items() if i.block in blocks}
    calib = calibration_windows(tokenizer, load_text("wiki", "calibration"), 256, windows, 0)
    grams, _ = collect_gram(model, calib, linears, device=torch.device("cpu"), progress=False)
    weights = [(get_weight(model.get_submodule(n)).detach().float(), torch.diagonal(grams[n]).clamp(min=0))
               for n in linears]
    return [(w, None) for w, _ in weights] + [(w, a) for w, a in weights]


def _variant_errors(spec, cases, variant) -> tuple[float, float]:
    """(sum a (w - w_hat)^2 / sum a w^2 over the cases, seconds of fake_quantize) with `variant`'s search."""
    saved = kquant._CLIPS, kquant._STEPS, kquant._ROUNDS
    kquant._CLIPS, kquant._STEPS, kquant._ROUNDS = variant
    try:
        err = ref = seconds = 0.0
        for w, imp in cases:
            t, q = _timed(lambda: kquant.fake_quantize(w, spec, imp))
            a = torch.ones(w.shape[1]) if imp is None else imp
            err, ref, seconds = err + float((a * (w - q) ** 2).sum()), ref + float((a * w * w).sum()), seconds + t
        return err / ref, seconds
    finally:
        kquant._CLIPS, kquant._STEPS, kquant._ROUNDS = saved


def model_table(model_name: str, blocks: list[int], windows: int, types: list[str]) -> None:
    cases = _real_cases(model_name, blocks, windows)
    names = list(VARIANTS)[1:]
    print(f"{model_name}, linears of blocks {blocks}, {torch.get_num_threads()} thread(s); error: sum a (w - w_hat)^2 "
          f"/ sum a w^2; change against the full search, seconds of fake_quantize over those linears\n")
    print("| importance | type | full: error | s | " + " | ".join(f"{v}: change | s" for v in names) + " |")
    print("|---|---|---:|---:|" + "---:|---:|" * len(names))
    for kind in ("uniform", "diag(H)"):
        for name in types:
            spec = GGML_TYPES[name.strip().upper()]
            mine = [(w, a) for w, a in cases if (a is None) == (kind == "uniform") and spec.fits(w.shape[1])]
            if not mine:
                continue
            full, t_full = _variant_errors(spec, mine, VARIANTS["full"])
            cells = []
            for v in names:
                e, t = _variant_errors(spec, mine, VARIANTS[v])
                cells.append(f"{100 * (e / full - 1):+.3f} % | {t:.2f}" if full > 0 else f"{e:.1e} (full 0) | {t:.2f}")
            print(f"| {kind} | {spec.name} | {full:.4e} | {t_full:.2f} | " + " | ".join(cells) + " |", flush=True)


def omp_table(w, imp, types: list[str], repeats: int) -> None:
    """Seconds of choose_params with the chunks spread over threads (now) and on torch's OpenMP pool (before)."""
    from mixbits.quant import iq4nl, workers

    def on_omp(fn, pieces, device):  # what kquant did before quant.workers: ops on torch's intra-op threads
        return [fn(p) for p in pieces]

    print(f"weight {tuple(w.shape)}, {torch.get_num_threads()} torch thread(s), best of {repeats}\n")
    print("| type | chunks on threads s | ops on OpenMP s | ratio | same |")
    print("|---|---:|---:|---:|---|")
    for name in types:
        spec = GGML_TYPES[name.strip().upper()]
        t_now, t_omp = float("inf"), float("inf")
        for _ in range(repeats):
            t, p_now = _timed(lambda: kquant.choose_params(w, spec, imp))
            t_now = min(t_now, t)
            kquant.map_pieces = iq4nl.map_pieces = on_omp
            try:
                t, p_omp = _timed(lambda: kquant.choose_params(w, spec, imp))
            finally:
                kquant.map_pieces = iq4nl.map_pieces = workers.map_pieces
            t_omp = min(t_omp, t)
        print(f"| {spec.name} | {t_now:.3f} | {t_omp:.3f} | {t_omp / t_now:.1f}x | {_same(p_now, p_omp)} |", flush=True)


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
    args.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    args.add_argument("--omp", action="store_true", help="chunks on threads against ops on OpenMP (docstring)")
    args.add_argument("--model", help="weigh cheaper searches on this model's linears instead (docstring)")
    args.add_argument("--blocks", default="0,15,29", help="with --model: the blocks whose linears are measured")
    args.add_argument("--gram-windows", type=int, default=4, help="with --model: calibration windows of 256 tokens")
    a = args.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.model:
        types = [t for t in a.types.split(",") if not GGML_TYPES[t.strip().upper()].levels]
        model_table(a.model, [int(b) for b in a.blocks.split(",")], a.gram_windows, types)
        return
    g = torch.Generator().manual_seed(0)
    w = torch.randn(a.rows, a.cols, generator=g)
    imp = torch.exp(2 * torch.randn(a.cols, generator=g)) if a.importance else None
    if a.omp:
        omp_table(w, imp, a.types.split(","), a.repeats)
        return
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
