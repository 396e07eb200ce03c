"""GGUF files for llama.cpp and Ollama, written directly from mixbits' codes with the `gguf`
package, so the plan's per-layer allocation reaches llama.cpp unchanged.

Per layer, the plan's spec picks the tensor type. A ggml type (`GGMLSpec`: Q2_K, Q3_K, Q4_K,
Q5_K, Q6_K, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) is written as that type, from `quant.kquant`'s grid
(the `qparams` entry of the layer when given, a `kquant.GGMLParams`, e.g. from `gptq_ggml`;
else chosen from the weight the model holds) and the codes nearest to that weight, packed
bit-exactly (`ggml_blocks.encode_ggml`): one type per tensor, so a mixed plan is a mixed file.
A K-quant needs rows that are whole super-blocks (`in % 256 == 0`); a plan that asks one of a
shorter row is refused before writing, naming the tensors and the nearest storable type.
An affine `QuantSpec` picks a ggml legacy type (`ggml_blocks`): 4 bits -> Q4_0
(symmetric) or Q4_1, 5 bits -> Q5_0 or Q5_1, 8 bits -> Q8_0, fp16 -> F16. There is no affine
2-, 3- or 6-bit type, so such specs are refused before writing, with the nearest plan (plan
them as K-quants instead). A row must split into blocks of 32 (`in % 32 == 0`).

What is kept and what is re-quantized. GGUF's group size is fixed at 32 by its blocks.
`regroup="repeat"` (the default) keeps the plan exactly: a group of 64, 128, 256 or a whole row
(per-channel) repeats its scale and zero-point in each of its 32-blocks, so the codes, the
scales and the bits are mixbits' own; only the Q4_1/Q5_1 offset m = -z * s is rounded to fp16,
and the blocks of an asymmetric 8-bit layer whose codes do not fit Q8_0's signed range around
their zero-point are re-quantized by llama.cpp's Q8_0 rule (use symmetric 8-bit specs, w8g*s,
for an exact file). Storage is that
of group 32 whatever the plan's group size (GGUF pays one scale per 32 weights anyway).
`regroup="requantize"` instead computes fresh min-max parameters per 32-block at the plan's
bits and symmetry from the weights the model holds: usually a little more accurate for plans
at g64 and up, but no longer the model mixbits evaluated (a warning says so).

Other tensors: embeddings, the output head and 2-D kept layers in F16, 1-D tensors (norms,
biases) in F32 holding their fp16-rounded values, exactly as the native export rounds them.
Architectures: Llama and Mistral (written as llama, with llama.cpp's rotary row permutation of
q/k, which transformers and llama.cpp undo on load), Qwen2, Qwen3; tensor names come from
`gguf`'s own name map. RoPE scaling variants are not written (refused). The tokenizer, when
given, is written as llama.cpp's converter does (`gguf_vocab`).

The file before its tensor data (metadata, tokenizer, tensor table: `gguf_layout`) is built from
shapes alone, so its exact size is known before a byte is written (`GGUFLayout.file_bytes`,
`gguf_size`); a plan allocated for a GGUF file size records its target, and the writer warns when
the file would come out above it (another file name or tokenizer.ggml.pre than it was sized for).

Loaders: llama.cpp / Ollama (`ollama create -f Modelfile` with `FROM ./model.gguf`) and
transformers (`AutoModelForCausalLM.from_pretrained(dir, gguf_file="model.gguf")`, which
dequantizes to float).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from torch import Tensor, nn

from mixbits.errors import UserError
from mixbits.export.from_native import StoredSource, model_source
from mixbits.export.ggml_blocks import encode_blocks, encode_ggml
from mixbits.export.gguf_layout import QUANTIZED_BY, RULES, GGUFArch, GGUFLayout, gguf_layout, part_infos
from mixbits.export.rules import require_expressible
from mixbits.export.staging import staged_file
from mixbits.export.tensors import StoredLayer
from mixbits.model.apply import layer_shapes
from mixbits.plan import Plan
from mixbits.quant.affine import QParams, minmax_qparams, quantize
from mixbits.quant.kquant import GGMLParams
from mixbits.quant.spec import GGMLSpec, QuantSpec

log = logging.getLogger(__name__)

REGROUP = ("repeat", "requantize")


def is_mixbits_gguf(path: str | Path) -> bool:
    """Whether `path` is a GGUF file that mixbits wrote (its general.quantized_by says so)."""
    try:
        field = gguf.GGUFReader(str(path)).get_field(gguf.Keys.General.QUANTIZED_BY)
        return field is not None and field.contents() == QUANTIZED_BY
    except (ValueError, OSError, IndexError, KeyError, TypeError):  # not GGUF at all, or damaged: not ours
        return False


def rope_row_order(rows: int, heads: int) -> Tensor:
    """Row permutation taking HF's rotary layout (halves) to llama.cpp's (interleaved pairs)."""
    half = rows // heads // 2
    return torch.arange(rows).view(heads, 2, half).transpose(1, 2).reshape(-1)


def _permuted(layer: StoredLayer, codes: Tensor, qp: QParams, heads: int | None):
    if heads is None:
        return codes, qp, layer.bias
    order = rope_row_order(codes.shape[0], heads)
    bias = None if layer.bias is None else layer.bias[order]
    return codes[order], QParams(qp.scale[order], qp.zero[order]), bias


def _regrouped(layer: StoredLayer, regroup: str) -> tuple[Tensor, QParams, QuantSpec]:
    spec = layer.spec
    if regroup == "repeat" or spec.group_size == 32:
        return layer.codes, layer.qparams, spec
    spec32 = QuantSpec(spec.bits, 32, spec.symmetric)
    qp = minmax_qparams(layer.weight, spec32)
    return quantize(layer.weight, qp, spec32), qp, spec32


def _rope_heads(name: str, config, arch: GGUFArch) -> int | None:
    if not arch.permute_qk:
        return None
    if name.endswith("q_proj"):
        return config.num_attention_heads
    if name.endswith("k_proj"):
        return getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return None


def _ggml_encoded(layer: StoredLayer, heads: int | None) -> tuple[Q, np.ndarray, Tensor | None]:
    """A layer planned as a ggml type: its codes and grid, q/k rows permuted, packed bit-exactly."""
    codes, params, bias = layer.codes, layer.qparams, layer.bias
    if not isinstance(params, GGMLParams) or params.spec != layer.spec:
        raise ValueError(f"a {layer.spec.name} layer needs kquant.GGMLParams of that type, "
                         f"got {type(params).__name__}")
    if heads is not None:
        order = rope_row_order(codes.shape[0], heads)
        codes, bias = codes[order], None if bias is None else bias[order]
        params = GGMLParams(params.spec, *(t[order] for t in (params.d, params.dmin, params.sc, params.mn)))
    kind, blocks = encode_ggml(codes, params)
    return kind, blocks, bias


def _quantized_tensors(layers, config, arch, regroup) -> dict[str, tuple[np.ndarray, Q]]:
    out = {}
    for name, layer in layers.items():
        heads = _rope_heads(name, config, arch)
        if isinstance(layer.spec, GGMLSpec):
            kind, blocks, bias = _ggml_encoded(layer, heads)
        else:
            codes, qp, spec = _regrouped(layer, regroup)
            codes, qp, bias = _permuted(layer, codes, qp, heads)
            kind, blocks = encode_blocks(codes, qp, spec)
        out[f"{name}.weight"] = (blocks, kind)
        if bias is not None:
            out[f"{name}.bias"] = (bias.float().numpy(), Q.F32)
    return out


def _plain(tensors: Mapping[str, Tensor], config, arch) -> dict[str, tuple[np.ndarray, Q]]:
    out = {}
    for key, value in tensors.items():
        heads = _rope_heads(key.rpartition(".")[0], config, arch)
        if heads is not None:
            value = value[rope_row_order(value.shape[0], heads)]
        kind = Q.F32 if value.dim() == 1 else Q.F16
        out[key] = (value.float().numpy() if kind == Q.F32 else value.half().numpy(), kind)
    return out


def write_gguf(
    model: nn.Module,
    plan: Plan,
    path: str | Path,
    tokenizer=None,
    qparams: Mapping[str, QParams | GGMLParams] | None = None,
    *,
    regroup: str = "repeat",
    tokenizer_pre: str = "default",
) -> Path:
    """Write `model` quantized by `plan` to the GGUF file `path`; see the module docstring."""
    return write_gguf_from(model_source(model, plan, qparams, tokenizer), path, regroup=regroup,
                           tokenizer_pre=tokenizer_pre)


def gguf_data_bytes(model: nn.Module, plan: Plan) -> int:
    """Bytes of the tensor data of `model` written as GGUF under `plan`, from shapes alone: every
    tensor in its type (planned layers, embeddings and output head in F16, 1-D in F32), each
    padded to GGUF's alignment, as llama.cpp maps them. The file adds its header, metadata and
    tokenizer to this. ExportError when the plan cannot be written (`require_expressible`)."""
    source = model_source(model, plan)
    shapes = layer_shapes(source.structure)
    require_expressible(RULES, plan, shapes)
    order = {k: i for i, k in enumerate(source.structure.state_dict())}
    infos = [i for part in source.parts() for i in part_infos(source, part, shapes, order).values()]
    return sum(gguf.GGUFWriter.ggml_pad(i.nbytes, gguf.GGUF_DEFAULT_ALIGNMENT) for i in infos)


def write_gguf_from(source: StoredSource, path: str | Path, *, regroup: str = "repeat",
                    tokenizer_pre: str = "default") -> Path:
    """Write `source` (a native folder or a model, `from_native`) to the GGUF file `path`, block by
    block: the tensor table (names, shapes, types, offsets) is computed from shapes first and
    written with the header, then each block is read, encoded, appended and released. Peak: one block."""
    if regroup not in REGROUP:
        raise UserError(f"regroup={regroup!r}; use 'repeat' (keep the plan's codes) or 'requantize' (min-max per 32)")
    plan = source.plan
    coarse = sorted({s.label for s in plan.quantized().values()
                     if isinstance(s, QuantSpec) and s.group_size != 32})
    path = Path(path)
    layout = gguf_layout(source, tokenizer_pre=tokenizer_pre, name=path.stem)
    if coarse and regroup == "requantize":
        log.warning("GGUF blocks hold 32 weights: layers at %s are re-quantized per 32-block (min-max), so the file "
                    "is not the model mixbits evaluated; regroup='repeat' keeps the plan's codes", ", ".join(coarse))
    _warn_over_target(plan, layout, path)
    config, arch, writer = source.config, layout.arch, layout.writer
    with staged_file(path) as tmp:
        try:
            writer.write_header_to_file(path=tmp)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for part, infos_of_part in zip(layout.parts, layout.infos):
                read = source.read(part)
                arrays = {**_plain(read.plain, config, arch), **_quantized_tensors(read.layers, config, arch, regroup)}
                for key in infos_of_part:
                    writer.write_tensor_data(arrays.pop(key)[0])
                del read, arrays
        finally:
            writer.close()
    return path


def _warn_over_target(plan: Plan, layout: GGUFLayout, path: Path) -> None:
    """A plan allocated for a GGUF file size (`mixbits allocate --candidates gguf --target-size-mb`)
    records its target; the metadata it was sized with (file name, tokenizer.ggml.pre) may differ."""
    target = (plan.meta.get("gguf") or {}).get("target_bytes")
    if target is None:
        return
    size = layout.file_bytes()
    if size > target:
        sized = plan.meta["gguf"]
        log.warning("%s will be %d bytes, %d above the %d the plan was allocated for: it was sized for general.name "
                    "%r and tokenizer.ggml.pre %r; name the file %s.gguf and pass that pre to fit", path, size,
                    size - target, target, sized.get("general_name"), sized.get("tokenizer_pre"),
                    sized.get("general_name"))


