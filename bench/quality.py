"""Quality at equal size: mixbits against the tools users would pick instead.

    python bench/quality.py --model smollm2-135m --budgets 2.5:4.5:0.5 --eval-windows 8 --seqlen 512 --out runs/quality
    python bench/quality.py --quick --out /tmp/quality-quick      # tiny random Llama: a smoke run in seconds

What is measured: held-out perplexity, KL(original || row) and top-1 agreement on the first
`--eval-windows` windows of `--seqlen` tokens of two test texts (`--dataset`, which is also the
calibration text, and `--second-domain`), the same token ids for every row, against the bytes
of the quantized block linears (the layers mixbits quantizes; embeddings and head stay 16 bit in
every row). Rows, one arm each (see quality_mixbits.py, quality_llamacpp.py, quality_peers.py):

  uniform-rtn          every bits/group pair of mixbits' candidates, round-to-nearest
  optimal-rtn / -clip / -gptq   mixbits' optimal plan at each budget with that quantizer
  optimal-gptq-rtn-damage       the optimal-rtn plan quantized with GPTQ (`--damage rtn`)
  heuristics           the seeds' allocation strategies at each budget (round-to-nearest)
  blockap[-gptq]       optimal plans from RTN [GPTQ] trained with Block-AP, then E2E-QP (--train-budgets)
  llamacpp[-imatrix]   llama-quantize of the same original weights, K-quant types, without / with
                       an importance matrix from the same calibration windows; run in llama.cpp
  mixbits-gguf         mixbits' plan over the GGUF types at the whole file bytes of each llamacpp-imatrix
                       preset, written by mixbits and run in llama.cpp (opt-in; quality_gguf.py)
  gptqmodel            GPTQModel 2/3/4-bit g128 on the same calibration windows
  torchao              torchao int-N weight-only configs
  optimal-matched      mixbits' optimal plan at exactly each other row's size (after the others)
  optimal-matched-g32  the same with group size 32 among the candidates, beside calibrated peers
                       (opt-in with --arms: its GPTQ gain table over 18 configs is the slowest step)

Every row is written to OUT/quality.json as soon as it is measured; a rerun skips finished rows.
OUT/quality.md (one table per domain, sorted by bytes, each peer row marked "mixbits ahead" or
"peer ahead" against the best mixbits optimal row at no more bytes) and OUT/quality.png are
rewritten at the end, and `--report-only` rewrites them from the JSON alone.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import platform
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import quality_gguf  # noqa: E402
import quality_llamacpp  # noqa: E402
from _measure import _cpu_model, _version  # noqa: E402
import quality_mixbits as mixbits_arms  # noqa: E402
import quality_peers  # noqa: E402
import quality_report  # noqa: E402
from quality_rows import Store, measure  # noqa: E402
from mixbits.config import AllocationConfig, DataConfig, RunConfig  # noqa: E402
from mixbits.data.text import load_text  # noqa: E402
from mixbits.data.windows import eval_windows, text_fingerprint  # noqa: E402
from mixbits.pipeline import Prepared, calibrate, prepare  # noqa: E402
from mixbits.parsing import parse_range  # noqa: E402
from mixbits.timing import StageTimer  # noqa: E402

log = logging.getLogger("quality")

ARMS = ("uniform-rtn", "optimal-rtn", "optimal-clip", "optimal-gptq", "optimal-gptq-rtn-damage", "heuristics", "blockap",
        "llamacpp",
        "llamacpp-imatrix", "mixbits-gguf", "gptqmodel", "torchao", "optimal-matched", "optimal-matched-g32")
OPT_IN = ("optimal-clip", "optimal-matched-g32", "mixbits-gguf")  # see bench/README.md
DEFAULT_ARMS = tuple(a for a in ARMS if a not in OPT_IN)
MATCHED = ("uniform-rtn", "heuristics", "llamacpp", "llamacpp-imatrix", "gptqmodel", "torchao")


def to_match(rows: dict) -> list[dict]:
    """Rows that get a mixbits optimal plan of their own size: every measured row of another tool,
    uniform config or fixed-tier heuristic (budgeted heuristics sit at a budget optimal already has)."""
    return [r for r in rows.values() if r["arm"] in MATCHED and r["status"] == "ok" and "@" not in r["label"]]
VERSIONED = ("torch", "transformers", "mixbits", "gguf", "llama-cpp-python", "gptqmodel", "torchao")


@dataclass
class Bench:
    """What every arm reads: the run config, the loaded original, the windows, where files go."""

    args: argparse.Namespace
    cfg: RunConfig
    p: Prepared
    calib: torch.Tensor
    data_info: dict
    windows: dict[str, torch.Tensor]
    out: Path
    notes: dict = field(default_factory=dict)
    memo: dict = field(default_factory=dict)  # what several rows share within this run (the GGUF damage table)

    @property
    def n_weights(self) -> int:
        return sum(o * i for o, i in self.p.shapes.values())

    @property
    def windows_seqlen(self) -> int:
        return self.args.seqlen


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    a = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    a.add_argument("--model", default="smollm2-135m")
    a.add_argument("--dataset", default="wiki", help="calibration text and first held-out domain")
    a.add_argument("--second-domain", default="canterbury", help="second held-out text")
    a.add_argument("--budgets", type=parse_range, default=parse_range("2.5:4.5:0.5"), help="bpw, e.g. 2.5:4.5:0.5")
    a.add_argument("--gptq-budgets", type=parse_range, default=parse_range("3,3.5,4"))
    a.add_argument("--train-budgets", type=parse_range, default=parse_range("3,3.5,4"))
    a.add_argument("--arms", default=",".join(DEFAULT_ARMS), help="comma-separated subset of " + ", ".join(ARMS))
    a.add_argument("--eval-windows", type=int, default=8)
    a.add_argument("--seqlen", type=int, default=512)
    a.add_argument("--calib-windows", type=int, default=16)
    a.add_argument("--llamacpp-types", default=",".join(quality_llamacpp.TYPES))
    a.add_argument("--gguf-quantizer", default="clip", choices=tuple(quality_gguf.QUANTIZERS),
                   help="mixbits-gguf: quantizer of the plans on the ggml grids (clip: importance-weighted grid)")
    a.add_argument("--gguf-damage-rows", type=int, default=64,
                   help="mixbits-gguf: strided rows per layer the Fisher damage of each ggml type is estimated on")
    a.add_argument("--no-build-llamacpp", dest="build_llamacpp", action="store_false",
                   help="do not build llama.cpp's tools when missing (those rows then say why they did not run)")
    a.add_argument("--match-quantizers", default="rtn,gptq",
                   help="mixbits quantizers of optimal-matched: for data-free peers, for calibrated peers")
    a.add_argument("--train-windows", type=int, default=16)
    a.add_argument("--train-val-windows", type=int, default=8)
    a.add_argument("--train-seqlen", type=int, default=256)
    a.add_argument("--train-epochs", type=float, default=2.0)
    a.add_argument("--train-quant-lr", type=float, default=None,
                   help="Block-AP lr of the scales and zero-points / ggml sub-block scales and mins (default: EfficientQAT's 1e-4)")
    a.add_argument("--train-inits", default="rtn,gptq",
                   help="Block-AP starts: comma-separated quantizers among rtn, clip, gptq (one blockap arm each)")
    a.add_argument("--models-per-pass", type=int, default=3)
    a.add_argument("--device", default="cpu")
    a.add_argument("--out", type=Path, default=Path("runs/quality"))
    a.add_argument("--quick", action="store_true", help="tiny random Llama and tiny texts: a smoke run")
    a.add_argument("--report-only", action="store_true", help="rewrite quality.md / .png from quality.json")
    args = a.parse_args(argv)
    args.arms = tuple(x.strip() for x in args.arms.split(",") if x.strip())
    unknown = [x for x in args.arms if x not in ARMS]
    if unknown:
        a.error(f"unknown arms {unknown}; choose from {', '.join(ARMS)}")
    args.match_quantizers = tuple(args.match_quantizers.split(","))
    if len(args.match_quantizers) != 2 or not set(args.match_quantizers) <= {"rtn", "clip", "gptq"}:
        a.error(f"--match-quantizers {args.match_quantizers} must be two of rtn, clip, gptq, e.g. rtn,gptq")
    args.train_inits = tuple(x.strip() for x in args.train_inits.split(",") if x.strip())
    if not args.train_inits or not set(args.train_inits) <= {"rtn", "clip", "gptq"}:
        a.error(f"--train-inits {args.train_inits} must name some of rtn, clip, gptq")
    args.llamacpp_types = tuple(t.strip() for t in args.llamacpp_types.split(",") if t.strip())
    return args


def apply_quick(args: argparse.Namespace) -> None:
    from quality_quick import quick_data

    args.model, args.dataset, args.second_domain = quick_data(args.out / "quick-data")
    args.seqlen, args.eval_windows, args.calib_windows = 64, 2, 4
    args.budgets, args.gptq_budgets, args.train_budgets = (2.5, 3.5, 4.5), (3.5,), (3.5,)
    args.train_windows, args.train_val_windows, args.train_seqlen, args.train_epochs = 4, 2, 32, 1.0
    args.llamacpp_types = ("Q4_K_M",)


def _domain(name: str) -> str:
    return Path(name).stem if name.endswith((".txt", ".jsonl")) else name


def setup(args: argparse.Namespace) -> Bench:
    cfg = RunConfig(model=args.model, output_dir=args.out, device=args.device, quantizer="rtn", progress=False,
                    report=False, data=DataConfig(dataset=args.dataset, seqlen=args.seqlen,
                                                  calib_windows=args.calib_windows, eval_windows=args.eval_windows),
                    allocation=AllocationConfig(target_bpw=max(args.budgets)))
    p = prepare(cfg, StageTimer())
    calib, test, info = calibrate(cfg, p, StageTimer())
    second = eval_windows(p.tokenizer, load_text(args.second_domain, "test"), args.seqlen, args.eval_windows)
    windows = {_domain(args.dataset): test, _domain(args.second_domain): second}
    return Bench(args, cfg, p, calib, info, windows, args.out)


def machine() -> str:
    cpu = _cpu_model()
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu}, {platform.os.cpu_count()} cores, {torch.get_num_threads()} torch threads{gpu}"


def meta(bench: Bench, argv: list[str] | None) -> dict:
    w = bench.data_info["calibration"]
    return {
        "format": "mixbits.quality/1", "model": bench.args.model, "date": datetime.date.today().isoformat(),
        "machine": machine(), "python": platform.python_version(),
        "versions": {k: _version(k) for k in VERSIONED},
        "command": shlex.join(["python", "bench/quality.py", *(sys.argv[1:] if argv is None else argv)]),
        "calibration": f"{w['windows']} x {w['seqlen']} `{_domain(bench.args.dataset)}` calibration windows (seed {w['seed']})",
        "windows": {d: {"windows": int(t.shape[0]), "seqlen": int(t.shape[1]), "sha256": text_fingerprint(t)}
                    for d, t in bench.windows.items()},
        "notes": bench.notes,
    }


def interleave(a: list, b: list) -> list:
    out = [x for pair in zip(a, b) for x in pair]
    return out + a[len(b):] + b[len(a):]


def rows_for(bench: Bench) -> list:
    arms, args, seen = bench.args.arms, bench.args, {}
    rows = []
    if "uniform-rtn" in arms:
        rows += mixbits_arms.uniform_rows(bench, seen)
    for q, budgets in (("rtn", args.budgets), ("clip", args.budgets), ("gptq", args.gptq_budgets)):
        if f"optimal-{q}" in arms:
            rows += mixbits_arms.optimal_rows(bench, q, budgets)
    if "optimal-gptq-rtn-damage" in arms:
        rows += mixbits_arms.optimal_rows(bench, "gptq", args.gptq_budgets, rtn_damage=True)
    if "heuristics" in arms:
        rows += mixbits_arms.heuristic_rows(bench, seen)
    if {"llamacpp", "llamacpp-imatrix", "mixbits-gguf"} & set(arms):
        rows.append(quality_llamacpp.reference_row(bench))
    if "llamacpp" in arms:
        rows += quality_llamacpp.rows(bench, False)
    presets = quality_llamacpp.rows(bench, True) if "llamacpp-imatrix" in arms else []
    files = quality_gguf.rows(bench) if "mixbits-gguf" in arms else []
    rows += interleave(presets, files)  # each preset beside mixbits' file of its size: a stopped run leaves pairs
    if "torchao" in arms:
        rows += quality_peers.torchao_rows(bench)
    if "gptqmodel" in arms:
        rows += quality_peers.gptqmodel_rows(bench)
    if "blockap" in arms:
        rows += mixbits_arms.blockap_rows(bench)
    return rows


def report(out: Path, data: dict) -> str:
    text = quality_report.markdown(data)
    (out / "quality.md").write_text(text)
    quality_report.plot(data, out / "quality.png")
    return text


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        import json

        data = json.loads((args.out / "quality.json").read_text())
        print(report(args.out, data))
        return data
    if args.quick:
        apply_quick(args)
    bench = setup(args)
    rows = rows_for(bench)
    store = Store(args.out / "quality.json", meta(bench, argv))
    measure(rows, store, bench.p.model, bench.windows, bench.n_weights, bench.p.device, args.models_per_pass)
    if "optimal-matched" in args.arms:
        measure(mixbits_arms.matched_rows(bench, to_match(store.data["rows"])), store, bench.p.model, bench.windows,
                bench.n_weights, bench.p.device, args.models_per_pass)
    if "optimal-matched-g32" in args.arms:
        rows = mixbits_arms.matched_rows(bench, to_match(store.data["rows"]), group_sizes=(32, 64, 128),
                                         calibrated_only=True)
        measure(rows, store, bench.p.model, bench.windows, bench.n_weights, bench.p.device, args.models_per_pass)
    store.data["meta"]["notes"] = bench.notes
    store.save()
    print(report(args.out, store.data))
    return store.data


if __name__ == "__main__":
    main()
