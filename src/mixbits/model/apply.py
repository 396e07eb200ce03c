"""Apply a plan to a model: fake-quantize weights in place, or swap in packed QuantLinears.

Fake quantization writes dequantized values back into the original modules, so any
architecture runs unchanged; the packed form holds the true stored tensors and computes with
the same dequantized weights (bit-identical, since scales are stored in fp16 either way).
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn
from tqdm.auto import tqdm

from mixbits.model.arch import find_linears, get_bias, get_weight, set_weight
from mixbits.plan import Plan
from mixbits.quant.affine import fake_quantize
from mixbits.quant.qlinear import QuantLinear

log = logging.getLogger(__name__)


def layer_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    return {name: (info.out_features, info.in_features) for name, info in find_linears(model).items()}


@torch.no_grad()
def fake_quantize_model(model: nn.Module, plan: Plan, *, inplace: bool = False, progress: bool = False) -> nn.Module:
    """A model whose planned linears hold their quantized-then-dequantized weights."""
    plan.validate(layer_shapes(model))
    target = model if inplace else copy.deepcopy(model)
    for name, spec in tqdm(plan.quantized().items(), desc="quantize", disable=not progress, leave=False):
        module = target.get_submodule(name)
        weight = get_weight(module)
        set_weight(module, fake_quantize(weight, spec).to(weight.dtype))
    return target


@torch.no_grad()
def pack_model(model: nn.Module, plan: Plan, *, inplace: bool = False) -> nn.Module:
    """A model whose planned linears are replaced by packed `QuantLinear` modules."""
    plan.validate(layer_shapes(model))
    target = model if inplace else copy.deepcopy(model)
    for name, spec in plan.quantized().items():
        module = target.get_submodule(name)
        packed = QuantLinear.from_weight(get_weight(module).detach(), get_bias(module), spec)
        parent_name, _, child = name.rpartition(".")
        setattr(target.get_submodule(parent_name), child, packed.to(module.weight.device))
    return target
