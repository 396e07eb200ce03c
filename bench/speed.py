"""Wall time and peak resident memory of every mixbits stage, as multiples of one forward+backward pass.

    python bench/speed.py --model smollm2-135m --calib-windows 8 --seqlen 512 --out runs/speed
    python bench/speed.py --quick --out runs/speed-quick        # tiny random model, seconds

Stages, in this order, on one model and one set of calibration windows, each through the
library's entry point: load (`load_model`), forward, forward+backward, every sensitivity method
of `sensitivity.methods` at layer granularity (measured ones, divergence and ablation, at one
config per layer) and the top Hessian eigenvalue of a few linears, allocation (exact solver on
the Fisher table at `--target-bpw`), quantization with rtn, clip and gptq, Block-AP (whole, and
per block), E2E-QP, evaluation (original + RTN model on held-out windows), and export in every
format. Quantizers, training and export use one uniform 4-bit plan that every format stores.

Every time is divided by one forward+backward pass over the same calibration tokens, measured
in the same process just before and just after the stage's group (`_speed_stages.Runner`), so
the ratios hold on a busy machine where seconds do not. Peak RSS per stage: see `_measure.py` (clear_refs).
Scaling: a subset of stages (`--scale-stages`) at several calibration sizes (`--scale-windows`)
and on random Llamas of several widths (`--widths`, same depth and tokens), each with its own
unit; the log-log slope of seconds is the growth exponent.
Writes OUT/speed.json, OUT/speed.md and OUT/speed.png, and prints the markdown.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the bench/ helpers, run as a script or by path

from _measure import loglog_slope, machine_info, measure  # noqa: E402
from _speed_report import markdown, plot  # noqa: E402
from _speed_stages import REFERENCE, SCALING_DEFAULT, Options, Runner, method_names, stage_names  # noqa: E402
from _speed_subjects import (  # noqa: E402
    make_subject, random_llama, random_windows, save_random_llama, text_windows, RANDOM_VOCAB,
)
from mixbits.config import resolve_device  # noqa: E402
from mixbits.io import atomic_write_json  # noqa: E402
from mixbits.model.load import load_model, resolve_model_source  # noqa: E402
from mixbits.config import TrainConfig  # noqa: E402

log = logging.getLogger("speed")

QUICK = dict(hidden=64, layers=2, calib_windows=2, seqlen=32, widths="64,128", scale_windows="1,2", repeats=1,
             eig_units=2, epochs=0.5)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _names(text: str | None) -> list[str]:
    return [x.strip() for x in (text or "").split(",") if x.strip()]


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    a = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    a.add_argument("--model", default="smollm2-135m")
    a.add_argument("--dataset", default="wiki")
    a.add_argument("--calib-windows", type=int, default=8)
    a.add_argument("--eval-windows", type=int, default=None, help="held-out windows (default: --calib-windows)")
    a.add_argument("--seqlen", type=int, default=512)
    a.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
    a.add_argument("--out", type=Path, default=Path("runs/speed"))
    a.add_argument("--quick", action="store_true", help="tiny random model, few windows: a smoke run in seconds")
    a.add_argument("--methods", default=",".join(method_names()), help=f"of {','.join(method_names())}")
    a.add_argument("--skip-stages", default="", help="stage names or prefixes, e.g. export,block_ap,quantize.gptq")
    a.add_argument("--repeats", type=int, default=3, help="runs of the unit and of every stage shorter than it")
    a.add_argument("--target-bpw", type=float, default=3.25)
    a.add_argument("--measure-config", default="w3g128", help="the config measured methods run per layer")
    a.add_argument("--eig-units", type=int, default=4, help="linears whose top Hessian eigenvalue is timed")
    a.add_argument("--epochs", type=float, default=1.0, help="Block-AP epochs")
    a.add_argument("--e2e-epochs", type=float, default=1.0)
    a.add_argument("--scale-windows", default=None, help="calibration sizes (default: n/4, n/2, n)")
    a.add_argument("--scale-stages", default=",".join(SCALING_DEFAULT))
    a.add_argument("--widths", default="128,256,512,768", help="hidden sizes of the random Llamas ('' = none)")
    a.add_argument("--width-depth", type=int, default=4)
    a.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    a.add_argument("--plot-copy", type=Path, default=None, help="also save the plot here (e.g. docs/speed.png)")
    a.add_argument("--from-json", type=Path, default=None, help="measure nothing: redraw OUT's tables and plot "
                                                                 "from this speed.json")
    args = a.parse_args(argv)
    if args.quick:
        for key in ("calib_windows", "seqlen", "widths", "scale_windows", "repeats", "eig_units", "epochs"):
            if a.get_default(key) == getattr(args, key):
                setattr(args, key, QUICK[key])
    unknown = [m for m in _names(args.methods) if m not in method_names()]
    if unknown:
        a.error(f"unknown --methods {unknown}; choose from {method_names()}")
    return args


def scale_sizes(args: argparse.Namespace) -> list[int]:
    n = args.calib_windows
    sizes = _ints(args.scale_windows) if args.scale_windows is not None else [max(1, n // 4), max(1, n // 2), n]
    return sorted(set(sizes))


def load_subject(args: argparse.Namespace, device: torch.device, work: Path):
    """(subject, load measurement): the real model from its source, or (--quick) a saved random one."""
    n = max(args.calib_windows, *scale_sizes(args))
    held = args.eval_windows or args.calib_windows
    if args.quick:
        source = str(save_random_llama(work / "random-llama", QUICK["hidden"], QUICK["layers"], args.seqlen))
        name = f"random-llama-h{QUICK['hidden']}x{QUICK['layers']}"
    else:
        source, name = resolve_model_source(args.model), args.model  # a first-use conversion is not timed
    (model, tokenizer), m = measure(lambda: load_model(source, device=device), device=device)
    if args.quick:
        calib, test = random_windows(model.config.vocab_size, args.seqlen, n, held)
    else:
        calib, test = text_windows(tokenizer, args.dataset, args.seqlen, n, held)
    s = make_subject(name, model, tokenizer, calib, test, device)
    return s, m


def main_stages(methods: list[str]) -> list[str]:
    return [n for n in stage_names(methods) if n != REFERENCE]


def scaling(runs: list[tuple[str, float, Runner]], stages: list[str], **text) -> dict:
    """One scaling table: per stage, seconds and ratio at every size, and the log-log slope."""
    xs = [x for _, x, _ in runs]
    out = {"labels": [label for label, _, _ in runs], "x": xs, "stages": {}, **text}
    for name in [REFERENCE, *stages]:
        rows = [r.table().get(name) for _, _, r in runs]
        if all(row is None for row in rows):
            continue
        secs = [None if row is None else row["seconds"] for row in rows]
        out["stages"][name] = {"seconds": secs, "ratio": [None if row is None else row["ratio"] for row in rows],
                               "slope": loglog_slope([x for x, s in zip(xs, secs) if s], [s for s in secs if s])}
    return out


def scale_tokens(s, args, options, skip) -> dict:
    stages = [n for n in _names(args.scale_stages) if n != REFERENCE]
    runs = []
    for k in scale_sizes(args):
        sub = s.with_calib(k)
        runner = Runner(sub, options, repeats=args.repeats, skip=skip)
        runner.run(stages, reference_before=args.repeats)
        runs.append((f"{k} x {args.seqlen}", float(sub.calib.numel()), runner))
    return scaling(runs, stages, x_label="calibration tokens", title="seconds vs calibration tokens")


def scale_width(args, options, device, skip) -> dict | None:
    widths = _ints(args.widths)
    if not widths:
        return None
    stages = [n for n in _names(args.scale_stages) if n != REFERENCE]
    runs = []
    for h in widths:
        model = random_llama(h, args.width_depth, args.seqlen)
        calib, held = random_windows(RANDOM_VOCAB, args.seqlen, args.calib_windows, args.calib_windows, seed=h)
        s = make_subject(f"random-llama-h{h}", model, None, calib, held, device)
        runner = Runner(s, options, repeats=args.repeats, skip=skip)
        runner.run(stages, reference_before=args.repeats)
        runs.append((f"h={h} ({s.params / 1e6:.1f} M)", float(h), runner))
    description = (f"random Llamas, {args.width_depth} blocks, MLP 8/3 x width, vocabulary {RANDOM_VOCAB}, "
                   f"{args.calib_windows} x {args.seqlen} random calibration tokens; seconds (× that model's fwd+bwd)")
    return scaling(runs, stages, x_label="hidden size", title="seconds vs model width", description=description)


def options_of(args: argparse.Namespace, work: Path) -> Options:
    train = TrainConfig(epochs=args.epochs, e2e_epochs=args.e2e_epochs)
    return Options(target_bpw=args.target_bpw, measure_config=args.measure_config, eig_units=args.eig_units,
                   train=train, workdir=work / "exports")


def write(result: dict, out: Path, plot_copy: Path | None) -> str:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "speed.json", result)
    text = markdown(result)
    command = f"`python bench/speed.py {shlex.join(result['argv'])}`"
    (out / "speed.md").write_text(f"{command}\n\n{text}")
    png = plot(result, out / "speed.png")
    if plot_copy is not None:
        plot_copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(png, plot_copy)
    return text


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    if args.from_json is not None:
        result = json.loads(args.from_json.read_text())
        print(write(result, args.out, args.plot_copy))
        return result
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    machine, load_start = machine_info(device), list(os.getloadavg())
    methods, skip = _names(args.methods), _names(args.skip_stages)
    with tempfile.TemporaryDirectory(prefix="mixbits-speed-") as tmp:
        work = Path(tmp)
        options = options_of(args, work)
        s, load = load_subject(args, device, work)
        gc.freeze()  # what exists now lives to the end: keep it out of the collection before every stage
        main_subject = s.with_calib(args.calib_windows)
        runner = Runner(main_subject, options, repeats=args.repeats, skip=skip)
        if not runner.skipped("load"):
            runner.record("load", load)
        stages = runner.run(main_stages(methods), reference_before=args.repeats)
        runner.done.clear()  # the RTN model and the Fisher table: not needed by the scaling runs
        tokens = scale_tokens(s, args, options, skip) if len(scale_sizes(args)) > 1 else None
        width = scale_width(args, options, device, skip)
    result = {"argv": list(argv if argv is not None else sys.argv[1:]), "machine": machine,
              "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "load_average": {"start": load_start, "end": list(os.getloadavg())},
              "main": {"subject": main_subject.describe(), "unit_seconds": runner.unit,
                       "unit_runs": runner.reference_runs, "units": runner.units, "stages": stages},
              "scaling_tokens": tokens, "scaling_width": width}
    print(write(result, args.out, args.plot_copy))
    return result


if __name__ == "__main__":
    main()
