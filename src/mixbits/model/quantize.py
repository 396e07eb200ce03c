"""Quantize a model by a plan with a chosen quantizer: round-to-nearest, clip search, or GPTQ.

Every quantizer writes, per planned linear, weights Q = (codes - z) * s in fake-quant form and
returns the `QParams` (s, z) that reproduce them exactly, so `save_native(model, plan, path,
qparams=report.qparams)` stores these very codes:

* ``rtn``  — min-max parameters, round to nearest (`quant.affine`); needs no data.
* ``clip`` — per-group clip search (`quant.clip.search_qparams`), weighted by a_j = H_jj, the
  diagonal of the layer's input Gram matrix (llama.cpp's imatrix) when windows are given, plain
  weight MSE otherwise.
* ``gptq`` — GPTQ (`quant.gptq`), which needs H = X^T X of each layer's calibration inputs.

A plan's ggml types (GGUF K-quants and legacy types) go the same three ways on their own grids
(`quantize_ggml`, `quant.kquant`) and report `GGMLParams` instead of `QParams`.

With windows the model is processed the standard sequential GPTQ way (`model.blockwise`): the
inputs of block 0 are captured once; for each block, forward pre-hooks on its planned linears
accumulate H over all windows (linears fed the very same tensor, q/k/v and gate/up, share one
H), each linear is quantized and written in place, and the block is run again, now quantized,
to give the next block its inputs. Block i is therefore calibrated on the outputs of the
already quantized blocks < i, and the report gives per layer the output error per token

    e = tr((W - Q) H (W - Q)^T) / T

of min-max RTN and of the chosen quantizer on those inputs. The clip importance comes from
these sequential inputs too (llama.cpp's imatrix uses the original model's; the difference is
second order). `true_sequential=True` also runs the layers of one block in order: H of each
group of linears sharing an input (q/k/v, o, gate/up, down) is collected after the groups
before it are quantized; one more forward of the block per group, usually slightly better.

Act-order GPTQ (`GPTQConfig.act_order`) makes groups runs of *processed* columns, which
per-natural-group QParams cannot describe; such layers get their `g_idx` in the report and
a warning, and the native export would re-round them. Use act_order=False (the default), or
act_order with static_groups=True, whenever the model will be exported.

Trade-off: rtn costs nothing; clip ~60 fake-quantizations per layer; gptq O(in^3 + out in^2)
per layer plus two forward passes of every block over the windows (plus the captured
activations, n * seq * hidden floats, kept on `store`). Other tensors (embeddings, norms,
biases, kept layers) are rounded through `storage_dtype` first, as the export stores them.
Sources: Frantar et al. 2022 (GPTQ) and its reference code; llama.cpp imatrix; AWQ auto_clip.

`quantize_model` makes a whole quantized copy: it is the reference path (`RunConfig.stream=False`,
iterative mode, --qat). `mixbits run` streams instead (`model.quantize_streamed`: the same
`quantize_layer` and `block_grams`, one block materialized at a time, no copy).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from mixbits.model.apply import layer_shapes, round_to_storage
from mixbits.config import QUANTIZERS
from mixbits.model.arch import find_blocks, find_linears, get_weight, set_weight
from mixbits.model.blockwise import BlockInputs, block_forward, block_on, capture_block_inputs
from mixbits.model.hooks import SharedInputGrams, input_hooks
from mixbits.plan import Plan
from mixbits.quant.affine import QParams, dequantize, fake_quantize, minmax_qparams, quantize
from mixbits.quant.clip import search_qparams
from mixbits.quant import kquant
from mixbits.quant.gptq import GPTQConfig, gptq_quantize
from mixbits.quant.gram import output_error
from mixbits.quant.kquant import GGMLParams
from mixbits.quant.spec import GGMLSpec, QuantSpec

log = logging.getLogger(__name__)

__all__ = ["LayerQuant", "LayerReport", "QuantizeReport", "block_grams", "params_on_cpu", "quantize_ggml",
           "quantize_layer", "quantize_model", "quantize_weight"]

def check_quantizer(quantizer: str) -> str:
    if quantizer not in QUANTIZERS:
        raise ValueError(f"quantizer={quantizer!r} is not known; use one of {', '.join(QUANTIZERS)}")
    return quantizer


@dataclass(frozen=True, eq=False)
class LayerQuant:
    """One quantized weight. weight: float32 [out, in] = dequantize(codes, qparams) unless g_idx
    is set (act-order: column j uses group g_idx[j]). error / rtn_error: tr(ΔHΔᵀ) (a sum over
    the tokens H sums) of this quantizer / of min-max RTN; None without H."""

    weight: Tensor
    qparams: QParams | GGMLParams
    g_idx: Tensor | None = None
    perm: Tensor | None = None
    error: float | None = None
    rtn_error: float | None = None


def quantize_weight(
    w: Tensor, spec: QuantSpec, quantizer: str, *, H: Tensor | None = None, gptq: GPTQConfig = GPTQConfig()
) -> LayerQuant:
    """Quantize w [out, in] (float) with `quantizer`; H [in, in] = XᵀX (required for gptq).

    A ggml type (`GGMLSpec`) is quantized by `quantize_ggml` and reports its `GGMLParams`."""
    check_quantizer(quantizer)
    if spec.keep:
        raise ValueError(f"spec {spec.label!r} keeps the layer in 16 bits; there is nothing to quantize")
    w = w.detach().float()
    if isinstance(spec, GGMLSpec):
        return quantize_ggml(w, spec, quantizer, H=H, gptq=gptq)
    if quantizer == "gptq":
        if H is None:
            raise ValueError("quantizer='gptq' needs H = XᵀX of the layer's inputs; pass calibration windows")
        res = gptq_quantize(w, H, spec, gptq)
        natural = res.perm is None or gptq.static_groups
        return LayerQuant(res.weight, res.qparams, None if natural else res.g_idx, None if natural else res.perm,
                          res.error, res.rtn_error)
    if quantizer == "clip":
        importance = None if H is None else torch.diagonal(H).to(w.device, torch.float32)
        qp = search_qparams(w, spec, importance=importance)
    else:
        qp = minmax_qparams(w, spec)
    weight = dequantize(quantize(w, qp, spec), qp, spec)
    if H is None:
        return LayerQuant(weight, qp)
    error = output_error(w, weight, H)
    rtn = error if quantizer == "rtn" else output_error(w, fake_quantize(w, spec), H)
    return LayerQuant(weight, qp, error=error, rtn_error=rtn)


def quantize_ggml(
    w: Tensor, spec: GGMLSpec, quantizer: str, *, H: Tensor | None = None, gptq: GPTQConfig = GPTQConfig()
) -> LayerQuant:
    """w [out, in] float32 on a ggml type's grid (`quant.kquant`): rtn chooses the sub-block scales
    and mins with uniform importance, clip with importance diag(H) (llama.cpp's imatrix; uniform
    without H), gptq keeps that grid fixed and adds error feedback (`gptq_ggml`). The qparams are
    the `GGMLParams` the GGUF writer packs, so it stores exactly these codes. rtn_error is that of
    the uniform-importance grid, the ggml counterpart of min-max RTN."""
    if quantizer == "gptq":
        if H is None:
            raise ValueError("quantizer='gptq' needs H = XᵀX of the layer's inputs; pass calibration windows")
        res = kquant.gptq_ggml(w, H, spec, gptq)
        rtn = output_error(w, kquant.fake_quantize(w, spec), H)
        return LayerQuant(res.weight, res.params, error=res.error, rtn_error=rtn)
    importance = None if quantizer == "rtn" or H is None else torch.diagonal(H).to(w.device, torch.float32).clamp(min=0)
    params = kquant.choose_params(w, spec, importance)
    weight = kquant.dequantize(kquant.quantize(w, params), params)
    if H is None:
        return LayerQuant(weight, params)
    error = output_error(w, weight, H)
    rtn = error if quantizer == "rtn" else output_error(w, kquant.fake_quantize(w, spec), H)
    return LayerQuant(weight, params, error=error, rtn_error=rtn)


def params_on_cpu(qparams: QParams | GGMLParams) -> QParams | GGMLParams:
    """A layer's qparams (affine or ggml) moved to the CPU, as reports keep them."""
    if isinstance(qparams, GGMLParams):
        return GGMLParams(qparams.spec, *(t.cpu() for t in (qparams.d, qparams.dmin, qparams.sc, qparams.mn)))
    return QParams(qparams.scale.cpu(), qparams.zero.cpu())


@dataclass(frozen=True)
class LayerReport:
    """spec label; output errors per token (None without windows); seconds spent on the layer."""

    spec: str
    rtn_error: float | None
    error: float | None
    seconds: float

    def to_dict(self) -> dict:
        return {"spec": self.spec, "rtn_error": self.rtn_error, "error": self.error, "seconds": self.seconds}


@dataclass(frozen=True, eq=False)
class QuantizeReport:
    """What `quantize_model` did. qparams: layer -> QParams (CPU) reproducing the written weights;
    g_idx: only act-order layers whose groups are not the natural ones; tokens: calibration
    tokens per layer (0 without windows)."""

    quantizer: str
    layers: Mapping[str, LayerReport]
    qparams: Mapping[str, QParams | GGMLParams]
    g_idx: Mapping[str, Tensor] = field(default_factory=dict)
    tokens: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"quantizer": self.quantizer, "tokens": self.tokens, "seconds": self.seconds,
                "layers": {n: r.to_dict() for n, r in self.layers.items()}}


class _Recorder:
    """Writes each quantized layer into the model and keeps its report, qparams and g_idx."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.layers: dict[str, LayerReport] = {}
        self.qparams: dict[str, QParams | GGMLParams] = {}
        self.g_idx: dict[str, Tensor] = {}

    def __call__(self, name: str, spec: QuantSpec, quantizer: str, device: torch.device,
                 H: Tensor | None = None, tokens: int = 0, gptq: GPTQConfig = GPTQConfig()) -> None:
        module = self.model.get_submodule(name)
        weight = get_weight(module)
        lq, self.layers[name] = quantize_layer(weight, spec, quantizer, device, H=H, tokens=tokens, gptq=gptq)
        set_weight(module, lq.weight.to(device=weight.device, dtype=weight.dtype))
        self.qparams[name] = params_on_cpu(lq.qparams)
        if lq.g_idx is not None:
            self.g_idx[name] = lq.g_idx.cpu()


def quantize_layer(weight: Tensor, spec: QuantSpec, quantizer: str, device: torch.device, *, H: Tensor | None = None,
                   tokens: int = 0, gptq: GPTQConfig = GPTQConfig()) -> tuple[LayerQuant, LayerReport]:
    """`quantize_weight` of `weight` [out, in] on `device`, and its report (errors per token of the
    `tokens` that H sums; None without them). Shared by the whole-model and the streamed quantizer."""
    start = time.perf_counter()
    lq = quantize_weight(weight.to(device), spec, quantizer, H=H, gptq=gptq)
    per_token = (lambda e: None if e is None else e / tokens) if tokens else (lambda e: None)
    return lq, LayerReport(spec.label, per_token(lq.rtn_error), per_token(lq.error), time.perf_counter() - start)


@torch.no_grad()
def block_grams(model: nn.Module, block: nn.Module, names: list[str], inputs: BlockInputs,
                 device: torch.device, limit: int | None = None) -> SharedInputGrams:
    """Run `block` over the first `limit` batches (all by default) with H accumulating for `names`."""
    grams = SharedInputGrams(device)
    with input_hooks(model, names, grams):
        for hidden, args, kwargs in list(zip(inputs.hidden, inputs.args, inputs.kwargs))[:limit]:
            grams.new_pass()
            block_forward(block, BlockInputs((hidden,), (args,), (kwargs,)), device=device)
    missing = [n for n in names if n not in grams.owner]
    if missing:
        raise RuntimeError(f"no input reached {missing[:3]} when running their block; are they used by it?")
    return grams


def _quantize_blocks(model: nn.Module, specs: dict[str, QuantSpec], windows: Tensor, record: _Recorder, *,
                     quantizer: str, device: torch.device, gptq: GPTQConfig, batch_size: int,
                     true_sequential: bool, store: torch.device | str, progress: bool) -> int:
    """The sequential loop of the module docstring; returns the calibration tokens."""
    linears = find_linears(model)
    _, blocks = find_blocks(model)
    inputs = capture_block_inputs(model, windows, batch_size=batch_size, store=store, progress=progress)
    tokens = inputs.n_tokens
    for index, block in enumerate(tqdm(blocks, desc=f"{quantizer} blocks", disable=not progress, leave=False)):
        names = [n for n in specs if linears[n].block == index]
        with block_on(block, device):
            stages = [names] if names else []
            if names and true_sequential:
                stages = block_grams(model, block, names, inputs, device, limit=1).groups()
            for stage in stages:
                grams = block_grams(model, block, stage, inputs, device)
                for name in stage:
                    H = grams.H(name)
                    record(name, specs[name], quantizer, device, H=H, tokens=tokens, gptq=gptq)
                del grams
            if index < len(blocks) - 1:
                inputs = inputs.with_hidden(block_forward(block, inputs, device=device))
    return tokens


def quantize_model(
    model: nn.Module,
    plan: Plan,
    *,
    quantizer: str = "rtn",
    windows: Tensor | None = None,
    device: torch.device | str,
    gptq: GPTQConfig = GPTQConfig(),
    batch_size: int = 1,
    true_sequential: bool = False,
    store: torch.device | str = "cpu",
    storage_dtype: torch.dtype | None = torch.float16,
    progress: bool = True,
) -> tuple[nn.Module, QuantizeReport]:
    """A quantized copy of `model` (the original is untouched) and the report; see the module docstring.

    windows: LongTensor [n, seqlen] of calibration tokens (required for gptq; for rtn and clip
    they add the error report and, for clip, the imatrix weighting). device: where each block
    (or, without windows, each weight) is computed. store: where captured activations wait.
    """
    check_quantizer(quantizer)
    if quantizer == "gptq" and windows is None:
        raise ValueError("quantizer='gptq' needs calibration windows (LongTensor [n, seqlen]); pass windows=")
    plan.validate(layer_shapes(model))
    device = torch.device(device)
    start = time.perf_counter()
    target = copy.deepcopy(model)
    if storage_dtype is not None:
        round_to_storage(target, plan, storage_dtype)
    specs = plan.quantized()
    record = _Recorder(target)
    tokens = 0
    if windows is None:
        for name, spec in tqdm(specs.items(), desc=quantizer, disable=not progress, leave=False):
            record(name, spec, quantizer, device)
    else:
        tokens = _quantize_blocks(target, specs, windows, record, quantizer=quantizer, device=device, gptq=gptq,
                                  batch_size=batch_size, true_sequential=true_sequential, store=store,
                                  progress=progress)
    if record.g_idx:
        log.warning("%d layer(s) were quantized with act-order groups (g_idx); their QParams do not describe "
                    "them and the native export would re-round them; use act_order=False or static_groups=True",
                    len(record.g_idx))
    report = QuantizeReport(quantizer, {n: record.layers[n] for n in specs}, {n: record.qparams[n] for n in specs},
                            record.g_idx, tokens, time.perf_counter() - start)
    _log_summary(report)
    return target, report


def _log_summary(report: QuantizeReport) -> None:
    rows = [r for r in report.layers.values() if r.error is not None and r.rtn_error]
    if rows:
        ratio = sum(r.error for r in rows) / sum(r.rtn_error for r in rows)
        log.info("%s: %d layers in %.1f s; total output error %.3g x that of RTN",
                 report.quantizer, len(report.layers), report.seconds, ratio)
    else:
        log.info("%s: %d layers in %.1f s", report.quantizer, len(report.layers), report.seconds)
