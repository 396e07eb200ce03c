"""compressed-tensors `pack-quantized` checkpoints: the format llm-compressor writes and vLLM
and transformers (with the `compressed-tensors` package) read, one config group per distinct
(bits, group size, symmetry) of the plan, with mixbits' own codes, scales and zero-points.

Layout, per quantized linear [out, in] (W_hat = (q - z) * s per group, as in `quant.affine`):
    weight_packed      int32 [out, ceil(in * b / 32)]   row o is the bit stream of the codes
                                                          q[o, :] (code i at bits [i*b, (i+1)*b))
    weight_scale       float16 [out, G]
    weight_zero_point  int32 [ceil(out * b / 32), G]    asymmetric only: column g is the bit
                                                          stream of z[:, g] (packed along out)
    weight_shape       int64 [2] = (out, in)
    bias               float16 [out] when the layer has one
compressed-tensors' integers are signed, q_s = q - 2**(b-1) and z_s = z - 2**(b-1), and it
packs q_s + 2**(b-1): the stored bits are mixbits' unsigned codes and zero-points unchanged.
A symmetric mixbits spec (z = 2**(b-1)) is compressed-tensors' symmetric scheme (z_s = 0).
Nothing is re-quantized.

Bits: the library (0.20) packs any width 1-8 densely, but vLLM's WNA16 kernels and older
compressed-tensors releases (which packed 32 // b codes per word, a different layout for
3, 5, 6 bits) agree only on 4 and 8 bits, so only 4 and 8 are written; other plans are
refused before writing with the nearest plan. Groups must tile the row (vLLM requires it).

Loading: vLLM (`LLM(dir)`) reads every plan this writes. transformers on CPU (with the
compressed-tensors package) loads symmetric plans, any mix of groups, with a plain
`from_pretrained(dir)`. Asymmetric files are written as vLLM and llm-compressor write them
(zero-points packed), but transformers 5.24 with compressed-tensors 0.20 cannot load them:
its compressed route lays the module's zero-point out unpacked (shape mismatch), and its
`CompressedTensorsConfig(dequantize=True)` route decodes every dense layer with the first
config group's scheme, so it works only for a single-group plan. `compressed_tensors`'
`PackedQuantizationCompressor.decompress` decodes every layer of either kind correctly.
Use symmetric specs (`w4g128s`) when the export must load in transformers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from mixbits.export.from_native import StoredSource, model_source
from mixbits.export.hf_stream import write_streamed_folder
from mixbits.export.rules import ExportError, Rules, require_expressible
from mixbits.export.shard_file import TensorMeta
from mixbits.export.tensors import StoredLayer, export_config, pack_int32
from mixbits.model.apply import layer_shapes
from mixbits.model.arch import find_linears, tied_groups
from mixbits.plan import Plan
from mixbits.quant.affine import QParams
from mixbits.quant.groups import num_groups
from mixbits.quant.spec import QuantSpec

RULES = Rules("compressed", bits=(4, 8), whole_groups=True, fused_alike=True)
FORMAT = "pack-quantized"


def packed_tensors(codes: Tensor, qp: QParams, spec: QuantSpec) -> dict[str, Tensor]:
    """weight_packed, weight_scale, weight_zero_point (asymmetric), weight_shape of one layer."""
    tensors = {
        "weight_packed": pack_int32(codes, spec.bits),
        "weight_scale": qp.scale.to(torch.float16).contiguous(),
        "weight_shape": torch.tensor(tuple(codes.shape), dtype=torch.int64),
    }
    if not spec.symmetric:
        zero = qp.zero.round().to(torch.uint8)
        tensors["weight_zero_point"] = pack_int32(zero.t().contiguous(), spec.bits).t().contiguous()
    return tensors


def _scheme(spec: QuantSpec, targets: list[str]) -> dict:
    weights = {
        "num_bits": spec.bits, "type": "int", "symmetric": spec.symmetric,
        "strategy": "channel" if spec.group_size is None else "group", "group_size": spec.group_size,
        "dynamic": False, "actorder": None, "observer": "minmax",
    }
    return {"targets": targets, "weights": weights, "input_activations": None, "output_activations": None,
            "format": FORMAT}


def quantization_config(plan: Plan) -> dict:
    """One config group per distinct spec, targeting its layers by exact module name."""
    groups: dict[QuantSpec, list[str]] = {}
    for name, spec in plan.quantized().items():
        groups.setdefault(spec, []).append(name)
    if not groups:
        raise ExportError("the plan quantizes no layer, so there is nothing to write as compressed-tensors; "
                          "export it as native")
    return {
        "quant_method": "compressed-tensors", "format": FORMAT, "quantization_status": "compressed",
        "config_groups": {f"group_{i}": _scheme(spec, names) for i, (spec, names) in enumerate(groups.items())},
        "ignore": ["lm_head"], "kv_cache_scheme": None, "global_compression_ratio": None,
    }


def _layer_tensors(name: str, layer: StoredLayer) -> dict[str, Tensor]:
    tensors = {f"{name}.{k}": v for k, v in packed_tensors(layer.codes, layer.qparams, layer.spec).items()}
    if layer.bias is not None:
        tensors[f"{name}.bias"] = layer.bias
    return tensors


def compressed_metas(name: str, shape: tuple[int, int], spec: QuantSpec, has_bias: bool) -> dict[str, TensorMeta]:
    """The tensors `packed_tensors` (and the bias) give for a layer of `shape` = (out, in), from shapes alone."""
    out_features, in_features = shape
    groups = num_groups(in_features, spec.group_size)
    metas = {f"{name}.weight_packed": TensorMeta((out_features, math.ceil(in_features * spec.bits / 32)), torch.int32),
             f"{name}.weight_scale": TensorMeta((out_features, groups), torch.float16),
             f"{name}.weight_shape": TensorMeta((2,), torch.int64)}
    if not spec.symmetric:
        metas[f"{name}.weight_zero_point"] = TensorMeta((math.ceil(out_features * spec.bits / 32), groups), torch.int32)
    if has_bias:
        metas[f"{name}.bias"] = TensorMeta((out_features,), torch.float16)
    return metas


def write_compressed(
    model: nn.Module, plan: Plan, path: str | Path, tokenizer=None, qparams: Mapping[str, QParams] | None = None
) -> Path:
    """Write `model` quantized by `plan` as a compressed-tensors folder at `path`."""
    return write_compressed_from(model_source(model, plan, qparams, tokenizer), path)


def write_compressed_from(source: StoredSource, path: str | Path) -> Path:
    """Write `source` (a native folder or a model, `from_native`) as a compressed-tensors folder,
    block by block: each block is read, converted, appended and released. Peak: one block."""
    plan, structure = source.plan, source.structure
    units = tied_groups(structure, find_linears(structure))
    shapes = layer_shapes(structure)
    require_expressible(RULES, plan, shapes, [u for u in units if len(u) > 1])
    config = quantization_config(plan)
    parts = source.parts()
    metas = [{k: m for n in source.part_layers(part)
              for k, m in compressed_metas(n, shapes[n], plan.specs[n], n in source.biases).items()}
             | source.part_plain_metas(part) for part in parts]

    def produce(i: int) -> dict[str, Tensor]:
        read = source.read(parts[i])
        tensors = dict(read.plain)
        for name, layer in read.layers.items():
            tensors.update(_layer_tensors(name, layer))
        return tensors

    def side() -> dict:
        return {"mixbits-export.json": {"format": "compressed-tensors", "plan": plan.to_dict()}}

    return write_streamed_folder(path, export_config(source.config, config), metas, produce, source.tokenizer, side,
                                 kind="compressed")
