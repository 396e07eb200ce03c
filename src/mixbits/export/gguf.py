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

import io
import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf.gguf_writer import WriterState
from torch import Tensor, nn

from mixbits.errors import UserError
from mixbits.export.from_native import StoredSource, model_source
from mixbits.export.ggml_blocks import block_type, encode_blocks, encode_ggml
from mixbits.export.gguf_vocab import add_tokenizer
from mixbits.export.rules import ExportError, Rules, require_expressible
from mixbits.export.staging import staged_file
from mixbits.export.tensors import StoredLayer
from mixbits.model.apply import layer_shapes
from mixbits.plan import Plan
from mixbits.quant.affine import QParams, minmax_qparams, quantize
from mixbits.quant.kquant import GGMLParams
from mixbits.quant.spec import GGML_TYPES, GGMLSpec, QuantSpec

log = logging.getLogger(__name__)

RULES = Rules("gguf", bits=(4, 5, 8), row_multiple=32, ggml_types=tuple(GGML_TYPES))
REGROUP = ("repeat", "requantize")
QUANTIZED_BY = "mixbits"  # general.quantized_by: marks a GGUF file that mixbits wrote


def is_mixbits_gguf(path: str | Path) -> bool:
    """Whether `path` is a GGUF file that mixbits wrote (its general.quantized_by says so)."""
    try:
        field = gguf.GGUFReader(str(path)).get_field(gguf.Keys.General.QUANTIZED_BY)
        return field is not None and field.contents() == QUANTIZED_BY
    except (ValueError, OSError, IndexError, KeyError, TypeError):  # not GGUF at all, or damaged: not ours
        return False
_FILE_TYPES = {Q.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0, Q.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1,
               Q.Q5_0: gguf.LlamaFileType.MOSTLY_Q5_0, Q.Q5_1: gguf.LlamaFileType.MOSTLY_Q5_1,
               Q.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0, Q.Q2_K: gguf.LlamaFileType.MOSTLY_Q2_K,
               Q.Q3_K: gguf.LlamaFileType.MOSTLY_Q3_K_M, Q.Q4_K: gguf.LlamaFileType.MOSTLY_Q4_K_M,
               Q.Q5_K: gguf.LlamaFileType.MOSTLY_Q5_K_M, Q.Q6_K: gguf.LlamaFileType.MOSTLY_Q6_K}


@dataclass(frozen=True)
class GGUFArch:
    """How one family is written: its gguf architecture and whether q/k rows are permuted."""

    model_types: tuple[str, ...]
    arch: gguf.MODEL_ARCH
    permute_qk: bool


ARCHS = (
    GGUFArch(("llama", "mistral"), gguf.MODEL_ARCH.LLAMA, True),
    GGUFArch(("qwen2",), gguf.MODEL_ARCH.QWEN2, False),
    GGUFArch(("qwen3",), gguf.MODEL_ARCH.QWEN3, False),
)


def gguf_arch(config) -> GGUFArch:
    """The row of ARCHS for a transformers config; ExportError for families not written."""
    for row in ARCHS:
        if config.model_type in row.model_types:
            rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
            if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
                raise ExportError(f"RoPE type {rope.get('rope_type')!r} of this {config.model_type} model is not "
                                  "written by the GGUF exporter; export it with --format gptq or compressed")
            return row
    known = sorted(t for row in ARCHS for t in row.model_types)
    raise ExportError(f"model type {config.model_type!r} has no GGUF writer; supported: {', '.join(known)}")


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


def _gguf_name(name_map, key: str) -> str:
    base, _, suffix = key.rpartition(".")
    mapped = name_map.get_name(base)
    if mapped is None:
        raise ExportError(f"tensor {key!r} has no GGUF name for this architecture; it cannot be written as GGUF")
    return f"{mapped}.{suffix}"


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


@dataclass(frozen=True)
class TensorInfo:
    """What GGUF's tensor table says of one tensor before its data exists: bytes shape, numpy dtype, type."""

    shape: tuple[int, ...]
    dtype: type
    kind: Q

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def tensor_type(spec: QuantSpec | GGMLSpec) -> Q:
    """The ggml type a planned layer's weight is written in: a ggml spec's own type, an affine
    spec's legacy block type (`ggml_blocks.block_type`), F16 for a kept layer."""
    if spec.keep:
        return Q.F16
    return Q[spec.name] if isinstance(spec, GGMLSpec) else block_type(spec)


def plain_info(shape: tuple[int, ...]) -> TensorInfo:
    """A tensor the plan does not quantize (embedding, output head, norm, kept layer, bias):
    F32 when 1-D, F16 otherwise."""
    one_d = len(shape) == 1
    return TensorInfo(tuple(shape), np.float32 if one_d else np.float16, Q.F32 if one_d else Q.F16)


def weight_info(shape: tuple[int, int], spec: QuantSpec | GGMLSpec) -> TensorInfo:
    """The weight tensor of an [out, in] layer planned as `spec`, as the file stores it (ggml
    blocks as uint8 rows; a kept layer as a plain tensor). The caller checks the row first
    (`rules.spec_problem`)."""
    if spec.keep:
        return plain_info(shape)
    out_features, in_features = shape
    kind = tensor_type(spec)
    block, type_size = gguf.GGML_QUANT_SIZES[kind]
    return TensorInfo((out_features, in_features // block * type_size), np.uint8, kind)


def _part_infos(source: StoredSource, part, shapes, order) -> dict[str, TensorInfo]:
    """The tensors of one part as `_quantized_tensors` and `_plain` will give them, from shapes alone."""
    infos = {}
    for name in source.part_layers(part):
        infos[f"{name}.weight"] = weight_info(shapes[name], source.plan.specs[name])
        if name in source.biases:
            infos[f"{name}.bias"] = plain_info((shapes[name][0],))
    for key, meta in source.part_plain_metas(part).items():
        infos[key] = plain_info(meta.shape)
    return {k: infos[k] for k in sorted(infos, key=order.__getitem__)}


def _add_metadata(writer: gguf.GGUFWriter, config, arch: GGUFArch, file_type, name: str) -> None:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_name(name)
    writer.add_quantized_by(QUANTIZED_BY)  # how `is_mixbits_gguf` recognises an earlier export
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)


def _file_type(kinds: list[Q]):
    quantized = Counter(k for k in kinds if k in _FILE_TYPES)
    return _FILE_TYPES[quantized.most_common(1)[0][0]] if quantized else gguf.LlamaFileType.MOSTLY_F16


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
    infos = [i for part in source.parts() for i in _part_infos(source, part, shapes, order).values()]
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
            for part, part_infos in zip(layout.parts, layout.infos):
                read = source.read(part)
                arrays = {**_plain(read.plain, config, arch), **_quantized_tensors(read.layers, config, arch, regroup)}
                for key in part_infos:
                    writer.write_tensor_data(arrays.pop(key)[0])
                del read, arrays
        finally:
            writer.close()
    return path


@dataclass(frozen=True, eq=False)
class GGUFLayout:
    """A GGUF file before its tensor data: a `gguf.GGUFWriter` holding the metadata (tokenizer
    included) and the tensor table, with no file opened, and the tensors of each part in the
    order they are written. `write_gguf_from` writes it; `gguf_size` measures it."""

    arch: GGUFArch
    writer: gguf.GGUFWriter
    parts: list
    infos: list[dict[str, TensorInfo]]

    def file_bytes(self) -> int:
        """The size of the file: pad(header + metadata + tensor table) + Σ pad(tensor bytes), the
        first term serialised by the writer itself into memory (its state is restored after)."""
        sink, writer = io.BytesIO(), self.writer
        writer.fout, writer.state = [sink], WriterState.EMPTY
        try:
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
        finally:
            writer.fout, writer.state = None, WriterState.NO_FILE
        pad = gguf.GGUFWriter.ggml_pad
        data = sum(pad(info.nbytes, writer.data_alignment) for part in self.infos for info in part.values())
        return pad(sink.tell(), writer.data_alignment) + data


def gguf_layout(source: StoredSource, *, tokenizer_pre: str = "default", name: str = "model") -> GGUFLayout:
    """Everything the file holds but the tensor data, from shapes, config and tokenizer alone
    (`name` is general.name; the writer uses the file's stem). ExportError for a plan or model
    the format cannot store."""
    plan, structure = source.plan, source.structure
    config = structure.config
    arch = gguf_arch(config)
    shapes = layer_shapes(structure)
    require_expressible(RULES, plan, shapes)
    order = {k: i for i, k in enumerate(structure.state_dict())}
    parts = source.parts()
    infos = [_part_infos(source, part, shapes, order) for part in parts]
    name_map = gguf.get_tensor_name_map(arch.arch, config.num_hidden_layers)
    writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[arch.arch])
    _fill(writer, infos, name_map, config, arch, source.tokenizer, tokenizer_pre, name)
    return GGUFLayout(arch, writer, parts, infos)


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


def _fill(writer, infos, name_map, config, arch, tokenizer, tokenizer_pre, name) -> None:
    _add_metadata(writer, config, arch, _file_type([i.kind for part in infos for i in part.values()]), name)
    if tokenizer is not None:
        add_tokenizer(writer, tokenizer, config.vocab_size, tokenizer_pre)
    for part in infos:
        for key, info in part.items():
            raw = None if info.kind in (Q.F16, Q.F32) else info.kind
            writer.add_tensor_info(_gguf_name(name_map, key), info.shape, np.dtype(info.dtype), info.nbytes,
                                   raw_dtype=raw)
