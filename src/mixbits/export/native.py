"""mixbits' own format: packed safetensors + the plan + the model config; save and load.

The layout is `export/native_shards.py`'s ("mixbits.native/2": one shard per block, an index,
mixbits.json). `save_native` writes a whole model in memory through the same `NativeWriter` the
streamed run uses, so there is one format; `open_native` reads it, and folders of the first
layout ("mixbits.native/1": one model.safetensors holding every tensor) too, one block at a time
(`NativeFolder.block`), which is how the exporters stream; `load_native` builds the whole model.

`save_native` writes into a temporary sibling swapped into place (`staging.staged_dir`), so a
crash never leaves half a model and a user's own files in the folder survive; the streamed run
writes into its claimed folder directly and resumes from the finished blocks instead.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor, nn

from mixbits.errors import UserError
from mixbits.export.native_shards import (
    INDEX, NATIVE_FORMAT, NativeWriter, block_of, infer_block_path, native_size_of, packed_tensors,
)
from mixbits.export.staging import staged_dir
from mixbits.model.apply import layer_shapes
from mixbits.model.arch import find_blocks, get_bias, get_weight
from mixbits.plan import Plan
from mixbits.quant.affine import QParams
from mixbits.quant.packed import layer_from_state
from mixbits.quant.qlinear import QuantLinear
from mixbits.safeload import check_safetensors

LEGACY_FORMAT = "mixbits.native/1"
FORMATS = (NATIVE_FORMAT, LEGACY_FORMAT)
WEIGHTS = "model.safetensors"  # the single file of the first layout

__all__ = ["FORMATS", "NATIVE_FORMAT", "NativeFolder", "load_native", "model_tensors", "native_size_bytes",
           "open_native", "save_native"]


def model_tensors(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The model's state tensors (references, no copy) with tied copies left out, and the ties
    (left-out name -> the name it shares storage with). On the meta device (a skeleton: no
    storage, every data pointer 0) a tie is the same parameter object instead."""
    tensors: dict[str, Tensor] = {}
    tied: dict[str, str] = {}
    seen: dict[tuple[int, tuple[int, ...]], str] = {}
    for key, value in model.state_dict(keep_vars=True).items():
        ident = (id(value) if value.is_meta else value.untyped_storage().data_ptr(), tuple(value.shape))
        if ident in seen:
            tied[key] = seen[ident]
            continue
        seen[ident] = key
        tensors[key] = value.detach()
    return tensors, tied


def _block_tensors(model: nn.Module, plan: Plan, qparams: Mapping[str, QParams], tensors: Mapping[str, Tensor],
                   block_path: str, index: int) -> dict[str, Tensor]:
    prefix = f"{block_path}.{index}."
    own = {k: v for k, v in tensors.items() if k.startswith(prefix)}
    for name, spec in plan.quantized().items():
        if name.startswith(prefix):
            module = model.get_submodule(name)
            own.pop(f"{name}.weight", None)
            own.pop(f"{name}.bias", None)
            own.update(packed_tensors(name, get_weight(module), spec, qparams.get(name), get_bias(module)))
    return own


def save_native(
    model: nn.Module, plan: Plan, path: str | Path, tokenizer=None, qparams: Mapping[str, QParams] | None = None
) -> int:
    """Write `model` quantized by `plan`, block by block; returns the bytes of its shards.

    `model` holds the weights to quantize: the original ones (min-max parameters are then
    computed here, exactly as fake quantization does), or weights a quantizer already wrote
    together with its `qparams`, which then reproduce them exactly. Re-quantizing dequantized
    weights with fresh min-max parameters is not idempotent, so pass one or the other.
    Peak beyond the model: one block's packed tensors.
    """
    path, qparams = Path(path), qparams or {}
    plan.validate(layer_shapes(model))
    block_path, blocks = find_blocks(model)
    tensors, tied = model_tensors(model)
    with staged_dir(path, kind="native") as tmp:
        writer = NativeWriter(tmp, plan, model.config, tokenizer, n_blocks=len(blocks), block_path=block_path,
                              resume=False)
        for index in range(len(blocks)):
            writer.write_block(index, _block_tensors(model, plan, qparams, tensors, block_path, index))
        writer.write_rest({k: v for k, v in tensors.items() if block_of(k, block_path) is None}, tied)
        size = writer.finish()
    return size


def native_size_bytes(model: nn.Module, plan: Plan) -> int:
    """Bytes of the shards `save_native(model, plan)` writes, computed from shapes (`native_size_of`):
    nothing is packed or written."""
    tensors, _ = model_tensors(model)
    return native_size_of(layer_shapes(model), plan, tensors, find_blocks(model)[0])


@dataclass(frozen=True)
class NativeFolder:
    """A native folder opened for reading: its plan, ties, config, and where each tensor lives."""

    path: Path
    format: str
    plan: Plan
    tied: Mapping[str, str]
    config: object
    block_path: str | None
    n_blocks: int
    weight_map: Mapping[str, str]

    def read(self, names: Iterable[str]) -> dict[str, Tensor]:
        """The named tensors, read from their shards (memory-mapped; only these tensors' bytes)."""
        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(self.weight_map[name], []).append(name)
        out = {}
        for file, wanted in by_file.items():
            with safe_open(str(self.path / file), framework="pt") as handle:
                out.update({name: handle.get_tensor(name) for name in wanted})
        return out

    def block(self, index: int) -> dict[str, Tensor]:
        """Every stored tensor of block `index` (packed ones included)."""
        return self.read(n for n in self.weight_map if block_of(n, self.block_path) == index)

    def rest(self) -> dict[str, Tensor]:
        """Every stored tensor outside the blocks."""
        return self.read(n for n in self.weight_map if block_of(n, self.block_path) is None)

    def layer(self, tensors: Mapping[str, Tensor], name: str, shape: tuple[int, int]) -> QuantLinear:
        """The quantized layer `name` ([out, in] = shape) rebuilt from its block's tensors: a
        `QuantLinear`, or a `GGMLLinear` when the plan gives it a ggml type."""
        prefix = f"{name}."
        own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        return layer_from_state(own, self.plan.specs[name], shape[1], shape[0])


def _meta(path: Path) -> dict:
    meta_file = path / "mixbits.json"
    if not meta_file.is_file():
        raise UserError(f"{str(path)!r} is not a mixbits model folder (no mixbits.json); save one with `mixbits run`")
    meta = json.loads(meta_file.read_text())
    if meta.get("format") not in FORMATS:
        raise UserError(f"{meta_file} has format {meta.get('format')!r}; this mixbits reads {', '.join(FORMATS)}")
    return meta


def _weight_map(path: Path, meta: dict) -> dict[str, str]:
    if meta["format"] == LEGACY_FORMAT:
        check_safetensors(path / WEIGHTS, "model weights")
        with safe_open(str(path / WEIGHTS), framework="pt") as handle:
            return {name: WEIGHTS for name in handle.keys()}
    index_file = path / INDEX
    if not index_file.is_file():
        raise UserError(f"{path} has no {INDEX}; the native folder is incomplete: write it again")
    weight_map = json.loads(index_file.read_text())["weight_map"]
    for file in sorted(set(weight_map.values())):
        if not (path / file).is_file():
            raise UserError(f"shard {file} listed in {index_file} is missing; write the native folder again")
        check_safetensors(path / file, "model weights")
    return weight_map


def open_native(path: str | Path) -> NativeFolder:
    """Open a native folder of either layout; headers are checked, no tensor is read."""
    from transformers import AutoConfig

    path = Path(path)
    meta = _meta(path)
    plan = Plan.from_dict(meta["plan"], source=str(path / "mixbits.json"))
    config = AutoConfig.from_pretrained(path)
    weight_map = _weight_map(path, meta)
    blocks = meta.get("blocks", {})
    block_path = blocks.get("path") or infer_block_path(plan.specs) or infer_block_path(weight_map)
    n_blocks = int(blocks.get("count", getattr(config, "num_hidden_layers", 0)))
    return NativeFolder(path, meta["format"], plan, meta.get("tied", {}), config, block_path, n_blocks, weight_map)


def skeleton(config, dtype: torch.dtype = torch.float32) -> nn.Module:
    """An empty model of `config` (random init, the architecture's auto class)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    arch = (config.architectures or [""])[0]
    auto = AutoModelForSequenceClassification if arch.endswith("ForSequenceClassification") else AutoModelForCausalLM
    return auto.from_config(config, dtype=dtype)


def load_native(path: str | Path, *, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32) -> nn.Module:
    """Rebuild a model saved by `save_native` (either layout): packed layers become QuantLinear modules
    (GGMLLinear for layers planned as ggml types, dequantized by mixbits' own decoder)."""
    folder = open_native(path)
    model = skeleton(folder.config, dtype)
    shapes = layer_shapes(model)
    loaded: set[str] = set()
    for index in [*range(folder.n_blocks), None]:
        tensors = folder.rest() if index is None else folder.block(index)
        for name in (n for n in folder.plan.quantized() if block_of(n, folder.block_path) == index):
            layer = folder.layer(tensors, name, shapes[name])
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer)
            tensors = {k: v for k, v in tensors.items() if not k.startswith(f"{name}.")}
            loaded.update(f"{name}.{k}" for k in layer.state_dict())
        plain = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
        _, unexpected = model.load_state_dict(plain, strict=False)
        if unexpected:
            raise UserError(f"{folder.path} holds tensors its config does not have: {unexpected[:5]}")
        loaded.update(plain)
    missing = [k for k in model.state_dict() if k not in loaded and k not in folder.tied]
    if missing:
        raise UserError(f"{folder.path} does not match its config: missing {missing[:5]}")
    model.tie_weights()
    return model.to(device).eval()
