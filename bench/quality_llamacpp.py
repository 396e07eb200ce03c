"""llama.cpp's own quantization of the same original weights, scored on mixbits' windows.

1. The original model (the fp32 HF weights mixbits quantizes) is written as an all-F16 GGUF by
   mixbits' own writer (`export.gguf.write_gguf` with an empty plan: every 2-D tensor F16,
   norms F32), with its tokenizer, so llama.cpp's tools can read it.
2. `llama-imatrix` computes an importance matrix on the same calibration windows mixbits
   calibrates on, decoded to text (llama.cpp re-tokenizes it; `-c SEQLEN`, one chunk per window).
3. `llama-quantize [--imatrix] F16.gguf OUT.gguf TYPE`, keeping the token embedding and the output
   head in F16 (`--token-embedding-type f16 --output-tensor-type f16`) because mixbits keeps
   them in 16 bit too: only the block linears differ between the two tools.
4. The file is run by llama.cpp (`eval.llamacpp.LlamaCppLM`) on mixbits' own token ids of the
   same held-out windows and scored by `evaluate_models`, the code that scores every row.

Bytes of the quantized layers: the GGUF tensor bytes of the block linears (attn_q/k/v/output,
ffn_gate/up/down), read with `gguf.GGUFReader`, the set of layers mixbits counts. K-quants pack
256 weights per super-block: a row whose length is not a multiple of 256 (SmolLM2's 576 inputs)
cannot hold one, and llama-quantize falls back to a 32-block type for it (Q2_K/Q3_K -> Q4_0,
Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0); the type mix of each file is recorded with its row.
The tools are built by bench/llamacpp_tools.sh from the llama.cpp that llama-cpp-python vendors.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import torch

from quality_rows import Built, NotRun, Row
from mixbits.data.cache import mixbits_home
from mixbits.export.gguf import write_gguf
from mixbits.plan import Plan

log = logging.getLogger("quality")

TYPES = ("Q2_0", "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_M", "IQ4_NL")
LINEAR = re.compile(r"^blk\.\d+\.(attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down)\.weight$")
TOOLS_SCRIPT = Path(__file__).resolve().parent / "llamacpp_tools.sh"
TOKENIZER_PRE = {"smollm2-135m": "smollm"}  # llama.cpp's pre-tokenizer name for the embedded model


def llama_cpp_version() -> str:
    try:
        import llama_cpp  # noqa: F401  (the evaluation runs through it)
    except ImportError as err:
        raise NotRun(f"llama-cpp-python is not importable ({err}); `pip install mixbits[llamacpp]`") from None
    return metadata.version("llama-cpp-python")


def tools(build: bool) -> Path:
    """The bin folder holding llama-quantize and llama-imatrix, built now if missing and `build`."""
    bin_dir = mixbits_home() / "tools" / f"llama.cpp-{llama_cpp_version()}" / "bin"
    if not (bin_dir / "llama-quantize").is_file() or not (bin_dir / "llama-imatrix").is_file():
        if not build:
            raise NotRun(f"llama-quantize / llama-imatrix not in {bin_dir}; run bash bench/llamacpp_tools.sh")
        log.info("building llama.cpp's tools (bench/llamacpp_tools.sh, ~10 min on 2 cores)")
        done = subprocess.run(["bash", str(TOOLS_SCRIPT)], capture_output=True, text=True)
        if done.returncode != 0:
            raise NotRun(f"bench/llamacpp_tools.sh failed: {done.stderr.strip().splitlines()[-1:]}")
        bin_dir = Path(done.stdout.strip().splitlines()[-1])
    return bin_dir


def _run(cmd: list[str], log_file: Path) -> str:
    log.info("%s", " ".join(cmd))
    done = subprocess.run(cmd, capture_output=True, text=True)
    log_file.write_text(done.stdout + "\n" + done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"{Path(cmd[0]).name} exited {done.returncode}; see {log_file}")
    return done.stdout + done.stderr


def f16_gguf(bench) -> Path:
    """The original model as an F16 GGUF (written once)."""
    path = bench.out / "llamacpp" / "original-f16.gguf"
    if not path.is_file():
        pre = TOKENIZER_PRE.get(bench.args.model, "default")
        write_gguf(bench.p.model, Plan({}), path, bench.p.tokenizer, tokenizer_pre=pre)
    return path


def imatrix(bench, bin_dir: Path, f16: Path) -> tuple[Path, dict]:
    """llama-imatrix on the calibration windows decoded to text; (file, what was used)."""
    folder = bench.out / "llamacpp"
    path, text = folder / "imatrix.gguf", folder / "calibration.txt"
    n, seqlen = bench.calib.shape
    info = {"text": f"the {n} calibration windows of {seqlen} tokens, decoded, joined by blank lines",
            "ctx": seqlen, "chunks_asked": n}
    if not path.is_file():
        text.write_text("\n\n".join(bench.p.tokenizer.decode(w, skip_special_tokens=True) for w in bench.calib.tolist()))
        out = _run([str(bin_dir / "llama-imatrix"), "-m", str(f16), "-f", str(text), "-o", str(path), "-c", str(seqlen),
                    "-b", str(seqlen), "--chunks", str(n), "-t", str(torch.get_num_threads()), "-ngl", "0"],
                   folder / "imatrix.log")
        found = re.search(r"computing over (\d+) chunks", out)
        (folder / "imatrix.chunks").write_text(found.group(1) if found else "?")
    info["chunks_used"] = (folder / "imatrix.chunks").read_text().strip()
    return path, info


_COUNT = """
import json, re, sys
from collections import Counter
from gguf import GGUFReader
total, weights, kinds = 0, 0, Counter()
for t in GGUFReader(sys.argv[1]).tensors:
    if re.match(sys.argv[2], t.name):
        total, weights = total + int(t.n_bytes), weights + int(t.n_elements)
        kinds[t.tensor_type.name] += 1
print(json.dumps([total, weights, dict(sorted(kinds.items()))]))
"""


def linear_bytes(path: Path, bin_dir: Path | None = None) -> tuple[int, int, dict]:
    """(bytes, weights, {ggml type: tensor count}) of the block linears of a GGUF file, read by
    `gguf.GGUFReader`. Types newer than the installed gguf package (Q2_0) are read by the gguf-py
    that ships with the llama.cpp the tools were built from, in a subprocess (two `gguf` packages
    cannot share one process)."""
    env = dict(os.environ)
    if bin_dir is not None and (bin_dir.parent / "src" / "vendor" / "llama.cpp" / "gguf-py").is_dir():
        env["PYTHONPATH"] = str(bin_dir.parent / "src" / "vendor" / "llama.cpp" / "gguf-py")
    done = subprocess.run([sys.executable, "-c", _COUNT, str(path), LINEAR.pattern], capture_output=True, text=True,
                          env=env)
    if done.returncode != 0:
        raise RuntimeError(f"reading {path}: {done.stderr.strip().splitlines()[-1:]}")
    total, weights, kinds = json.loads(done.stdout)
    return total, weights, kinds


def preset_file(bench, bin_dir: Path, qtype: str, use_imatrix: bool) -> tuple[Path, dict]:
    f16 = f16_gguf(bench)
    folder = bench.out / "llamacpp"
    path = folder / f"{qtype}{'-imatrix' if use_imatrix else ''}.gguf"
    cmd = [str(bin_dir / "llama-quantize"), "--token-embedding-type", "f16", "--output-tensor-type", "f16"]
    info = {}
    if use_imatrix:
        matrix, info = imatrix(bench, bin_dir, f16)
        cmd += ["--imatrix", str(matrix)]
    if not path.is_file():
        tmp = path.with_suffix(".tmp.gguf")
        _run(cmd + [str(f16), str(tmp), qtype, str(torch.get_num_threads())], path.with_suffix(".log"))
        tmp.rename(path)
    return path, info


def rows(bench, use_imatrix: bool) -> list[Row]:
    arm = "llamacpp-imatrix" if use_imatrix else "llamacpp"
    out = []
    for qtype in bench.args.llamacpp_types:
        settings = {"type": qtype, "embeddings_and_head": "F16 (as mixbits keeps them)",
                    "imatrix": "from the same calibration windows" if use_imatrix else None}
        row = Row(arm, qtype, settings, lambda: None)
        row.build = _builder(bench, row, qtype, use_imatrix)
        out.append(row)
    return out


def _builder(bench, row: Row, qtype: str, use_imatrix: bool):
    def build() -> Built:
        from mixbits.eval.llamacpp import LlamaCppLM

        bin_dir = tools(build=bench.args.build_llamacpp)
        path, info = preset_file(bench, bin_dir, qtype, use_imatrix)
        n_bytes, weights, kinds = linear_bytes(path, bin_dir)
        if weights != bench.n_weights:
            raise RuntimeError(f"{path} holds {weights} block-linear weights, the model {bench.n_weights}")
        if info:
            row.settings["imatrix"] = info
        extra = {"types": kinds, "file": str(path.relative_to(bench.out)), "file_bytes": path.stat().st_size,
                 "llama_cpp_python": llama_cpp_version()}
        return Built(LlamaCppLM(path, n_ctx=bench.windows_seqlen), n_bytes, extra)

    return build


def reference_row(bench) -> Row:
    """The F16 file itself in llama.cpp: how far llama.cpp's arithmetic alone is from the original."""
    row = Row("reference", "llama.cpp F16", {"type": "F16 (every tensor as written by mixbits)"}, lambda: None)

    def build() -> Built:
        from mixbits.eval.llamacpp import LlamaCppLM

        llama_cpp_version()
        path = f16_gguf(bench)
        n_bytes, _, kinds = linear_bytes(path)
        return Built(LlamaCppLM(path, n_ctx=bench.windows_seqlen), n_bytes, {"types": kinds})

    row.build = build
    return row
