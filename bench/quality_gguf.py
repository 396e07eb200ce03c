"""The `mixbits-gguf` arm: mixbits' plans over the GGUF types at the exact file size of each llama.cpp preset.

For every preset of `--llamacpp-types` (issue 16 asks for Q2_K, Q3_K_S/M/L, Q4_K_S/M, Q5_K_S/M, Q6_K):

1. The preset's file is the `llamacpp-imatrix` row's own file (`quality_llamacpp`: llama-quantize of
   the F16 GGUF with the importance matrix llama-imatrix computed on the calibration windows),
   made once and shared by both rows. Its **whole file bytes** are the target.
2. mixbits solves the optimal plan over the ggml types each row allows (`--candidates gguf`:
   K-quants on rows of 256-multiples, the legacy 32-block types elsewhere), every option priced at
   its bytes in the GGUF file mixbits writes (`jobs.gguf_budget`: the fixed part, i.e. token
   embedding and untied head in F16, norms in F32, header, metadata with the tokenizer, is exact;
   each linear at its padded bytes), at or below the target. Damage: the Fisher damage of every
   ggml type (`--damage rtn`), ½ Σ F (w − q(w))², estimated on `--gguf-damage-rows` strided rows
   of each layer and scaled to its rows (the ggml grid search on every row of every type takes
   hours on 2 shared cores; the rows of a layer are quantized independently, so the sample is
   exact for its rows), once for every preset (saved as `mixbits-gguf/damage.json`).
3. The plan is quantized by `--gguf-quantizer` on the same calibration windows llama-imatrix read
   (`bench.calib`): clip (default) chooses each layer's grid (sub-block scales and mins) with
   importance a = diag(XᵀX) of the original model's inputs to the layer on those windows, which
   is what llama.cpp's imatrix holds, and rounds to nearest; gptq adds GPTQ's error feedback on
   that grid, blockwise in sequence (`quantize_model`, about 4x the time); rtn chooses the grid
   with uniform importance; blockap-clip / blockap-gptq start from clip / gptq and train each block
   with Block-AP on its ggml grids (`train.run.train_model`; `--train-windows`, `--train-val-windows`,
   `--train-seqlen`, `--train-epochs` from the calibration / validation splits; no E2E-QP, which
   trains affine step sizes only).
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

import numpy as np
import torch

from quality_rows import Built, NotRun, Row
import quality_llamacpp
import quality_mixbits
from mixbits.allocate.feasibility import BudgetInfeasible
from mixbits.allocate.optimal import allocate_optimal
from mixbits.config import AllocationConfig
from mixbits.export.gguf import write_gguf
from mixbits.jobs.gguf_budget import GGUFBudget, gguf_budget
from mixbits.model.arch import get_weight
from mixbits.model.hooks import input_square_sums
from mixbits.model.quantize import quantize_model
from mixbits.plan import Plan
from mixbits.quant import kquant
from mixbits.sensitivity.fisher import empirical_fisher, fisher_damage
from mixbits.sensitivity.table import DamageTable
from mixbits.train.run import train_model
from mixbits.train.windows import training_windows

log = logging.getLogger("quality")

ARM = "mixbits-gguf"
PEER = "llamacpp-imatrix"
QUANTIZERS = {"clip": "round to nearest on each ggml grid chosen with importance diag(XᵀX) of the original's inputs "
                      "(what llama.cpp's imatrix holds)",
              "gptq": "GPTQ on each ggml grid (grid chosen with importance diag(XᵀX), then error feedback)",
              "rtn": "round to nearest on each ggml grid chosen with uniform importance",
              "blockap-clip": "Block-AP on each ggml grid (latent weights, sub-block scales and mins; super-block "
                              "scales fixed) from the clip start (grid chosen with importance diag(XᵀX) of the "
                              "quantized model's inputs, round to nearest)",
              "blockap-gptq": "Block-AP on each ggml grid from the GPTQ start"}


def _cfg(bench, target_bytes: int | None = None):
    """`mixbits run --candidates gguf --target-size-mb <target> --damage rtn --gguf-pre <pre>` on the bench's data."""
    size = (target_bytes or 1) / 1e6
    return dataclasses.replace(bench.cfg, quantizer="rtn", damage="rtn", gguf_pre=pre(bench),
                               allocation=AllocationConfig(target_size_mb=size, candidates="gguf"))


def pre(bench) -> str:
    return quality_llamacpp.TOKENIZER_PRE.get(bench.args.model, "default")


def damage_method(rows: int) -> str:
    return f"fisher (--damage rtn) on {rows} strided rows per layer, scaled to its rows"


def table(bench) -> DamageTable:
    """The Fisher damage of every ggml type each linear allows, on `--gguf-damage-rows` strided rows
    of each layer scaled to all of them (module docstring); computed once, kept in OUT/mixbits-gguf."""
    rows = bench.args.gguf_damage_rows
    path = bench.out / ARM / "damage.json"
    if "gguf_table" in bench.memo:
        return bench.memo["gguf_table"]
    configs = _cfg(bench).allocation.configs()
    if path.is_file():
        found = DamageTable.load(path)  # reused only for the same rows, layers and types (a type added since: not)
        if found.method == damage_method(rows) and found.units == tuple(bench.p.linears) and found.configs == configs:
            bench.memo["gguf_table"] = found
            return found
    fisher = empirical_fisher(bench.p.model, bench.calib, bench.p.linears, device=bench.p.device, progress=False)
    damage = np.zeros((len(bench.p.linears), len(configs)))
    for u, name in enumerate(bench.p.linears):
        weight = get_weight(bench.p.model.get_submodule(name)).detach()
        damage[u] = fisher_damage(weight, fisher.pop(name), configs, damage_rows=rows)  # sampled as `mixbits run`
    found = DamageTable(tuple(bench.p.linears), tuple(bench.p.shapes[n] for n in bench.p.linears), tuple(configs),
                        damage, damage_method(rows))
    path.parent.mkdir(parents=True, exist_ok=True)
    found.save(path)
    bench.memo["gguf_table"] = found
    return found


def importance(bench) -> dict[str, torch.Tensor]:
    """diag(XᵀX) per linear: the sum over the calibration windows of the squared inputs of each
    input channel, in the original model (llama.cpp's imatrix is this, per token averaged)."""
    path = bench.out / ARM / "importance.pt"
    if "gguf_importance" not in bench.memo and path.is_file():
        bench.memo["gguf_importance"] = torch.load(path)
    if "gguf_importance" not in bench.memo:
        bench.memo["gguf_importance"] = input_square_sums(bench.p.model, list(bench.p.shapes), bench.calib)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(bench.memo["gguf_importance"], path)
    return bench.memo["gguf_importance"]


def quantized(bench, plan: Plan, quantizer: str) -> tuple[object, dict]:
    """(model to write, qparams by layer): clip and rtn choose each ggml layer's grid from the
    original weight (with `importance` for clip) and the writer takes the codes nearest to it on
    that grid, which is the weight `quantize_ggml` makes; gptq goes through `quantize_model`."""
    if quantizer.startswith("blockap-"):
        cfg = quality_mixbits.train_config(bench, quantizer.split("-", 1)[1])
        windows = training_windows(bench.p.tokenizer, dataclasses.replace(cfg, e2e=False))
        model, report = train_model(bench.p.model, plan, windows["calibration"], windows["validation"],
                                    dataclasses.replace(cfg, e2e=False), device=bench.p.device, progress=False,
                                    resume=True, gptq=bench.cfg.gptq,
                                    checkpoint_dir=bench.out / ARM / "checkpoints" / f"{quantizer}-{plan.meta['gguf']['file_bytes']}")
        return model, dict(report.qparams)
    if quantizer == "gptq":
        model, report = quantize_model(bench.p.model, plan, quantizer="gptq", device=bench.p.device, progress=False,
                                       windows=bench.calib, gptq=bench.cfg.gptq)
        return model, dict(report.qparams)
    a = importance(bench) if quantizer == "clip" else {}
    params = {}
    for name, spec in plan.quantized().items():
        w = get_weight(bench.p.model.get_submodule(name)).detach().float()
        params[name] = kquant.choose_params(w, spec, a.get(name))
    return bench.p.model, params


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
    damage = table(bench)
    specs, _ = allocate_optimal(b.priced(damage), bench.p.groups, b.budget_bits(), bench.p.constraints)
    plan = b.record(Plan(specs, {"strategy": "optimal", "budget": f"{target_bytes} bytes of GGUF file",
                                 "sensitivity": damage.method, "quantizer": quantizer}))
    predicted = plan.meta["gguf"]["file_bytes"]
    if predicted > target_bytes:
        raise RuntimeError(f"the plan's file would be {predicted} bytes, above the target {target_bytes}")
    same = _written(bench.out / ARM, quantizer, plan)
    if same is not None:  # a larger target that leaves the same plan: the same file
        return GGUFFile(same, plan, predicted, time.perf_counter() - began)
    model, qparams = quantized(bench, plan, quantizer)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "tmp" / "model.gguf"  # the stem is general.name, which the size counts: "model"
    tmp.parent.mkdir(exist_ok=True)
    write_gguf(model, plan, tmp, bench.p.tokenizer, qparams=qparams, tokenizer_pre=pre(bench))
    del model
    written = tmp.stat().st_size
    if written != predicted:
        raise RuntimeError(f"{tmp} has {written} bytes, the prediction {predicted}")
    plan.save(plan_path)
    tmp.rename(path)
    tmp.parent.rmdir()
    return GGUFFile(path, plan, predicted, time.perf_counter() - began)


def _written(root: Path, quantizer: str, plan: Plan) -> Path | None:
    """A file this quantizer already wrote for the same plan (another target that solved to it)."""
    for found in sorted(root.glob(f"{quantizer}-*/plan.json")):
        if dict(Plan.load(found).specs) == dict(plan.specs) and (found.parent / "model.gguf").is_file():
            return found.parent / "model.gguf"
    return None


def rows(bench) -> list[Row]:
    quantizer = bench.args.gguf_quantizer
    out = []
    for qtype in bench.args.llamacpp_types:
        settings = {"matches": f"{PEER}/{qtype}", "target": f"the whole file bytes of {PEER}/{qtype}",
                    "candidates": "the ggml types each row allows (K-quants on rows of 256-multiples)",
                    "quantizer": QUANTIZERS[quantizer], "damage": damage_method(bench.args.gguf_damage_rows),
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
