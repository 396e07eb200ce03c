"""A GGUF file before its tensor data: the architecture row, the metadata, the tokenizer and the
tensor table (names, shapes, types, bytes), built from shapes, config and tokenizer alone.

`gguf_layout` is what `export.gguf.write_gguf_from` writes ahead of the tensors and what
`export.gguf_size` measures, so a file's exact size is known before a byte is written
(`GGUFLayout.file_bytes`). `weight_info` / `tensor_type` say which ggml type and how many bytes a
planned layer takes (a ggml spec's own type, an affine spec's legacy block type, F16 when kept);
`plain_info` the same for what the plan does not quantize (F16, 1-D tensors F32).
"""

from __future__ import annotations

import io
from collections import Counter
from dataclasses import dataclass

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf.gguf_writer import WriterState

from mixbits.export.from_native import StoredSource
from mixbits.export.ggml_blocks import block_type
from mixbits.export.gguf_vocab import add_tokenizer
from mixbits.export.rules import ExportError, Rules, require_expressible
from mixbits.model.apply import layer_shapes
from mixbits.quant.spec import GGML_TYPES, GGMLSpec, QuantSpec

__all__ = ["ARCHS", "GGUFArch", "GGUFLayout", "QUANTIZED_BY", "RULES", "TensorInfo", "gguf_arch", "gguf_layout",
           "part_infos", "plain_info", "tensor_type", "weight_info"]

RULES = Rules("gguf", bits=(4, 5, 8), row_multiple=32, ggml_types=tuple(GGML_TYPES))


QUANTIZED_BY = "mixbits"  # general.quantized_by: marks a GGUF file that mixbits wrote


_FILE_TYPES = {Q.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0, Q.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1,
               Q.Q5_0: gguf.LlamaFileType.MOSTLY_Q5_0, Q.Q5_1: gguf.LlamaFileType.MOSTLY_Q5_1,
               Q.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0, Q.Q2_K: gguf.LlamaFileType.MOSTLY_Q2_K,
               Q.Q3_K: gguf.LlamaFileType.MOSTLY_Q3_K_M, Q.Q4_K: gguf.LlamaFileType.MOSTLY_Q4_K_M,
               Q.Q5_K: gguf.LlamaFileType.MOSTLY_Q5_K_M, Q.Q6_K: gguf.LlamaFileType.MOSTLY_Q6_K,
               Q.IQ4_NL: gguf.LlamaFileType.MOSTLY_IQ4_NL, Q.IQ4_XS: gguf.LlamaFileType.MOSTLY_IQ4_XS}


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


def _gguf_name(name_map, key: str) -> str:
    base, _, suffix = key.rpartition(".")
    mapped = name_map.get_name(base)
    if mapped is None:
        raise ExportError(f"tensor {key!r} has no GGUF name for this architecture; it cannot be written as GGUF")
    return f"{mapped}.{suffix}"


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


def part_infos(source: StoredSource, part, shapes, order) -> dict[str, TensorInfo]:
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
    infos = [part_infos(source, part, shapes, order) for part in parts]
    name_map = gguf.get_tensor_name_map(arch.arch, config.num_hidden_layers)
    writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[arch.arch])
    _fill(writer, infos, name_map, config, arch, source.tokenizer, tokenizer_pre, name)
    return GGUFLayout(arch, writer, parts, infos)


def _fill(writer, infos, name_map, config, arch, tokenizer, tokenizer_pre, name) -> None:
    _add_metadata(writer, config, arch, _file_type([i.kind for part in infos for i in part.values()]), name)
    if tokenizer is not None:
        add_tokenizer(writer, tokenizer, config.vocab_size, tokenizer_pre)
    for part in infos:
        for key, info in part.items():
            raw = None if info.kind in (Q.F16, Q.F32) else info.kind
            writer.add_tensor_info(_gguf_name(name_map, key), info.shape, np.dtype(info.dtype), info.nbytes,
                                   raw_dtype=raw)
