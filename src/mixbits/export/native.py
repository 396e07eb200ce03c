"""mixbits' own format: packed safetensors + the plan + the model config.

Layout of a saved folder:
    model.safetensors   for each quantized linear `{name}.qweight` (uint8 bitstream of the
                        [out, in] codes, row-major), `{name}.scales` (fp16 [out, G]),
                        `{name}.qzeros` (uint8 bitstream of the [out, G] zero codes,
                        asymmetric only), `{name}.bias` (fp16); every other tensor in fp16
    mixbits.json        format tag, the plan, names of tensors tied to another
    config.json (+ tokenizer files)

Bytes on disk of `model.safetensors` are what results report as the model's size. The folder
is written to a temporary sibling and swapped into place (`staging.staged_dir`), so a crash never
leaves half a model and a user's own files in the folder survive.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from collections.abc import Mapping

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mixbits.errors import UserError
from mixbits.export.staging import staged_dir
from mixbits.io import atomic_write_json
from mixbits.model.apply import layer_shapes
from mixbits.model.arch import get_bias, get_weight
from mixbits.plan import Plan
from mixbits.quant.affine import QParams
from mixbits.quant.qlinear import QuantLinear
from mixbits.safeload import check_safetensors

NATIVE_FORMAT = "mixbits.native/1"
WEIGHTS = "model.safetensors"


def _packed_tensors(model: nn.Module, plan: Plan, qparams: Mapping[str, QParams]) -> tuple[dict[str, torch.Tensor], set[str]]:
    tensors: dict[str, torch.Tensor] = {}
    replaced: set[str] = set()
    for name, spec in plan.quantized().items():
        module = model.get_submodule(name)
        layer = QuantLinear.from_weight(get_weight(module).detach(), get_bias(module), spec, qparams.get(name))
        for key, value in layer.state_dict().items():
            tensors[f"{name}.{key}"] = value.detach().cpu().contiguous()
        replaced.update({f"{name}.weight", f"{name}.bias"})
    return tensors, replaced


def _plain_tensors(model: nn.Module, skip: set[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    seen: dict[tuple[int, tuple[int, ...]], str] = {}
    for key, value in model.state_dict(keep_vars=False).items():
        if key in skip:
            continue
        ident = (value.untyped_storage().data_ptr(), tuple(value.shape))
        if ident in seen:
            tied[key] = seen[ident]
            continue
        seen[ident] = key
        value = value.detach().cpu()
        tensors[key] = (value.half() if value.is_floating_point() else value).contiguous()
    return tensors, tied


def save_native(
    model: nn.Module, plan: Plan, path: str | Path, tokenizer=None, qparams: Mapping[str, QParams] | None = None
) -> int:
    """Write `model` quantized by `plan`; returns the bytes of its weights file.

    `model` holds the weights to quantize: the original ones (min-max parameters are then
    computed here, exactly as fake quantization does), or weights a quantizer already wrote
    together with its `qparams`, which then reproduce them exactly. Re-quantizing dequantized
    weights with fresh min-max parameters is not idempotent, so pass one or the other.
    """
    path = Path(path)
    plan.validate(layer_shapes(model))
    packed, replaced = _packed_tensors(model, plan, qparams or {})
    plain, tied = _plain_tensors(model, replaced)
    with staged_dir(path, kind="native") as tmp:
        save_file({**plain, **packed}, str(tmp / WEIGHTS), metadata={"format": NATIVE_FORMAT})
        atomic_write_json(tmp / "mixbits.json", {"format": NATIVE_FORMAT, "plan": plan.to_dict(), "tied": tied})
        model.config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return (path / WEIGHTS).stat().st_size


def native_size_bytes(model: nn.Module, plan: Plan) -> int:
    """Bytes the weights file of `save_native` takes, measured by writing it to a temporary folder."""
    with tempfile.TemporaryDirectory(prefix="mixbits-size-") as tmp:
        return save_native(model, plan, Path(tmp) / "m")


def load_native(path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> nn.Module:
    """Rebuild a model saved by `save_native`: packed layers become QuantLinear modules."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    path = Path(path)
    meta_file = path / "mixbits.json"
    if not meta_file.is_file():
        raise UserError(f"{str(path)!r} is not a mixbits model folder (no mixbits.json); save one with `mixbits run`")
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != NATIVE_FORMAT:
        raise UserError(f"{meta_file} has format {meta.get('format')!r}; this mixbits reads {NATIVE_FORMAT!r}")
    plan = Plan.from_dict(meta["plan"], source=str(meta_file))
    config = AutoConfig.from_pretrained(path)
    arch = (config.architectures or [""])[0]
    auto = AutoModelForSequenceClassification if arch.endswith("ForSequenceClassification") else AutoModelForCausalLM
    model = auto.from_config(config, dtype=dtype)
    check_safetensors(path / WEIGHTS, "model weights")
    tensors = load_file(str(path / WEIGHTS))
    for name, spec in plan.quantized().items():
        prefix = f"{name}."
        own = {k[len(prefix):]: tensors.pop(k) for k in list(tensors) if k.startswith(prefix)}
        module = model.get_submodule(name)
        layer = QuantLinear.from_state(own, spec, get_weight(module).shape[1], get_weight(module).shape[0])
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
    missing, unexpected = model.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}, strict=False)
    packed_prefixes = tuple(f"{name}." for name in plan.quantized())
    missing = [k for k in missing if k not in meta["tied"] and not k.startswith(packed_prefixes)]
    if missing or unexpected:
        raise UserError(f"{path / WEIGHTS} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    return model.to(device).eval()
