"""Where the transformer blocks and their linear layers are, for every supported family.

One data table, not code per architecture: each row names the model types it serves, the
dotted paths where the block list may sit, and the groups of linears that inference engines
fuse into one matrix (q/k/v, gate/up), which must therefore share one quantization config.
Linears are found generically inside each block (``nn.Linear`` and GPT-2's transposed
``Conv1D``); embeddings and ``lm_head`` sit outside the blocks and stay in full precision.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ArchSpec:
    model_types: tuple[str, ...]
    block_paths: tuple[str, ...]
    fused: tuple[tuple[str, ...], ...] = ()


_ATTN_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_MLP_GATE_UP = ("mlp.gate_proj", "mlp.up_proj")

ARCHS: tuple[ArchSpec, ...] = (
    ArchSpec(
        ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "gemma3", "phi3", "olmo2"),
        ("model.layers", "model.language_model.layers", "language_model.model.layers"),
        (_ATTN_QKV, _MLP_GATE_UP),
    ),
    ArchSpec(("gpt2",), ("transformer.h",)),  # c_attn already holds q, k and v in one matrix
    ArchSpec(
        ("bert", "roberta"),
        ("bert.encoder.layer", "roberta.encoder.layer", "encoder.layer"),
        (("attention.self.query", "attention.self.key", "attention.self.value"),),
    ),
    ArchSpec(
        ("distilbert",),
        ("distilbert.transformer.layer", "transformer.layer"),
        (("attention.q_lin", "attention.k_lin", "attention.v_lin"),),
    ),
)


@dataclass(frozen=True)
class LinearInfo:
    """One quantizable linear: full module name, block index, and weight shape [out, in]."""

    name: str
    block: int
    out_features: int
    in_features: int
    transposed: bool  # GPT-2 Conv1D stores its weight as [in, out]

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features


def arch_of(model: nn.Module) -> ArchSpec:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for arch in ARCHS:
        if model_type in arch.model_types:
            return arch
    supported = sorted(t for a in ARCHS for t in a.model_types)
    raise ValueError(f"model type {model_type!r} is not supported; supported types: {', '.join(supported)}")


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return the dotted path and the ModuleList of transformer blocks."""
    arch = arch_of(model)
    modules = dict(model.named_modules())
    for path in arch.block_paths:
        blocks = modules.get(path)
        if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
            return path, blocks
    raise ValueError(f"no block list found in {type(model).__name__}; looked for {list(arch.block_paths)}")


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def find_linears(model: nn.Module) -> dict[str, LinearInfo]:
    """Every linear inside the transformer blocks, in model order."""
    path, blocks = find_blocks(model)
    found: dict[str, LinearInfo] = {}
    for index, block in enumerate(blocks):
        for sub, module in block.named_modules():
            name = f"{path}.{index}.{sub}"
            if isinstance(module, nn.Linear):
                found[name] = LinearInfo(name, index, module.out_features, module.in_features, False)
            elif _is_conv1d(module):
                in_f, out_f = module.weight.shape
                found[name] = LinearInfo(name, index, out_f, in_f, True)
    if not found:
        raise ValueError(f"no linear layers found under {path}")
    return found


def tied_groups(model: nn.Module, linears: dict[str, LinearInfo]) -> list[tuple[str, ...]]:
    """Groups of linears that engines fuse; every linear not in a fused group is its own group."""
    arch = arch_of(model)
    groups: list[tuple[str, ...]] = []
    seen: set[str] = set()
    blocks: dict[int, list[str]] = {}
    for info in linears.values():
        blocks.setdefault(info.block, []).append(info.name)
    for names in blocks.values():
        for fused in arch.fused:
            members = tuple(n for n in names if any(n.endswith("." + suffix) for suffix in fused))
            if len(members) > 1:
                groups.append(members)
                seen.update(members)
        groups.extend((n,) for n in names if n not in seen)
    order = {name: i for i, name in enumerate(linears)}
    return sorted(groups, key=lambda g: order[g[0]])


def fixed_bytes_of(model: nn.Module, shapes: dict[str, tuple[int, int]]) -> int:
    """Bytes of every tensor outside the quantizable linears `shapes`, stored in 16 bit (tied tensors
    counted once): what a size budget adds to the planned layers' bytes. Tied tensors are told apart
    by object identity, not storage, so a skeleton on the meta device (where every storage pointer
    is 0) counts the same as the loaded model."""
    skip = {f"{n}.weight" for n in shapes}
    saved = set(model.state_dict())  # parameters and persistent buffers: what a checkpoint stores
    tensors = [*model.named_parameters(), *((n, b) for n, b in model.named_buffers() if n in saved)]
    return sum(t.numel() * (2 if t.is_floating_point() else t.element_size()) for n, t in tensors if n not in skip)


def get_weight(module: nn.Module) -> torch.Tensor:
    """The weight as [out, in], whatever the module stores."""
    return module.weight.t() if _is_conv1d(module) else module.weight


def set_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Write a [out, in] weight back in the module's own layout and dtype, in place."""
    target = module.weight
    with torch.no_grad():
        target.copy_(weight.t() if _is_conv1d(module) else weight)


def get_bias(module: nn.Module) -> torch.Tensor | None:
    return getattr(module, "bias", None)
