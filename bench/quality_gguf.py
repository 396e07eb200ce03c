"""The `mixbits-gguf` arm: mixbits' plans over the GGUF types at the exact file size of each llama.cpp preset.

For every preset of `--llamacpp-types` (issue 16 asks for Q2_K, Q3_K_S/M/L, Q4_K_S/M, Q5_K_S/M, Q6_K):

1. The preset's file is the `llamacpp-imatrix` row's own file (`quality_llamacpp`: llama-quantize of
   the F16 GGUF with the importance matrix llama-imatrix computed on the calibration windows),
   made once and shared by both rows. Its **whole file bytes** are the target.
2. mixbits solves the optimal plan over the ggml types each row allows (`--candidates gguf`:
   K-quants on rows of 256-multiples, the legacy 32-block types elsewhere), every option priced at
   its bytes in the GGUF file mixbits writes (`jobs.gguf_budget`: the fixed part, i.e. token
   embedding and untied head in F16, norms in F32, header, metadata with the tokenizer, is exact;
   each linear at its padded bytes), at or below the target. Damage: the Fisher table computed
   on those ggml grids (`--damage rtn`), once for every preset (it is cached on disk).
3. The plan is quantized by `--gguf-quantizer` on the same calibration windows llama-imatrix read
   (`bench.calib`): gptq (default) chooses each grid with importance diag(XᵀX) and adds GPTQ's
   error feedback on it; clip chooses the grid with that importance and rounds to nearest (the
   rule of llama.cpp's imatrix); rtn with uniform importance.
4. mixbits' writer writes it (`model.gguf`, the tokenizer.ggml.pre of the F16 file), its bytes are
   checked against the prediction, and llama.cpp itself runs it on mixbits' token ids, as every
   llama.cpp row is run.

Both files keep the token embedding (and an untied output head) in F16: the `llamacpp-imatrix`
presets are made with `--token-embedding-type f16 --output-tensor-type f16`, and mixbits' GGUF
writer stores them in F16 too, so the bytes the two spend differently are the block linears'.
Two presets that give the same file (Q2_K and Q3_K_S on 576-wide rows) share one mixbits file:
the plan and file depend only on the target bytes (`mixbits-gguf/<quantizer>-<bytes>/`).
Without llama-cpp-python or llama.cpp's tools, a row says so ("not run"); `solve` (plan, quantize,
write, check the bytes) needs neither and is what tests/bench/test_quality.py runs without them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from quality_rows import Built, NotRun, Row
import quality_llamacpp
from mixbits.allocate.feasibility import BudgetInfeasible
from mixbits.allocate.optimal import allocate_optimal
from mixbits.config import AllocationConfig
from mixbits.jobs.gguf_budget import GGUFBudget, gguf_budget
from mixbits.model.quantize import quantize_model
from mixbits.pipeline import sensitivity
from mixbits.plan import Plan
from mixbits.export.gguf import write_gguf
from mixbits.sensitivity.table import DamageTable
from mixbits.timing import StageTimer

log = logging.getLogger("quality")

ARM = "mixbits-gguf"
PEER = "llamacpp-imatrix"
QUANTIZERS = {"gptq": "GPTQ on each ggml grid (grid chosen with importance diag(XᵀX), then error feedback)",
              "clip": "round to nearest on each ggml grid chosen with importance diag(XᵀX) (the imatrix rule)",
              "rtn": "round to nearest on each ggml grid chosen with uniform importance"}
DAMAGE = "Fisher on the ggml grids (`--damage rtn`), one table for every preset"


def _cfg(bench, target_bytes: int | None = None):
    """`mixbits run --candidates gguf --target-size-mb <target> --damage rtn --gguf-pre <pre>` on the bench's data."""
    size = (target_bytes or 1) / 1e6
    return dataclasses.replace(bench.cfg, quantizer="rtn", damage="rtn", gguf_pre=pre(bench),
                               allocation=AllocationConfig(target_size_mb=size, candidates="gguf"))


def pre(bench) -> str:
    return quality_llamacpp.TOKENIZER_PRE.get(bench.args.model, "default")


def table(bench) -> DamageTable:
    """The Fisher damage of every ggml type each linear allows (computed once, then from the disk cache)."""
    if "gguf_table" not in bench.memo:
        bench.memo["gguf_table"] = sensitivity(_cfg(bench), bench.p, bench.calib, StageTimer(), bench.data_info)
    return bench.memo["gguf_table"]


def budget(bench, target_bytes: int) -> GGUFBudget:
    """The GGUF budget of exactly `target_bytes` (NotRun, naming the smallest and largest file mixbits
    can write over these types, where no plan reaches it)."""
    p = bench.p
    try:
        found = gguf_budget(_cfg(bench, target_bytes), p.model, p.tokenizer, p.shapes, p.groups, p.constraints)
    except BudgetInfeasible as err:
        raise NotRun(f"no mixbits GGUF file of {target_bytes} bytes: {err}") from None
    return dataclasses.replace(found, target_bytes=target_bytes)


@dataclass(frozen=True)
class GGUFFile:
    path: Path
    plan: Plan
    predicted_bytes: int
    seconds: float  # solving, quantizing and writing (0 when the file was already there)


def solve(bench, target_bytes: int, quantizer: str) -> GGUFFile:
    """The optimal plan over the ggml types at or below `target_bytes` of GGUF file, quantized by
    `quantizer` and written; a file already written for this target and quantizer is reused.
    RuntimeError if the written file's bytes differ from the prediction."""
    folder = bench.out / ARM / f"{quantizer}-{target_bytes}"
    path, plan_path = folder / "model.gguf", folder / "plan.json"
    if path.is_file() and plan_path.is_file():
        plan = Plan.load(plan_path)
        return GGUFFile(path, plan, plan.meta["gguf"]["file_bytes"], 0.0)
    began = time.perf_counter()
    b = budget(bench, target_bytes)
    specs, _ = allocate_optimal(b.priced(table(bench)), bench.p.groups, b.budget_bits(), bench.p.constraints)
    plan = b.record(Plan(specs, {"strategy": "optimal", "budget": f"{target_bytes} bytes of GGUF file",
                                 "sensitivity": DAMAGE, "quantizer": quantizer}))
    predicted = plan.meta["gguf"]["file_bytes"]
    if predicted > target_bytes:
        raise RuntimeError(f"the plan's file would be {predicted} bytes, above the target {target_bytes}")
    model, report = quantize_model(bench.p.model, plan, quantizer=quantizer, device=bench.p.device, progress=False,
                                   windows=None if quantizer == "rtn" else bench.calib, gptq=bench.cfg.gptq)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "tmp" / "model.gguf"  # the stem is general.name, which the size counts: "model"
    tmp.parent.mkdir(exist_ok=True)
    write_gguf(model, plan, tmp, bench.p.tokenizer, qparams=report.qparams, tokenizer_pre=pre(bench))
    del model
    written = tmp.stat().st_size
    if written != predicted:
        raise RuntimeError(f"{tmp} has {written} bytes, the prediction {predicted}")
    plan.save(plan_path)
    tmp.rename(path)
    tmp.parent.rmdir()
    return GGUFFile(path, plan, predicted, time.perf_counter() - began)


def rows(bench) -> list[Row]:
    quantizer = bench.args.gguf_quantizer
    out = []
    for qtype in bench.args.llamacpp_types:
        settings = {"matches": f"{PEER}/{qtype}", "target": f"the whole file bytes of {PEER}/{qtype}",
                    "candidates": "the ggml types each row allows (K-quants on rows of 256-multiples)",
                    "quantizer": QUANTIZERS[quantizer], "damage": DAMAGE,
                    "calibration": "the windows llama-imatrix read for the preset",
                    "embeddings_and_head": "F16 in both files"}
        row = Row(ARM, qtype, settings, lambda: None)
        row.build = _builder(bench, qtype, quantizer)
        out.append(row)
    return out


def _counts(plan: Plan) -> dict:
    counts = {}
    for spec in plan.specs.values():
        counts[spec.label] = counts.get(spec.label, 0) + 1
    return dict(sorted(counts.items()))


def _builder(bench, qtype: str, quantizer: str):
    def build() -> Built:
        from mixbits.eval.llamacpp import LlamaCppLM

        bin_dir = quality_llamacpp.tools(build=bench.args.build_llamacpp)
        preset, _ = quality_llamacpp.preset_file(bench, bin_dir, qtype, use_imatrix=True)
        target = preset.stat().st_size
        made = solve(bench, target, quantizer)
        n_bytes, weights, kinds = quality_llamacpp.linear_bytes(made.path, bin_dir)
        if weights != bench.n_weights:
            raise RuntimeError(f"{made.path} holds {weights} block-linear weights, the model {bench.n_weights}")
        extra = {"types": kinds, "plan": _counts(made.plan), "file": str(made.path.relative_to(bench.out)),
                 "file_bytes": made.path.stat().st_size, "target_file_bytes": target,
                 "predicted_file_bytes": made.predicted_bytes, "solve_s": round(made.seconds, 1),
                 "llama_cpp_python": quality_llamacpp.llama_cpp_version()}
        log.info("%s/%s: %s", ARM, qtype, json.dumps({k: extra[k] for k in ("file_bytes", "target_file_bytes")}))
        return Built(LlamaCppLM(made.path, n_ctx=bench.windows_seqlen), n_bytes, extra)

    return build
