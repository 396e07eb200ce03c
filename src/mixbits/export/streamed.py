"""Export a run's native folder in any format, block by block (what `mixbits export` runs).

`export_stored(source, path, fmt)` takes a `from_native.StoredSource` (a native folder opened with
`stored_source`, or a model in memory with `model_source`) and hands it to the format's streamed
writer: each reads one block, converts it, appends it to the output and releases it before the
next. Peak memory: one block's packed tensors and their unpacked codes and float32 weights, plus
the tensors outside the blocks while they are written; never the whole model.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from mixbits.export import compressed, gguf, gptq
from mixbits.export.formats import get_format
from mixbits.export.from_native import Part, PartTensors, StoredSource
from mixbits.export.native_shards import NativeWriter
from mixbits.export.staging import staged_dir
from mixbits.model.arch import find_blocks
from mixbits.quant.packed import packed_tensors


def _packed_block(read: PartTensors) -> dict[str, Tensor]:
    tensors = dict(read.plain)
    for name, layer in read.layers.items():
        tensors.update(packed_tensors(name, layer.weight, layer.spec, layer.qparams, layer.bias))
    return tensors


def write_native_from(source: StoredSource, path: str | Path) -> Path:
    """Write `source` as a native folder (sharded layout), block by block; codes are kept exactly
    (each layer is packed again from its stored codes' weights with its own QParams)."""
    path = Path(path)
    block_path, blocks = find_blocks(source.structure)
    parts = source.parts()
    with staged_dir(path, kind="native") as tmp:
        writer = NativeWriter(tmp, source.plan, source.config, source.tokenizer, n_blocks=len(blocks),
                              block_path=block_path, resume=False)
        for part in (p for p in parts if p.index is not None):
            writer.write_block(part.index, _packed_block(source.read(part)))  # released before the next
        rest = Part(None, tuple(n for p in parts if p.index is None for n in p.names))  # one shard, read last
        writer.write_rest(source.read(rest).plain, source.tied)
        writer.finish()
    return path


_WRITERS = {"native": write_native_from, "gptq": gptq.write_gptq_from, "compressed": compressed.write_compressed_from,
            "gguf": gguf.write_gguf_from}


def export_stored(source: StoredSource, path: str | Path, fmt: str, **options) -> Path:
    """Write `source` in format `fmt` at `path` (for gguf a folder path receives model.gguf); `options`
    as `formats.export` takes them."""
    chosen = get_format(fmt)
    path = Path(path)
    if chosen.file_name is not None and path.suffix != Path(chosen.file_name).suffix:
        path = path / chosen.file_name
    return _WRITERS[fmt](source, path, **options)
