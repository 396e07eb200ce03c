"""Read a run's native folder back as what the exporters take, whole or one block at a time.

This is how an export keeps the codes of any quantizer (round-to-nearest, clip search, GPTQ,
training) exactly: the native folder holds each layer's packed codes, fp16 scales and
zero-points (`QuantLinear` state: `{name}.qweight`, `{name}.scales` fp16 [out, G],
`{name}.qzeros` packed in `bits` bits, empty when symmetric, where z = 2**(bits-1)). Each layer
is rebuilt with `QuantLinear.from_state`; its codes q, QParams and dequantized weight
W_hat = (q - z) * s are what the formats write (`tensors.StoredLayer`), so nothing is
re-quantized (q - z and s are exact in float32). A layer planned as a ggml type is stored as its
GGUF blocks and rebuilt as a `GGMLLinear`: its codes and `GGMLParams` decoded from those bytes, which
a GGUF export packs back into the very same bytes. Every other tensor is the folder's fp16 value.

Two ways to read:
  * `stored_source(path)` -> `StoredSource`: the exporters' streamed input. The model's structure
    is a skeleton on the meta device (no storage); `part(p)` reads one block's tensors from its
    shard, rebuilds its layers, and the caller releases them before the next block. Peak: one
    block's packed tensors plus their unpacked codes and float32 weights. `model_source` gives
    the same interface over a model in memory, so every format has one writer.
  * `load_for_export(path)` -> `ExportSource`: the whole model in float32 with the planned layers
    dequantized, for `with_plan` (an export of another plan, the nearest one a format can store:
    layers whose spec is unchanged keep the run's codes, changed layers are quantized afresh
    (min-max) from the original model's weights, never from the run's already rounded ones).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from mixbits.errors import UserError
from mixbits.export.native import NativeFolder, model_tensors, open_native, skeleton
from mixbits.export.native_shards import block_of, stored
from mixbits.export.shard_file import TensorMeta, read_header
from mixbits.export.tensors import StoredLayer, stored_layer
from mixbits.model.apply import layer_shapes
from mixbits.model.arch import find_blocks, get_weight, set_weight
from mixbits.plan import Plan
from mixbits.quant.affine import QParams


@dataclass(frozen=True, eq=False)
class ExportSource:
    """What `export` needs: model (float32, planned weights dequantized), plan, qparams, tokenizer."""

    model: nn.Module
    plan: Plan
    qparams: dict[str, QParams]
    tokenizer: object | None


@dataclass(frozen=True)
class Part:
    """One piece an export writes in turn: a block (index), or tensors outside the blocks (names)."""

    index: int | None
    names: tuple[str, ...] = ()


@dataclass(frozen=True, eq=False)
class PartTensors:
    """A part read for export: its planned layers in stored form and its plain tensors (fp16)."""

    layers: dict[str, StoredLayer]
    plain: dict[str, Tensor]


@dataclass(frozen=True, eq=False)
class StoredSource:
    """A quantized model as the exporters read it, part by part (see the module docstring).

    structure: the model's modules (a meta skeleton, or the model itself), for names and shapes;
    plain_metas: every plain tensor (stored form, tied copies left out) -> its meta, in state order;
    biases: the planned layers that have a bias; read: Part -> PartTensors."""

    structure: nn.Module
    plan: Plan
    tokenizer: object | None
    plain_metas: dict[str, TensorMeta]
    biases: frozenset[str]
    read: object = field(repr=False)
    tied: Mapping[str, str] = field(default_factory=dict)

    @property
    def config(self):
        return self.structure.config

    def parts(self) -> list[Part]:
        """Blocks in order, with the tensors outside them before and after, in the model's state order."""
        block_path, blocks = find_blocks(self.structure)
        names = list(self.plain_metas)
        first = next((i for i, n in enumerate(names) if block_of(n, block_path) is not None), len(names))
        before = tuple(n for n in names[:first] if block_of(n, block_path) is None)
        after = tuple(n for n in names[first:] if block_of(n, block_path) is None)
        return ([Part(None, before)] if before else []) + [Part(i) for i in range(len(blocks))] + \
            ([Part(None, after)] if after else [])

    def part_plain_metas(self, part: Part) -> dict[str, TensorMeta]:
        block_path = find_blocks(self.structure)[0]
        if part.index is None:
            return {n: self.plain_metas[n] for n in part.names}
        return {n: m for n, m in self.plain_metas.items() if block_of(n, block_path) == part.index}

    def part_layers(self, part: Part) -> list[str]:
        block_path = find_blocks(self.structure)[0]
        return [n for n in self.plan.quantized() if part.index is not None and block_of(n, block_path) == part.index]


def _meta_of_stored(tensor: Tensor) -> TensorMeta:
    return TensorMeta.of(tensor if not tensor.is_floating_point() else tensor.to("meta", torch.float16))


def model_source(model: nn.Module, plan: Plan, qparams: Mapping[str, QParams] | None = None,
                 tokenizer=None) -> StoredSource:
    """A model in memory as a `StoredSource` (min-max qparams unless a quantizer's are given)."""
    qparams = qparams or {}
    unknown = sorted(set(qparams) - set(plan.quantized()))
    if unknown:
        raise ValueError(f"qparams name layers the plan does not quantize, e.g. {unknown[:3]}; "
                         "pass the qparams of this plan")
    tensors, tied = model_tensors(model)
    replaced = {f"{n}.{s}" for n in plan.quantized() for s in ("weight", "bias")}
    metas = {k: _meta_of_stored(v) for k, v in tensors.items() if k not in replaced}
    biases = frozenset(n for n in plan.quantized() if f"{n}.bias" in tensors)
    block_path = find_blocks(model)[0]

    def read(part: Part) -> PartTensors:
        layers = {n: stored_layer(model.get_submodule(n), spec, qparams.get(n)) for n, spec in plan.quantized().items()
                  if part.index is not None and block_of(n, block_path) == part.index}
        names = part.names if part.index is None else [n for n in metas if block_of(n, block_path) == part.index]
        return PartTensors(layers, {n: stored(tensors[n]) for n in names})

    return StoredSource(model, plan, tokenizer, metas, biases, read, tied)


def saved_tokenizer(path: Path):
    """The tokenizer saved in a model folder, or None when the folder holds none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        return None  # the run saved no tokenizer; formats then write the model alone


def _meta_skeleton(config) -> nn.Module:
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return skeleton(config)


@torch.no_grad()
def _stored_from_folder(folder: NativeFolder, tensors: Mapping[str, Tensor], name: str,
                        shape: tuple[int, int]) -> StoredLayer:
    layer = folder.layer(tensors, name, shape)
    return StoredLayer(layer.spec, layer.codes(), layer.qparams(), layer.dequantized_weight(), layer.bias)


def stored_source(path: str | Path) -> StoredSource:
    """The native folder `path` (either layout) as a `StoredSource`; nothing but headers is read here."""
    folder = open_native(path)
    structure = _meta_skeleton(folder.config)
    shapes = layer_shapes(structure)
    quantized = folder.plan.quantized()
    packed = {f"{n}.{k}" for n in quantized for k in ("qweight", "scales", "qzeros", "bias")}
    on_disk = {n: m for f in sorted(set(folder.weight_map.values())) for n, m in read_header(folder.path / f).items()}
    order = [k for k in structure.state_dict() if k in on_disk and k not in packed]
    metas = {k: on_disk[k] for k in order}
    biases = frozenset(n for n in quantized if f"{n}.bias" in folder.weight_map)

    def read(part: Part) -> PartTensors:
        if part.index is None:
            return PartTensors({}, folder.read(part.names))
        tensors = folder.block(part.index)
        layers = {n: _stored_from_folder(folder, tensors, n, shapes[n]) for n in quantized
                  if block_of(n, folder.block_path) == part.index}
        return PartTensors(layers, {k: v for k, v in tensors.items() if k in metas})

    return StoredSource(structure, folder.plan, saved_tokenizer(folder.path), metas, biases, read, dict(folder.tied))


@torch.no_grad()
def load_for_export(path: str | Path) -> ExportSource:
    """The whole model (float32), plan, QParams and tokenizer stored in the native folder `path`."""
    folder = open_native(path)
    model = skeleton(folder.config, torch.float32)
    shapes = layer_shapes(model)
    qparams = {}
    for index in [*range(folder.n_blocks), None]:
        tensors = folder.rest() if index is None else folder.block(index)
        for name in (n for n in folder.plan.quantized() if block_of(n, folder.block_path) == index):
            layer = folder.layer(tensors, name, shapes[name])
            module = model.get_submodule(name)
            set_weight(module, layer.dequantized_weight())
            if layer.bias is not None:
                module.bias.copy_(layer.bias.float())
            qparams[name] = layer.qparams()
            tensors = {k: v for k, v in tensors.items() if not k.startswith(f"{name}.")}
        _, unexpected = model.load_state_dict({k: v.float() if v.is_floating_point() else v
                                               for k, v in tensors.items()}, strict=False)
        if unexpected:
            raise UserError(f"{folder.path} holds tensors its config does not have: {unexpected[:5]}")
    model.tie_weights()
    return ExportSource(model.eval(), folder.plan, qparams, saved_tokenizer(folder.path))


@torch.no_grad()
def with_plan(source: ExportSource, original: nn.Module, plan: Plan) -> ExportSource:
    """`source` re-targeted to `plan`: unchanged layers keep their codes, others start from `original`."""
    model = copy.deepcopy(original).float().eval()
    qparams = {}
    for name, spec in plan.quantized().items():
        if source.plan.specs.get(name) == spec:
            set_weight(model.get_submodule(name), get_weight(source.model.get_submodule(name)))
            qparams[name] = source.qparams[name]
    return ExportSource(model, plan, qparams, source.tokenizer)
