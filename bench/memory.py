"""Peak memory and wall time of every mixbits stage on random-weight Llama checkpoints (issue 15).

    python bench/memory.py --sizes 0.2b,0.6b --out runs/memory
    python bench/memory.py --sizes tiny --stages run-rtn,analyze --out /tmp/mem   # a smoke run
    python bench/memory.py --sizes 0.2b --stages analyze,analyze-hessian --out /tmp/mem   # + --no-stream: whole

Checkpoints: Llama models with random weights (normal, std 0.02; norms at one) in bfloat16, with the
embedded SmolLM2 tokenizer (vocabulary 49152) copied from its folder under MIXBITS_HOME. They are
built shard by shard (the embeddings, each block, the final norm and head are generated, written
with safetensors' `save_file` into their own shard and dropped), with a `model.safetensors.index.json`,
so building holds one block at a time, never the model it is meant to test. One width at growing
depth and growing width:

    size   hidden x blocks   intermediate   parameters
    0.2b   1024 x 8          2816           0.21 B
    0.6b   2048 x 8          5632           0.61 B
    1.1b   2048 x 16         5632           1.02 B
    2.2b   2048 x 40         5632           2.26 B
    7b     4096 x 32         11008          6.88 B  (Llama-2-7B's blocks; 13.8 GB in bf16)
    tiny   64 x 2            128            6.3 M  (the smoke test's)

Stages, each its own process (`mixbits ...`, imports, loading, computing and saving all count):
run-rtn and run-gptq (`mixbits run` with the uniform baselines), run-rtn-ram (run-rtn with
`--preload`: the checkpoint held in RAM in its own dtype), analyze (`--methods fisher`),
train (Block-AP of run-rtn's plan), train-e2e (Block-AP then E2E-QP, `--e2e`), export-gptq and
export-gguf (of run-rtn's folder); on request only, analyze-hessian (`--methods hessian`, streamed or, with
--no-stream, the whole model, which has no prediction). Small
calibration settings (--calib-windows, --seqlen, --eval-windows) keep the data's share small: the
figures are the model's. Per stage: wall time around the process, and its peak resident memory
from the kernel (`os.wait4`'s ru_maxrss, taken by a small launcher between this script and the
stage, so that this script's own peak is not handed to the stage at exec: `LAUNCHER`);
the predicted peak (`mixbits.model.budget` and `budget_stages`, for the stages they cover); peak / the checkpoint's
bytes. Random weights measure memory and time only, never quality.

The checkpoints this script built are deleted when it ends (the disk is shared) unless
--keep-checkpoints; a stage that runs past --timeout is killed and reported as such.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

STAGES = ("run-rtn", "run-rtn-ram", "run-gptq", "analyze", "train", "train-e2e", "export-gptq", "export-gguf")
ON_REQUEST = ("analyze-hessian",)  # not in the default list
NEEDS_RUN = ("train", "train-e2e", "export-gptq", "export-gguf")  # read run-rtn's folder
VOCAB = 49152
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
GIB = 2**30


@dataclass(frozen=True)
class Shape:
    hidden: int
    blocks: int
    intermediate: int
    head_dim: int = 64

    @property
    def heads(self) -> int:
        return max(1, self.hidden // self.head_dim)

    def params(self) -> int:
        block = 4 * self.hidden ** 2 + 3 * self.hidden * self.intermediate + 2 * self.hidden
        return self.blocks * block + 2 * VOCAB * self.hidden + self.hidden


SIZES = {
    "tiny": Shape(64, 2, 128, head_dim=16),
    "0.2b": Shape(1024, 8, 2816),
    "0.6b": Shape(2048, 8, 5632),
    "1.1b": Shape(2048, 16, 5632),
    "2.2b": Shape(2048, 40, 5632),
    "7b": Shape(4096, 32, 11008, head_dim=128),  # Llama-2-7B's blocks (its vocabulary is 32000; this one 49152)
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    a = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    a.add_argument("--sizes", default="0.2b,0.6b", help=f"comma list of {', '.join(SIZES)}")
    a.add_argument("--stages", default=",".join(STAGES), help=f"comma list of {', '.join(STAGES + ON_REQUEST)}")
    a.add_argument("--out", type=Path, default=Path("runs/memory"))
    a.add_argument("--keep-checkpoints", action="store_true", help="keep the built checkpoints (default: delete)")
    a.add_argument("--calib-windows", type=int, default=2)
    a.add_argument("--seqlen", type=int, default=256)
    a.add_argument("--eval-windows", type=int, default=2)
    a.add_argument("--bpw", type=float, default=4.5)
    a.add_argument("--bits", default="4,8", help="candidate bits: ones every export format stores as they are "
                   "(gptq: 2, 3, 4, 8; gguf: 4, 5, 8), so the exports stream the run's codes; fewer: a shorter gain table")
    a.add_argument("--damage", default="follow", choices=("follow", "rtn"),
                   help="mixbits run --damage (rtn: no gain table, the GPTQ run's longest stage)")
    a.add_argument("--group-sizes", default="128")
    a.add_argument("--baselines", action=argparse.BooleanOptionalAction, default=True,
                   help="mixbits run with the uniform baselines (--no-baselines: the mixed model only; one variant "
                        "at a time either way, so memory is the same and time a third)")
    a.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True,
                   help="pass --stream/--no-stream to mixbits run and analyze-hessian (and predict that path)")
    a.add_argument("--nearest", action="store_true", help="export --nearest: round up bits the format lacks "
                   "(then the export re-quantizes from the original model instead of streaming the run's codes)")
    a.add_argument("--threads", type=int, default=2)
    a.add_argument("--timeout", type=float, default=600.0, help="seconds before a stage is killed")
    a.add_argument("--seed", type=int, default=0)
    args = a.parse_args(argv)
    args.sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    args.stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    bad = [s for s in args.sizes if s not in SIZES] + [s for s in args.stages if s not in STAGES + ON_REQUEST]
    if bad:
        a.error(f"unknown sizes or stages {bad}; sizes: {', '.join(SIZES)}; stages: {', '.join(STAGES + ON_REQUEST)}")
    if "run-rtn-ram" in args.stages and not args.stream:
        a.error("run-rtn-ram preloads the checkpoint for the streamed path; drop it or --no-stream")
    if any(s in NEEDS_RUN for s in args.stages) and "run-rtn" not in args.stages:
        args.stages.insert(0, "run-rtn")  # train and export read its folder
    args.stages = [s for s in STAGES + ON_REQUEST if s in args.stages]
    return args


# --- checkpoints -----------------------------------------------------------------------------------------

def _random(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    return (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)


def _block_tensors(i: int, s: Shape, gen: torch.Generator) -> dict[str, torch.Tensor]:
    p, h, m = f"model.layers.{i}.", s.hidden, s.intermediate
    out = {f"{p}self_attn.{n}_proj.weight": _random((h, h), gen) for n in ("q", "k", "v", "o")}
    out |= {f"{p}mlp.gate_proj.weight": _random((m, h), gen), f"{p}mlp.up_proj.weight": _random((m, h), gen),
            f"{p}mlp.down_proj.weight": _random((h, m), gen)}
    out |= {f"{p}{n}.weight": torch.ones(h, dtype=torch.bfloat16) for n in ("input_layernorm", "post_attention_layernorm")}
    return out


def _tokenizer_dir() -> Path:
    from mixbits.model.load import EMBEDDED_MODELS, ensure_embedded

    return ensure_embedded(EMBEDDED_MODELS["smollm2-135m"])


def build_checkpoint(folder: Path, s: Shape, seed: int = 0) -> int:
    """Write a random-weight bf16 Llama of shape `s` into `folder`, one shard per piece; its bytes."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer_dir()
    for name in TOKENIZER_FILES:
        if (tokenizer / name).is_file():
            shutil.copyfile(tokenizer / name, folder / name)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=s.hidden, intermediate_size=s.intermediate,
                         num_hidden_layers=s.blocks, num_attention_heads=s.heads, num_key_value_heads=s.heads,
                         head_dim=s.head_dim, max_position_embeddings=4096, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2)
    config.dtype = "bfloat16"
    config.save_pretrained(folder)
    gen = torch.Generator().manual_seed(seed)
    pieces = [("embed", lambda: {"model.embed_tokens.weight": _random((VOCAB, s.hidden), gen)})]
    pieces += [(f"block{i:03d}", lambda i=i: _block_tensors(i, s, gen)) for i in range(s.blocks)]
    pieces += [("head", lambda: {"model.norm.weight": torch.ones(s.hidden, dtype=torch.bfloat16),
                                 "lm_head.weight": _random((VOCAB, s.hidden), gen)})]
    weight_map, total = {}, 0
    for n, (label, make) in enumerate(pieces):
        file = f"model-{n + 1:05d}-of-{len(pieces):05d}-{label}.safetensors"
        tensors = make()  # one piece in memory at a time
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        weight_map |= {k: file for k in tensors}
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total


# --- stages ----------------------------------------------------------------------------------------------

def _mixbits() -> list[str]:
    return [str(Path(sys.executable).with_name("mixbits"))]  # the console script beside this python


def stage_argv(stage: str, model: Path, out: Path, args: argparse.Namespace) -> list[str]:
    data = ["--dataset", "wiki", "--seqlen", str(args.seqlen), "--device", "cpu", "--no-verbose"]
    cands = ["--bits", args.bits, "--group-sizes", args.group_sizes]
    if stage.startswith("run-"):
        quantizer = stage.split("-")[1]
        return _mixbits() + ["run", "--model", str(model), "--output-dir", str(out / stage), "--target-bpw",
                             str(args.bpw), "--quantizer", quantizer, *(["--preload"] if stage.endswith("-ram") else []),
                             "--calib-windows",
                             str(args.calib_windows), "--eval-windows", str(args.eval_windows), "--no-cache",
                             "--no-report", "--stream" if args.stream else "--no-stream", "--damage", args.damage,
                             "--baselines" if args.baselines else "--no-baselines",
                             *cands, *data]
    if stage.startswith("analyze"):
        hessian = ["--methods", "hessian", "--stream" if args.stream else "--no-stream"]
        return _mixbits() + ["analyze", "--model", str(model), *(hessian if stage == "analyze-hessian" else
                                                                  ["--methods", "fisher"]), "--calib-windows",
                             str(args.calib_windows), "--no-validate", "--no-cache", "--output-dir", str(out / stage),
                             *cands, *data]
    if stage.startswith("train"):
        return _mixbits() + ["train", str(out / "run-rtn" / "plan.json"), "--model", str(model), "--output-dir",
                             str(out / stage), "--train-size", str(args.calib_windows), "--val-size", "1",
                             "--epochs", "1", "--batch-size", "1", "--eval-windows", str(args.eval_windows),
                             *(["--e2e", "--e2e-epochs", "1"] if stage == "train-e2e" else []), *data]
    fmt = stage.removeprefix("export-")
    target = out / stage / ("model.gguf" if fmt == "gguf" else "model")
    return _mixbits() + ["export", "--format", fmt, "--run-dir", str(out / "run-rtn"), "--out", str(target),
                         "--nearest" if args.nearest else "--no-nearest", "--no-verbose"]


def predicted_bytes(stage: str, model: Path, args: argparse.Namespace) -> int | None:
    """The peak `mixbits.model.budget` / `budget_stages` predicts for the stage (None where it predicts
    none: analyze-hessian with --no-stream, the whole model). Export stages read run-rtn's folder's headers."""
    from mixbits.config import DataConfig, RunConfig, TrainConfig
    from mixbits.model.apply import layer_shapes
    from mixbits.model.budget import predict_run, predict_train, skeleton_of
    from mixbits.model.budget_stages import predict_analyze, predict_export
    from mixbits.plan import Plan
    from mixbits.train.e2e_streamed import step_size_count
    from mixbits.model.memory import model_shapes

    if stage.startswith("export-"):  # streamed from the run's native folder (--nearest may load the whole model)
        from mixbits.export.footprint import stored_parts
        from mixbits.export.from_native import stored_source

        if args.nearest:
            return None
        source = stored_source(args.out / model.name / "run-rtn" / "model")
        return predict_export(stored_parts(source), stage.removeprefix("export-")).total
    skeleton, stored = skeleton_of(model)
    shapes = model_shapes(skeleton)
    data = DataConfig(seqlen=args.seqlen, calib_windows=args.calib_windows, eval_windows=args.eval_windows)
    cpu = torch.device("cpu")
    if stage.startswith("run-"):
        cfg = RunConfig(model=str(model), data=data, quantizer=stage.split("-")[1], stream=args.stream,
                        damage=args.damage, preload=stage.endswith("-ram"), baselines=args.baselines)
        return predict_run(cfg, shapes, device=cpu, checkpoint_dtype=stored).total
    if stage.startswith("analyze"):  # streamed, as stage_argv runs it (--no-validate)
        if stage == "analyze-hessian" and not args.stream:
            return None
        methods = ("hessian",) if stage == "analyze-hessian" else ("fisher",)
        return predict_analyze(methods, shapes, windows=args.calib_windows, seqlen=args.seqlen, device=cpu,
                               checkpoint_dtype=stored).total
    if stage.startswith("train"):  # streamed Block-AP (then E2E-QP), as stage_argv runs it
        e2e = stage == "train-e2e"
        train = TrainConfig(train_size=args.calib_windows, val_size=1, seqlen=args.seqlen, batch_size=1, epochs=1,
                            e2e=e2e, e2e_epochs=1.0)
        scales = step_size_count(Plan.load(args.out / model.name / "run-rtn" / "plan.json"), layer_shapes(skeleton)) \
            if e2e else None
        return predict_train(train, shapes, device=cpu, checkpoint_dtype=stored, eval_windows=args.eval_windows,
                             e2e_scales=scales).total
    return None


# A small launcher between this script and the stage. Linux keeps, in a child's ru_maxrss, the
# resident peak of the address space it replaced at exec: with vfork (what subprocess and posix_spawn
# use) that is this script's own VmHWM, 0.8-1.3 GiB after building a checkpoint, so every stage below
# it read as that floor. The launcher is a bare Python (about 10 MiB) that spawns the stage, waits for
# it and writes the stage's own rusage to a file.
LAUNCHER = """import json, os, sys
pid = os.posix_spawn(sys.argv[2], sys.argv[2:], os.environ)
_, status, usage = os.wait4(pid, 0)
rc = os.waitstatus_to_exitcode(status)
with open(sys.argv[1], "w") as f:
    json.dump({"maxrss_kib": usage.ru_maxrss, "rc": rc}, f)
sys.exit(rc if 0 <= rc < 256 else 1)
"""


def run_stage(argv: list[str], log: Path, threads: int, timeout: float) -> dict:
    """Run one stage as its own process: wall seconds, its peak RSS (MiB, from os.wait4 in `LAUNCHER`),
    exit code. A stage killed at the timeout reports the launcher's figure (a floor, not the stage's)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    log.parent.mkdir(parents=True, exist_ok=True)
    usage_file = log.with_suffix(".rusage.json")
    usage_file.unlink(missing_ok=True)
    with log.open("w") as sink:
        sink.write(" ".join(argv) + "\n")
        sink.flush()
        began = time.perf_counter()
        child = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(usage_file), *argv], stdout=sink,
                                 stderr=subprocess.STDOUT, env=env, start_new_session=True)
        timed_out, sampled = False, 0
        while True:
            pid, status, _ = os.wait4(child.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - began > timeout and not timed_out:
                os.killpg(child.pid, signal.SIGKILL)  # the stage's own process group only
                timed_out = True
            else:
                sampled = max(sampled, _stage_hwm_kib(child.pid))
            time.sleep(0.2)
        wall = time.perf_counter() - began
    rc = os.waitstatus_to_exitcode(status)
    # a stage killed at the timeout wrote no rusage: its VmHWM as last sampled (a lower bound)
    own = json.loads(usage_file.read_text()) if usage_file.is_file() else {"maxrss_kib": sampled, "rc": rc}
    return {"wall_s": wall, "peak_mib": own["maxrss_kib"] / 1024, "rc": own["rc"], "timed_out": timed_out,
            "log": str(log)}


def _stage_hwm_kib(launcher: int) -> int:
    """VmHWM (KiB) of the launcher's children, read from /proc (0 where it cannot be read)."""
    try:
        children = Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()
        lines = [line for c in children for line in Path(f"/proc/{c}/status").read_text().splitlines()]
        return max((int(line.split()[1]) for line in lines if line.startswith("VmHWM:")), default=0)
    except (OSError, ValueError, IndexError):
        return 0


# --- the table -------------------------------------------------------------------------------------------

def table(rows: list[dict]) -> str:
    lines = ["Random weights measure memory and time only, never quality.", "",
             "| size | parameters | bf16 checkpoint | stage | peak RSS | predicted | predicted / peak "
             "| peak / checkpoint | wall s | status |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        peak, pred, ck = r.get("peak_mib"), r.get("predicted_mib"), r["checkpoint_bytes"] / 2**20
        lines.append(
            f"| {r['size']} | {r['params'] / 1e9:.2f} B | {ck / 1024:.2f} GiB | {r['stage']} | "
            + (f"{peak / 1024:.2f} GiB" if peak else "—") + " | "
            + (f"{pred / 1024:.2f} GiB" if pred else "—") + " | "
            + (f"{pred / peak:.2f}" if pred and peak else "—") + " | "
            + (f"{peak / ck:.2f}x" if peak else "—") + " | "
            + (f"{r['wall_s']:.0f}" if "wall_s" in r else "—") + f" | {r['status']} |")
    return "\n".join(lines)


def _status(record: dict) -> str:
    if record["timed_out"]:
        return "killed at --timeout"
    return "ok" if record["rc"] == 0 else f"exit {record['rc']} (see {record['log']})"


def measure_size(size: str, args: argparse.Namespace) -> list[dict]:
    shape, folder = SIZES[size], args.out / "checkpoints" / size
    began = time.perf_counter()
    nbytes = build_checkpoint(folder, shape, args.seed)
    print(f"built {size}: {shape.params() / 1e9:.2f} B parameters, {nbytes / GIB:.2f} GiB in "
          f"{time.perf_counter() - began:.0f} s", flush=True)
    rows, out = [], args.out / size
    try:
        for stage in args.stages:
            row = {"size": size, "params": shape.params(), "checkpoint_bytes": nbytes, "stage": stage}
            if stage in NEEDS_RUN and rows and rows[0]["status"] != "ok":
                rows.append(row | {"status": "not run: run-rtn failed"})
                continue
            predicted = predicted_bytes(stage, folder, args)
            shutil.rmtree(out / stage, ignore_errors=True)  # each measurement starts from an empty folder
            print(f"{size} {stage} ...", flush=True)
            record = run_stage(stage_argv(stage, folder, out, args), out / "logs" / f"{stage}.log", args.threads,
                               args.timeout)
            rows.append(row | record | {"predicted_mib": None if predicted is None else predicted / 2**20,
                                        "status": _status(record)})
            print(f"  peak {record['peak_mib']:.0f} MiB, predicted "
                  f"{'—' if predicted is None else f'{predicted / 2**20:.0f} MiB'}, {record['wall_s']:.0f} s, "
                  f"{rows[-1]['status']}", flush=True)
    finally:
        if not args.keep_checkpoints:
            shutil.rmtree(folder, ignore_errors=True)
    return rows


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for size in args.sizes:
            rows += measure_size(size, args)
    finally:
        if not args.keep_checkpoints:
            shutil.rmtree(args.out / "checkpoints", ignore_errors=True)
    text = table(rows)
    (args.out / "memory.md").write_text(text + "\n")
    data = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "rows": rows}
    (args.out / "memory.json").write_text(json.dumps(data, indent=2))
    print(text)
    return data


if __name__ == "__main__":
    main()
