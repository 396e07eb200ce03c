"""Squared weight error of every ggml type on the embedded model's linears, relative to Q4_0.

    OMP_NUM_THREADS=1 python bench/ggml_error.py --model smollm2-135m --blocks 0,10,20,29 [--importance]
    OMP_NUM_THREADS=1 python bench/ggml_error.py --blocks 0,15,29 --importance --iq4nl-steps 1,2,3
    OMP_NUM_THREADS=1 python bench/ggml_error.py --blocks all --in-features 1536 --imatrix 16 \
        --types IQ4_XS,Q4_K,Q3_K,IQ4_NL --reference IQ4_NL [--student-t 4]
    OMP_NUM_THREADS=1 python bench/ggml_error.py --blocks all --in-features 1536 --imatrix 16 --iq4nl-polish 0,1,2,3,5

For each block linear of the blocks asked for and each ggml type its row length allows, the grid of
`quant.kquant` (`fake_quantize`; IQ4_NL's and IQ4_XS's through `quant.iq4nl`) and the error
sum_i a_i (w_i - w_hat_i)^2 summed over the layers, every type with the same a, which also chose its grid:
a = 1; with --importance a log-normal exp(2 z) per input, seed 0, standing in for an imatrix; with
--imatrix N the real one, diag(X^T X) of each layer's inputs over N calibration windows of wiki (512
tokens, seed 0, as `mixbits run` draws them). Printed per type: bits per weight, the error as a multiple
of the reference type's (Q4_0 unless --reference) on the same layers (types that need rows of 256 are
summed over the layers that have them, against the reference on those same layers), and the seconds the
grid search took. --in-features keeps the layers of one row length (1536: SmolLM2's down_proj, the only
rows of 256-blocks), --types the types measured. --student-t DF replaces each weight by Student-t(DF)
draws of its shape and per-row standard deviation (seed 0): the same layers and importance without the
published Q4_1 grid in the weights (see the caveat below). --iq4nl-steps instead times IQ4_NL's scale
search with its candidate ends moved every 1, 2, 3... level units (`quant.iq4nl.STEPS` is every 2): the
error and the seconds of each as a multiple of every unit's; --iq4nl-polish the same for the
least-squares rounds on the winning scale (`quant.iq4nl.POLISH`), for IQ4_NL and IQ4_XS. Caveat: the
embedded model's weights were stored as Q4_1 (model/load.py), so Q4_1, Q5_1 and the asymmetric K-quants
with sub-blocks of 32 (Q4_K, Q5_K) reproduce them almost exactly; the other types are not favoured by that grid.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mixbits.data.text import load_text  # noqa: E402
from mixbits.data.windows import calibration_windows  # noqa: E402
from mixbits.model.hooks import input_square_sums  # noqa: E402
from mixbits.model.load import load_model  # noqa: E402
from mixbits.model.arch import find_linears  # noqa: E402
from mixbits.quant import iq4nl, kquant  # noqa: E402
from mixbits.quant.spec import GGML_TYPES, GGMLSpec  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    a = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    a.add_argument("--model", default="smollm2-135m")
    a.add_argument("--blocks", default="0,10,20,29", help="comma-separated block indices, or all")
    a.add_argument("--importance", action="store_true")
    a.add_argument("--imatrix", type=int, default=0, help="calibration windows of the real diag(X^T X) (0: off)")
    a.add_argument("--in-features", type=int, help="only the layers whose rows have this many weights")
    a.add_argument("--types", help="comma-separated ggml types to measure (default: all)")
    a.add_argument("--reference", default="Q4_0", help="the type the errors are divided by")
    a.add_argument("--student-t", type=int, default=0, help="resample the weights as Student-t(DF) (0: off)")
    a.add_argument("--iq4nl-steps", help="comma-separated spacings of IQ4_NL's candidate ends, e.g. 1,2,3")
    a.add_argument("--iq4nl-polish", help="comma-separated least-squares rounds on the winning scale, e.g. 0,1,2,3")
    args = a.parse_args(argv)
    model, tokenizer = load_model(args.model, device="cpu")
    blocks = None if args.blocks == "all" else {int(b) for b in args.blocks.split(",")}
    layers = {n: model.get_submodule(n) for n, info in find_linears(model).items()
              if (blocks is None or info.block in blocks)
              and args.in_features in (None, model.get_submodule(n).weight.shape[1])}
    gen = torch.Generator().manual_seed(0)
    if args.iq4nl_steps:
        return _steps(args, layers, gen)
    imatrix = _imatrix(model, tokenizer, list(layers), args.imatrix) if args.imatrix else {}
    if args.iq4nl_polish:
        return _polish(args, argv, layers, imatrix, gen)
    types = [GGMLSpec.parse(t).name for t in args.types.split(",")] if args.types else list(GGML_TYPES)
    ref = GGMLSpec.parse(args.reference)
    errors: dict[str, float] = {}
    base: dict[str, float] = {}  # the reference's error on the layers each type covers
    seconds: dict[str, float] = {}
    for name, module in layers.items():
        w = module.weight.detach().float()
        if not ref.fits(w.shape[1]):
            continue
        w = _student_t(w, args.student_t, gen) if args.student_t else w
        imp = torch.exp(2 * torch.randn(w.shape[1], generator=gen)) if args.importance else imatrix.get(name)
        a_ = torch.ones(w.shape[1]) if imp is None else imp
        q40 = float((a_ * (w - kquant.fake_quantize(w, ref, imp)) ** 2).sum())
        for tname in types:
            spec = GGML_TYPES[tname]
            if not spec.fits(w.shape[1]):
                continue
            t = time.perf_counter()
            w_hat = kquant.fake_quantize(w, spec, imp)
            seconds[tname] = seconds.get(tname, 0.0) + time.perf_counter() - t
            errors[tname] = errors.get(tname, 0.0) + float((a_ * (w - w_hat) ** 2).sum())
            base[tname] = base.get(tname, 0.0) + q40
        print(f"{name} {tuple(w.shape)}", file=sys.stderr, flush=True)
    print(f"`python bench/ggml_error.py {' '.join(sys.argv[1:] if argv is None else argv)}` ({len(layers)} layers)\n")
    print(f"| type | bits per weight | error x {ref.name} | layers | seconds |")
    print("|---|---:|---:|---:|---:|")
    for tname in sorted(errors, key=lambda t: (GGML_TYPES[t].bits_per_weight, errors[t] / base[t])):
        count = sum(GGML_TYPES[tname].fits(m.weight.shape[1]) and ref.fits(m.weight.shape[1]) for m in layers.values())
        print(f"| {tname} | {GGML_TYPES[tname].bits_per_weight:g} | {errors[tname] / base[tname]:.3f} | {count} | "
              f"{seconds[tname]:.1f} |")


def _imatrix(model, tokenizer, names: list[str], windows: int) -> dict[str, torch.Tensor]:
    """diag(X^T X) [in] per named linear over `windows` calibration windows of wiki (512 tokens, seed 0)."""
    ids = calibration_windows(tokenizer, load_text("wiki", "calibration"), 512, windows, seed=0)
    return input_square_sums(model, names, ids)


def _student_t(w: torch.Tensor, df: int, gen: torch.Generator) -> torch.Tensor:
    """Student-t(df) draws of w's shape with w's per-row standard deviation (heavy tails, no stored grid)."""
    z = torch.randn(w.shape, generator=gen)
    v = torch.randn(*w.shape, df, generator=gen).square().sum(-1) / df  # chi2(df) / df
    t = z / v.sqrt()
    return t / t.std(dim=1, keepdim=True) * w.std(dim=1, keepdim=True)


def _steps(args, layers, gen) -> None:
    """IQ4_NL's error and time per spacing of its candidate ends (against spacing 1)."""
    weights = [m.weight.detach().float() for m in layers.values()]
    imps = [torch.exp(2 * torch.randn(w.shape[1], generator=gen)) if args.importance else None for w in weights]
    spec, rows = GGML_TYPES["IQ4_NL"], []
    for spacing in (int(x) for x in args.iq4nl_steps.split(",")):
        steps, error, seconds = tuple(range(-7, 8, spacing)), 0.0, 0.0
        for w, imp in zip(weights, imps):
            t = time.perf_counter()
            d = iq4nl.choose_scales(w, imp, spec.levels, spec.block, steps)
            seconds += time.perf_counter() - t
            ones = torch.ones_like(d, dtype=torch.int32)
            params = kquant.GGMLParams(spec, d, torch.zeros_like(d), ones, ones * 0)
            a_ = torch.ones(w.shape[1]) if imp is None else imp
            error += float((a_ * (w - kquant.dequantize(kquant.quantize(w, params), params)) ** 2).sum())
        rows.append((spacing, 2 * len(steps), error, seconds))
    print(f"`python bench/ggml_error.py --model {args.model} --blocks {args.blocks}"
          f"{' --importance' if args.importance else ''} --iq4nl-steps {args.iq4nl_steps}` ({len(layers)} layers)\n")
    print("| spacing | candidates | error x spacing 1 | seconds x spacing 1 |")
    print("|---:|---:|---:|---:|")
    for spacing, count, error, seconds in rows:
        print(f"| {spacing} | {count} | {error / rows[0][2]:.6f} | {seconds / rows[0][3]:.2f} |")


def _polish(args, argv, layers, imatrix, gen) -> None:
    """IQ4_NL's and IQ4_XS's error and time per number of least-squares rounds on the winning scale
    (`quant.iq4nl.POLISH`), each against its own at the first number given."""
    rows = []
    weights = {n: m.weight.detach().float() for n, m in layers.items()}
    weights = {n: _student_t(w, args.student_t, gen) if args.student_t else w for n, w in weights.items()}
    imps = {n: torch.exp(2 * torch.randn(w.shape[1], generator=gen)) if args.importance else imatrix.get(n)
            for n, w in weights.items()}
    saved = iq4nl.POLISH
    try:
        for rounds in (int(x) for x in args.iq4nl_polish.split(",")):
            iq4nl.POLISH = rounds
            for spec in (GGML_TYPES["IQ4_NL"], GGML_TYPES["IQ4_XS"]):
                error, seconds = 0.0, 0.0
                for n, w in ((n, w) for n, w in weights.items() if spec.fits(w.shape[1])):
                    a_ = torch.ones(w.shape[1]) if imps[n] is None else imps[n]
                    t = time.perf_counter()
                    w_hat = kquant.fake_quantize(w, spec, imps[n])
                    seconds += time.perf_counter() - t
                    error += float((a_ * (w - w_hat) ** 2).sum())
                rows.append((rounds, spec.name, error, seconds))
    finally:
        iq4nl.POLISH = saved
    first = {name: (e, t) for _, name, e, t in reversed(rows)}
    print(f"`python bench/ggml_error.py {' '.join(sys.argv[1:] if argv is None else argv)}` ({len(layers)} layers)\n")
    print("| rounds | type | error x its first | seconds x its first |")
    print("|---:|---|---:|---:|")
    for rounds, name, error, seconds in rows:
        print(f"| {rounds} | {name} | {error / first[name][0]:.4f} | {seconds / first[name][1]:.2f} |")


if __name__ == "__main__":
    main()
