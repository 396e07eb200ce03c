"""Read a run's native folder back as what the exporters take: a plain model whose planned
linears hold their dequantized weights, the plan, and the stored QParams.

This is how an export keeps the codes of any quantizer (round-to-nearest, clip search, GPTQ,
training) exactly: the native folder holds each layer's packed codes, fp16 scales and
zero-points (`QuantLinear` state: `{name}.qweight`, `{name}.scales` fp16 [out, G],
`{name}.qzeros` packed in `bits` bits, absent when symmetric, where z = 2**(bits-1)). Each layer
is rebuilt with `QuantLinear.from_state`; its dequantized weight W_hat = (q - z) * s is written
into a plain model built from the folder's config, and its QParams are returned, so that
`quantize(W_hat, qparams)` gives back q exactly (q - z and s are exact in float32). Every other
tensor (embeddings, norms, kept layers) is the folder's fp16 value.

`with_plan` serves an export of another plan (the nearest one a format can store): layers
whose spec is unchanged keep the run's codes, changed layers are quantized afresh (min-max)
from the original model's weights, never from the run's already rounded ones.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from mixbits.errors import UserError
from mixbits.export.native import NATIVE_FORMAT, WEIGHTS
from mixbits.model.arch import get_weight, set_weight
from mixbits.plan import Plan
from mixbits.quant.affine import QParams
from mixbits.quant.qlinear import QuantLinear
from mixbits.safeload import check_safetensors


@dataclass(frozen=True, eq=False)
class ExportSource:
    """What `export` needs: model (float32, planned weights dequantized), plan, qparams, tokenizer."""

    model: nn.Module
    plan: Plan
    qparams: dict[str, QParams]
    tokenizer: object | None


def _meta(path: Path) -> dict:
    meta_file = path / "mixbits.json"
    if not meta_file.is_file():
        raise UserError(f"{str(path)!r} is not a mixbits native folder (no mixbits.json); "
                                "`mixbits run` writes one as <output-dir>/model")
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != NATIVE_FORMAT:
        raise UserError(f"{meta_file} has format {meta.get('format')!r}; this mixbits reads {NATIVE_FORMAT!r}")
    return meta


def _tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        return None  # the run saved no tokenizer; formats then write the model alone


@torch.no_grad()
def load_for_export(path: str | Path) -> ExportSource:
    """The model, plan, QParams and tokenizer stored in the native folder `path`."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    path = Path(path)
    meta = _meta(path)
    plan = Plan.from_dict(meta["plan"], source=str(path / "mixbits.json"))
    config = AutoConfig.from_pretrained(path)
    arch = (config.architectures or [""])[0]
    auto = AutoModelForSequenceClassification if arch.endswith("ForSequenceClassification") else AutoModelForCausalLM
    model = auto.from_config(config, dtype=torch.float32)
    check_safetensors(path / WEIGHTS, "model weights")
    tensors = load_file(str(path / WEIGHTS))
    qparams = {}
    for name, spec in plan.quantized().items():
        prefix = f"{name}."
        own = {k[len(prefix):]: tensors.pop(k) for k in list(tensors) if k.startswith(prefix)}
        module = model.get_submodule(name)
        out_features, in_features = get_weight(module).shape
        layer = QuantLinear.from_state(own, spec, in_features, out_features)
        set_weight(module, layer.dequantized_weight())
        if layer.bias is not None:
            module.bias.copy_(layer.bias.float())
        qparams[name] = layer.qparams()
    plain = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}
    missing, unexpected = model.load_state_dict(plain, strict=False)
    planned = tuple(f"{name}." for name in plan.quantized())
    missing = [k for k in missing if k not in meta["tied"] and not k.startswith(planned)]
    if missing or unexpected:
        raise UserError(f"{path / WEIGHTS} does not match its config: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    model.tie_weights()
    return ExportSource(model.eval(), plan, qparams, _tokenizer(path))


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
