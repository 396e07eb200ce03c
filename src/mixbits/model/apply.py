"""Apply a plan to a model: fake-quantize weights in place.

Fake quantization writes dequantized values back into the original modules, so any
architecture runs unchanged; the packed `quant.qlinear.QuantLinear` (what the native export
loads) computes with the same dequantized weights (bit-identical, since scales are stored in
fp16 either way).
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn
from tqdm.auto import tqdm

from mixbits.model.arch import find_linears, get_weight, set_weight
from mixbits.plan import Plan
from mixbits.quant import kquant
from mixbits.quant.affine import fake_quantize
from mixbits.quant.spec import GGMLSpec

log = logging.getLogger(__name__)


def layer_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    return {name: (info.out_features, info.in_features) for name, info in find_linears(model).items()}


@torch.no_grad()
def round_to_storage(model: nn.Module, plan: Plan, dtype: torch.dtype = torch.float16) -> None:
    """Round every saved float tensor that the plan does not quantize through `dtype`, in place.

    The native format stores those tensors (embeddings, norms, kept layers, biases) in 16 bit, so
    the model evaluated in memory is then exactly the model a reload gives back.
    """
    quantized = {f"{name}.weight" for name in plan.quantized()}
    for key, tensor in model.state_dict().items():
        if key not in quantized and tensor.is_floating_point():
            tensor.copy_(tensor.to(dtype).to(tensor.dtype))


@torch.no_grad()
def fake_quantize_model(
    model: nn.Module, plan: Plan, *, inplace: bool = False, progress: bool = False,
    storage_dtype: torch.dtype | None = torch.float16,
) -> nn.Module:
    """A model whose planned linears hold their quantized-then-dequantized weights, and whose
    other tensors are rounded to `storage_dtype` as saved (None leaves them as they are)."""
    plan.validate(layer_shapes(model))
    target = model if inplace else copy.deepcopy(model)
    for name, spec in tqdm(plan.quantized().items(), desc="quantize", disable=not progress, leave=False):
        module = target.get_submodule(name)
        weight = get_weight(module)
        quantizer = kquant.fake_quantize if isinstance(spec, GGMLSpec) else fake_quantize  # ggml types: GGUF
        set_weight(module, quantizer(weight, spec).to(weight.dtype))
    if storage_dtype is not None:
        round_to_storage(target, plan, storage_dtype)
    return target
