"""GPTQ checkpoints with per-module `dynamic` overrides: the format GPTQModel writes and vLLM
and SGLang read, carrying a mixed plan with mixbits' own codes, scales and zero-points.

Layout, per quantized linear (W_hat[o, i] = scales[g, o] * (q[i, o] - z[g, o]), g = g_idx[i]):
    qweight  int32 [in * b / 32, out]  column o is the bit stream of codes q[o, 0..in) along the
                                       input dimension, code i at bits [i*b, (i+1)*b) counted
                                       LSB-first over consecutive words; 3-bit codes span words
                                       (32 codes in 3 words), exactly as GPTQ packs them
    qzeros   int32 [G, out * b / 32]   row g is the bit stream of the stored zero-points
    scales   float16 [G, out]
    g_idx    int32 [in]                i // group_size (0 everywhere for per-channel)
    bias     float16 [out] when the layer has one
Other tensors (embeddings, norms, kept layers as plain `weight`) are float16.

Zero-points, `checkpoint_format` "gptq" (v1, the default): qzeros holds z - 1, the historical
GPTQ convention that every v1 loader undoes by adding 1. Symmetric mixbits specs have
z = 2**(b-1), which is GPTQ's own symmetric zero, so they are written exactly. An asymmetric
group with z = 0 (all its weights >= -scale/2) has no v1 encoding; such groups alone are
re-fitted with z = 1 and a scale covering their range (logged, counted in
mixbits-export.json). "gptq_v2" stores z itself and keeps every group exactly, but only
GPTQModel and recent vLLM (non-Marlin kernels) read it.

quantization_config: global bits / group_size / sym are the plan's most common spec; every
unit (a single linear, or a fused q/k/v or gate/up group) that differs gets a `dynamic` entry
"+:<regex>" -> {bits, group_size, sym, desc_act}, and every unit kept in 16 bit "-:<regex>"
(skip). Engines match the regex with `re.match` against the module name; the regex names the
unit exactly (anchored with `$`) and, for fused groups, also vLLM's fused module
(`qkv_proj`, `gate_up_proj`), which is why fused layers must share one spec.

Who loads it: GPTQModel (`GPTQModel.load(dir)`, CPU included), vLLM and SGLang, which all
honour `dynamic`. GPTQModel (7.7) refuses an asymmetric v1 file unless its meta names GPTQModel
>= 0.9 as the quantizer (old AutoGPTQ v1 asymmetric files were broken), so for GPTQModel write
asymmetric plans as "gptq_v2": it loads them on CPU with its TorchLinear kernel, in float16
(`export/roundtrip.py`; the same files with that meta entry load too, and match). Plain
transformers does not load mixed-bit GPTQ: its GPTQ path needs optimum and GPTQModel for any
GPTQ file and does not document `dynamic`, so load mixed files with GPTQModel itself, vLLM or
SGLang (this CPU test suite runs GPTQModel only when it is installed). vLLM's fast
Marlin/Machete kernels take only 4- and 8-bit symmetric layers; vLLM chooses Marlin from the
global config alone, so when the global spec is 4/8-bit symmetric but a `dynamic` entry asks
for 2 or 3 bits or asymmetric codes, load with `quantization="gptq"` (the slower gptq_gemm
kernel, which takes 2, 3, 4 and 8 bits).
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from mixbits.errors import UserError
from mixbits.export.from_native import StoredSource, model_source
from mixbits.export.hf_stream import write_streamed_folder
from mixbits.export.rules import ExportError, Rules, require_expressible
from mixbits.export.shard_file import TensorMeta
from mixbits.export.tensors import StoredLayer, export_config, pack_int32
from mixbits.model.apply import layer_shapes
from mixbits.model.arch import find_linears, tied_groups
from mixbits.plan import Plan
from mixbits.quant.affine import FP16_MAX, FP16_TINY, QParams, group_view, quantize
from mixbits.quant.groups import effective_group_size, num_groups
from mixbits.quant.spec import KEEP, QuantSpec

log = logging.getLogger(__name__)

RULES = Rules("gptq", bits=(2, 3, 4, 8), whole_groups=True, word_bits=32, fused_alike=True)
CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
VLLM_FUSED = {("q_proj", "k_proj", "v_proj"): "qkv_proj", ("gate_proj", "up_proj"): "gate_up_proj"}


def refit_zero_groups(weight: Tensor, qp: QParams, spec: QuantSpec) -> tuple[QParams, int]:
    """QParams with every group of zero-point 0 re-fitted to z = 1 (GPTQ v1 cannot store z = 0).

    Such a group's weights satisfy -s/2 < min; with z = 1 the grid (q - 1) * s' spans
    [-s', (maxq - 1) * s'], so s' = max(max / (maxq - 1), -min) covers them. Other groups keep
    their parameters. Returns the new QParams and how many groups changed.
    """
    zero_groups = qp.zero == 0
    count = int(zero_groups.sum())
    if count == 0:
        return qp, 0
    g = group_view(weight.detach().float().cpu(), spec.group_size)
    wmax, wmin = g.amax(dim=-1).clamp(min=0.0), g.amin(dim=-1).clamp(max=0.0)
    refit = torch.maximum(wmax / (spec.maxq - 1), -wmin).clamp(FP16_TINY, FP16_MAX).half().float()
    scale = torch.where(zero_groups, refit, qp.scale)
    zero = torch.where(zero_groups, torch.ones_like(qp.zero), qp.zero)
    return QParams(scale=scale, zero=zero), count


def gptq_tensors(codes: Tensor, qp: QParams, spec: QuantSpec, zero_offset: int) -> dict[str, Tensor]:
    """qweight, qzeros, scales, g_idx of one layer from its codes [out, in] and QParams [out, G]."""
    out_features, in_features = codes.shape
    stored_zero = (qp.zero - zero_offset).round().to(torch.uint8)
    gs = effective_group_size(in_features, spec.group_size)
    return {
        "qweight": pack_int32(codes, spec.bits).t().contiguous(),
        "qzeros": pack_int32(stored_zero.t().contiguous(), spec.bits),
        "scales": qp.scale.t().to(torch.float16).contiguous(),
        "g_idx": (torch.arange(in_features) // gs).to(torch.int32),
    }


def unit_pattern(names: Sequence[str]) -> str:
    """A regex that `re.match`es exactly these modules (and vLLM's fused name for them)."""
    if len(names) == 1:
        return re.escape(names[0]) + "$"
    parents = {n.rpartition(".")[0] for n in names}
    if len(parents) != 1:
        return "(?:" + "|".join(re.escape(n) for n in names) + ")$"
    leaves = tuple(n.rpartition(".")[2] for n in names)
    fused = VLLM_FUSED.get(leaves)
    alternatives = [*leaves, fused] if fused else list(leaves)
    return re.escape(parents.pop()) + r"\.(?:" + "|".join(re.escape(a) for a in alternatives) + ")$"


def _entry(spec: QuantSpec) -> dict:
    return {"bits": spec.bits, "group_size": spec.group_size or -1, "sym": spec.symmetric, "desc_act": False}


def quantization_config(plan: Plan, units: Sequence[Sequence[str]], checkpoint_format: str) -> dict:
    """GPTQModel's quantization_config: the most common spec as the base, `dynamic` for the rest."""
    counts = Counter(spec for spec in plan.quantized().values())
    if not counts:
        raise ExportError("the plan quantizes no layer, so there is nothing to write as GPTQ; export it as native")
    base = counts.most_common(1)[0][0]
    dynamic = {}
    for unit in units:
        spec = plan.specs.get(unit[0], KEEP)
        if spec.keep:
            dynamic["-:" + unit_pattern(unit)] = {}
        elif spec != base:
            dynamic["+:" + unit_pattern(unit)] = _entry(spec)
    return {
        "quant_method": "gptq", **_entry(base), "lm_head": False, "true_sequential": True, "static_groups": False,
        "checkpoint_format": checkpoint_format, "pack_dtype": "int32", "dynamic": dynamic,
        "meta": {"quantizer": ["mixbits"], "zero_point": "z - 1 in qzeros" if checkpoint_format == "gptq" else "z"},
    }


def _layer_tensors(name: str, layer: StoredLayer, checkpoint_format: str) -> tuple[dict, int]:
    spec, qp, codes = layer.spec, layer.qparams, layer.codes
    refitted = 0
    if checkpoint_format == "gptq":
        qp, refitted = refit_zero_groups(layer.weight, qp, spec)
        if refitted:
            codes = quantize(layer.weight, qp, spec)
    offset = 1 if checkpoint_format == "gptq" else 0
    tensors = {f"{name}.{k}": v for k, v in gptq_tensors(codes, qp, spec, offset).items()}
    if layer.bias is not None:
        tensors[f"{name}.bias"] = layer.bias
    return tensors, refitted


def gptq_metas(name: str, shape: tuple[int, int], spec: QuantSpec, has_bias: bool) -> dict[str, TensorMeta]:
    """The tensors `gptq_tensors` (and the bias) give for a layer of `shape` = (out, in), from shapes alone."""
    out_features, in_features = shape
    groups = num_groups(in_features, spec.group_size)
    metas = {f"{name}.qweight": TensorMeta((math.ceil(in_features * spec.bits / 32), out_features), torch.int32),
             f"{name}.qzeros": TensorMeta((groups, math.ceil(out_features * spec.bits / 32)), torch.int32),
             f"{name}.scales": TensorMeta((groups, out_features), torch.float16),
             f"{name}.g_idx": TensorMeta((in_features,), torch.int32)}
    if has_bias:
        metas[f"{name}.bias"] = TensorMeta((out_features,), torch.float16)
    return metas


def write_gptq(
    model: nn.Module,
    plan: Plan,
    path: str | Path,
    tokenizer=None,
    qparams: Mapping[str, QParams] | None = None,
    *,
    checkpoint_format: str = "gptq",
) -> Path:
    """Write `model` quantized by `plan` as a GPTQ folder at `path`; see the module docstring."""
    return write_gptq_from(model_source(model, plan, qparams, tokenizer), path, checkpoint_format=checkpoint_format)


def write_gptq_from(source: StoredSource, path: str | Path, *, checkpoint_format: str = "gptq") -> Path:
    """Write `source` (a native folder or a model, `from_native`) as a GPTQ folder, block by block:
    each block's layers are read, converted and appended, then released. Peak: one block."""
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise UserError(f"checkpoint_format={checkpoint_format!r}; use 'gptq' (v1, widest support) or 'gptq_v2'")
    plan, structure = source.plan, source.structure
    units = tied_groups(structure, find_linears(structure))
    shapes = layer_shapes(structure)
    require_expressible(RULES, plan, shapes, [u for u in units if len(u) > 1])
    config = quantization_config(plan, units, checkpoint_format)
    parts = source.parts()
    metas = [{k: m for n in source.part_layers(part)
              for k, m in gptq_metas(n, shapes[n], plan.specs[n], n in source.biases).items()}
             | source.part_plain_metas(part) for part in parts]
    refitted: dict[str, int] = {}

    def produce(i: int) -> dict[str, Tensor]:
        read = source.read(parts[i])
        tensors = dict(read.plain)
        for name, layer in read.layers.items():
            own, count = _layer_tensors(name, layer, checkpoint_format)
            tensors.update(own)
            if count:
                refitted[name] = count
        return tensors

    def side() -> dict:
        if refitted:
            log.warning("GPTQ v1 cannot store a zero-point of 0: re-fitted %d group(s) in %d layer(s) with zero-point "
                        "1 (checkpoint_format='gptq_v2' keeps them exactly)", sum(refitted.values()), len(refitted))
        return {"quantize_config.json": config,
                "mixbits-export.json": {"format": "gptq", "plan": plan.to_dict(), "refitted_zero_groups": refitted}}

    return write_streamed_folder(path, export_config(source.config, config), metas, produce, source.tokenizer, side,
                                 kind="gptq")
