"""End-to-end cost: from the original checkpoint to a quantized model on disk, each tool as its
users run it, at about the same size, on the same calibration windows, one after another.

    python bench/end_to_end.py --model smollm2-135m --out runs/end_to_end
    python bench/end_to_end.py --quick --out /tmp/e2e      # tiny random Llama: a smoke run

Every step is its own process (imports, loading, computing and saving all count), timed by wall
clock around it, with its peak resident memory from the kernel's rusage of that process
(`os.wait4`: the largest RSS of it and of anything it waited for). The subjects:

  mixbits-rtn / -gptq    `mixbits run --no-cache --no-baselines` at --bpw (sensitivity measured
                         afresh, optimal allocation, quantization of the mixed model only, save);
                         `--eval-windows 1`, and the evaluate
                         stage its own timer reports (results.json timings_s) is subtracted:
                         no other tool evaluates
  mixbits-gptq-all-rows  the same as mixbits-gptq with `--gain-rows 0`: GPTQ's gain measured on every
                         output row of every layer (the default before it was sampled)
  mixbits-gptq-rtn-damage  the same with `--damage rtn`: allocated on RTN's damage, no GPTQ gain table
  mixbits-gptq-qat       the same as mixbits-gptq with `--qat --e2e` (Block-AP, then E2E-QP)
  llamacpp               llama.cpp's convert_hf_to_gguf.py (F16), then llama-quantize TYPE
  llamacpp-imatrix       the same conversion, llama-imatrix on the calibration text, llama-quantize
  gptqmodel              GPTQModel.load + quantize on the calibration windows + save (_e2e_peers.py)
  torchao                from_pretrained + quantize_(IntxWeightOnlyConfig) + torch.save

Each subject's settings land at 4.2-4.25 bpw of the block linears on the embedded model (see
bench/quality.py's table); seconds are also given as a ratio to mixbits-rtn measured in this run.
A subject whose tool is missing says why; a finished subject is not run again (`--fresh` reruns).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _measure import machine_info  # noqa: E402
from quality_llamacpp import TOKENIZER_PRE, tools  # noqa: E402
from quality_rows import NotRun  # noqa: E402
from mixbits.io import atomic_write_json, atomic_write_text  # noqa: E402

HERE = Path(__file__).resolve().parent
SUBJECTS = ("mixbits-rtn", "mixbits-gptq", "mixbits-gptq-all-rows", "mixbits-gptq-rtn-damage", "mixbits-gptq-qat", "llamacpp", "llamacpp-imatrix",
            "gptqmodel", "torchao")
BASELINE = "mixbits-rtn"


@dataclass(frozen=True)
class Step:
    """One process. `key` names it, so a step two subjects share (the F16 conversion) runs once;
    `excluded`: stages of a mixbits results.json (`results`) that are not part of the job."""

    key: str
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    results: str | None = None
    excluded: tuple[str, ...] = ()


@dataclass
class Subject:
    name: str
    settings: str
    steps: list[Step] = field(default_factory=list)
    missing: str | None = None  # why this subject cannot run here


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    a = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    a.add_argument("--model", default="smollm2-135m")
    a.add_argument("--dataset", default="wiki")
    a.add_argument("--calib-windows", type=int, default=16)
    a.add_argument("--seqlen", type=int, default=512)
    a.add_argument("--bpw", type=float, default=4.25, help="mixbits' budget")
    a.add_argument("--llamacpp-type", default="Q3_K_S", help="4.23 bpw on SmolLM2's 576-wide rows (Q4_0 fallback)")
    a.add_argument("--gptq", default="4,128,2.4", help="GPTQModel bits,group,mse (2.4: its clip search, its better "
                   "setting in bench/quality.py's table)")
    a.add_argument("--torchao", default="4,64,symmetric-hqq", help="torchao bits,group,variant")
    a.add_argument("--subjects", default=",".join(SUBJECTS))
    a.add_argument("--threads", type=int, default=os.cpu_count(), help="threads every tool may use")
    a.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where mixbits, GPTQModel and torchao run "
                   "(llama.cpp's tools are built for the CPU)")
    a.add_argument("--out", type=Path, default=Path("runs/end_to_end"))
    a.add_argument("--fresh", action="store_true", help="measure every subject again")
    a.add_argument("--quick", action="store_true")
    args = a.parse_args(argv)
    args.subjects = tuple(s.strip() for s in args.subjects.split(",") if s.strip())
    unknown = [s for s in args.subjects if s not in SUBJECTS]
    if unknown:
        a.error(f"unknown subjects {unknown}; choose from {', '.join(SUBJECTS)}")
    return args


def prepare_inputs(args: argparse.Namespace) -> tuple[str, Path, Path]:
    """(HF folder of the original, calibration windows as token ids JSON, the same decoded as text):
    every tool calibrates on the windows `mixbits run` samples."""
    from mixbits.config import DataConfig, RunConfig
    from mixbits.model.load import resolve_model_source
    from mixbits.pipeline import calibrate, prepare
    from mixbits.timing import StageTimer

    if args.quick:
        from quality_quick import quick_data

        args.model, args.dataset, _ = quick_data(args.out / "quick-data")
        args.seqlen, args.calib_windows = 64, 4
    cfg = RunConfig(model=args.model, output_dir=args.out, device="cpu", progress=False, report=False,
                    data=DataConfig(dataset=args.dataset, seqlen=args.seqlen, calib_windows=args.calib_windows,
                                    eval_windows=1))
    p = prepare(cfg, StageTimer())
    calib, _, _ = calibrate(cfg, p, StageTimer())
    ids, text = args.out / "inputs" / "calibration.json", args.out / "inputs" / "calibration.txt"
    atomic_write_json(ids, calib.tolist())
    atomic_write_text(text, "\n\n".join(p.tokenizer.decode(w, skip_special_tokens=True) for w in calib.tolist()))
    return str(resolve_model_source(args.model)), ids, text


def _mixbits(args, name: str, extra: list[str], settings: str) -> Subject:
    out = args.out / name
    argv = [str(Path(sys.executable).with_name("mixbits")), "run", "--model", args.model, "--dataset", args.dataset,
            "--seqlen", str(args.seqlen), "--calib-windows", str(args.calib_windows), "--eval-windows", "1",
            "--target-bpw", f"{args.bpw:g}", "--no-cache", "--no-baselines", "--no-report", "--device", args.device,
            "--output-dir", str(out), "--overwrite", *extra]  # a rerun replaces its earlier result
    return Subject(name, settings, [Step(name, tuple(argv), results=str(out / "results.json"),
                                         excluded=("evaluate",))])


def _llamacpp(args, hf: str, text: Path, imatrix: bool) -> Subject:
    name = "llamacpp-imatrix" if imatrix else "llamacpp"
    subject = Subject(name, f"{args.llamacpp_type}{', importance matrix' if imatrix else ''}, "
                      "token embedding and output head F16")
    try:
        bin_dir = tools(build=False)
    except NotRun as err:
        subject.missing = str(err)
        return subject
    src = bin_dir.parent / "src" / "vendor" / "llama.cpp"
    folder, t = args.out / "llamacpp", str(args.threads)
    folder.mkdir(parents=True, exist_ok=True)
    f16, matrix = folder / "f16.gguf", folder / "imatrix.gguf"
    subject.steps.append(Step("llamacpp-convert", (sys.executable, str(src / "convert_hf_to_gguf.py"), hf, "--outtype",
                                                   "f16", "--outfile", str(f16)),
                              env=(("PYTHONPATH", str(src / "gguf-py")),)))
    quantize = [str(bin_dir / "llama-quantize"), "--token-embedding-type", "f16", "--output-tensor-type", "f16"]
    if imatrix:
        subject.steps.append(Step("llamacpp-imatrix", (str(bin_dir / "llama-imatrix"), "-m", str(f16), "-f", str(text),
                                                       "-o", str(matrix), "-c", str(args.seqlen), "-b",
                                                       str(args.seqlen), "--chunks", str(args.calib_windows), "-t", t,
                                                       "-ngl", "0")))
        quantize += ["--imatrix", str(matrix)]
    out = folder / f"{args.llamacpp_type}{'-imatrix' if imatrix else ''}.gguf"
    subject.steps.append(Step(f"{name}-quantize", (*quantize, str(f16), str(out), args.llamacpp_type, t)))
    return subject


def _peer(args, name: str, job: dict, settings: str, module: str) -> Subject:
    subject = Subject(name, settings)
    if importlib.util.find_spec(module) is None:
        subject.missing = f"{module} is not importable here (see bench/quality_peers.py for how to install it)"
        return subject
    path = args.out / "inputs" / f"{name}.json"
    atomic_write_json(path, job)
    subject.steps.append(Step(name, (sys.executable, str(HERE / "_e2e_peers.py"), name, str(path))))
    return subject


def subjects(args, hf: str, ids: Path, text: Path) -> list[Subject]:
    from mixbits.config import RunConfig

    calibration = json.loads(ids.read_text())
    bits, group, mse = args.gptq.split(",")
    bits, group, mse = int(bits), int(group), float(mse)
    tb, tg, variant = args.torchao.split(",")
    rows = RunConfig().gain_rows
    sampled = f"gain on {rows} rows per layer" if rows else "gain on every row"
    made = {
        "mixbits-rtn": lambda: _mixbits(args, "mixbits-rtn", ["--quantizer", "rtn"], f"optimal at {args.bpw:g} bpw, RTN"),
        "mixbits-gptq": lambda: _mixbits(args, "mixbits-gptq", ["--quantizer", "gptq"],
                                         f"optimal at {args.bpw:g} bpw, GPTQ with clip search ({sampled})"),
        "mixbits-gptq-all-rows": lambda: _mixbits(args, "mixbits-gptq-all-rows", ["--quantizer", "gptq", "--gain-rows",
                                                                                  "0"],
                                                  f"optimal at {args.bpw:g} bpw, GPTQ with clip search (gain on every "
                                                  "row)"),
        "mixbits-gptq-rtn-damage": lambda: _mixbits(args, "mixbits-gptq-rtn-damage",
                                                    ["--quantizer", "gptq", "--damage", "rtn"],
                                                    f"optimal at {args.bpw:g} bpw on RTN's damage, GPTQ with clip search"),
        "mixbits-gptq-qat": lambda: _mixbits(args, "mixbits-gptq-qat", ["--quantizer", "gptq", "--qat", "--e2e"],
                                             f"optimal at {args.bpw:g} bpw, GPTQ, Block-AP + E2E-QP (defaults)"),
        "llamacpp": lambda: _llamacpp(args, hf, text, False),
        "llamacpp-imatrix": lambda: _llamacpp(args, hf, text, True),
        "gptqmodel": lambda: _peer(args, "gptqmodel", {"model": hf, "out": str(args.out / "gptqmodel" / "model"),
                                                        "calibration": calibration, "bits": bits, "group": group, "mse": mse,
                                                        "device": args.device},
                                   f"w{bits}g{group}, mse={mse:g}, its defaults otherwise", "gptqmodel"),
        "torchao": lambda: _peer(args, "torchao", {"model": hf, "out": str(args.out / "torchao" / "model"),
                                                    "bits": int(tb), "group": int(tg), "variant": variant,
                                                    "device": args.device},
                                 f"int{tb} g{tg} {variant}", "torchao"),
    }
    return [made[name]() for name in args.subjects]


def run_step(step: Step, threads: int, log: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), **dict(step.env)}
    if "PYTHONPATH" in dict(step.env) and os.environ.get("PYTHONPATH"):
        env["PYTHONPATH"] = f"{dict(step.env)['PYTHONPATH']}{os.pathsep}{os.environ['PYTHONPATH']}"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as sink:
        sink.write(shlex.join(step.argv) + "\n")
        sink.flush()
        began = time.perf_counter()
        child = subprocess.Popen(step.argv, stdout=sink, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - began
    child.returncode = os.waitstatus_to_exitcode(status)
    record = {"wall_s": wall, "peak_rss_mib": usage.ru_maxrss / 1024, "rc": child.returncode, "log": str(log)}
    if child.returncode == 0 and step.results:
        timings = json.loads(Path(step.results).read_text())["timings_s"]
        record["excluded_s"] = {k: timings[k] for k in step.excluded if k in timings}
        record["stages_s"] = timings
    record["seconds"] = wall - sum(record.get("excluded_s", {}).values())
    return record


def measure(subject: Subject, steps_done: dict, args) -> dict:
    if subject.missing:
        return {"settings": subject.settings, "status": f"not run: {subject.missing}"}
    records = []
    for step in subject.steps:
        if step.key not in steps_done or steps_done[step.key]["rc"] != 0:
            print(f"running {step.key}: {shlex.join(step.argv)}", flush=True)
            steps_done[step.key] = run_step(step, args.threads, args.out / "logs" / f"{step.key}.log")
        records.append((step.key, steps_done[step.key]))
        if steps_done[step.key]["rc"] != 0:
            return {"settings": subject.settings, "steps": dict(records),
                    "status": f"failed: {step.key} exited {steps_done[step.key]['rc']}; see {steps_done[step.key]['log']}"}
    return {"settings": subject.settings, "status": "ok", "steps": dict(records),
            "seconds": sum(r["seconds"] for _, r in records), "peak_rss_mib": max(r["peak_rss_mib"] for _, r in records)}


def _step_cell(name: str, step: dict) -> str:
    """A step's seconds; for a mixbits run, its own stages (evaluation left out) and the rest of the
    process (interpreter start, imports, writing results) as "other"."""
    if "stages_s" not in step:
        return f"{name} {step['seconds']:.1f}".strip()
    stages = {k: v for k, v in step["stages_s"].items() if k not in step.get("excluded_s", {})}
    other = step["seconds"] - sum(stages.values())
    parts = [f"{k} {v:.1f}" for k, v in stages.items() if v >= 0.5] + [f"other {other:.1f}"]
    return ", ".join(parts)


def table(data: dict) -> str:
    base = data["subjects"].get(BASELINE, {}).get("seconds")
    lines = ["| tool | settings | steps (seconds) | seconds | x mixbits-rtn | peak RSS (MiB) |",
             "|---|---|---|---:|---:|---:|"]
    for name, r in sorted(data["subjects"].items(), key=lambda kv: SUBJECTS.index(kv[0]) if kv[0] in SUBJECTS else 99):
        if r["status"] != "ok":
            lines.append(f"| {name} | {r['settings']} | {r['status']} | – | – | – |")
            continue
        steps = "; ".join(_step_cell(k.rsplit("-", 1)[-1] if len(r["steps"]) > 1 else "one process", s)
                          for k, s in r["steps"].items())
        ratio = f"{r['seconds'] / base:.2f}" if base else "–"
        lines.append(f"| {name} | {r['settings']} | {steps} | {r['seconds']:.1f} | {ratio} | {r['peak_rss_mib']:.0f} |")
    m = data["meta"]
    return "\n".join([f"`{m['command']}`", "", f"{m['machine']['date']}, {m['machine']['cpu']}, {m['machine']['cores']} "
                      f"cores, {m['threads']} threads per tool; torch {m['machine']['torch']}, transformers "
                      f"{m['machine']['transformers']}.", "", *lines])


def main(argv: list[str] | None = None) -> dict:
    import torch

    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    hf, ids, text = prepare_inputs(args)
    path = args.out / "end_to_end.json"
    old = json.loads(path.read_text()) if path.is_file() and not args.fresh else {}
    meta = {"command": shlex.join(["python", "bench/end_to_end.py", *(sys.argv[1:] if argv is None else argv)]),
            "model": args.model, "bpw": args.bpw, "threads": args.threads,
            "machine": machine_info(torch.device(args.device)),
            "calibration": f"{args.calib_windows} x {args.seqlen} `{args.dataset}` calibration windows"}
    if old and old["meta"]["model"] != args.model:
        raise SystemExit(f"{path} holds results for {old['meta']['model']}; use another --out or --fresh")
    data = {"meta": meta, "steps": old.get("steps", {}), "subjects": old.get("subjects", {})}
    for subject in subjects(args, hf, ids, text):
        if data["subjects"].get(subject.name, {}).get("status") == "ok":
            continue
        data["subjects"][subject.name] = measure(subject, data["steps"], args)
        atomic_write_json(path, data)  # a killed run keeps every finished subject
    atomic_write_json(path, data)
    text_table = table(data)
    atomic_write_text(args.out / "end_to_end.md", text_table + "\n")
    print(text_table)
    return data


if __name__ == "__main__":
    main()
