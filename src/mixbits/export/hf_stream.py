"""Write a Hugging Face model folder block by block: one model.safetensors whose header is
computed from shapes first (`shard_file.header_bytes`), then each part's tensors produced,
appended and released in turn. Peak: one part's tensors (a block), never the whole model.

The folder is built in a staged temporary and renamed into place (`staging.staged_dir`), so a
crash never leaves half an export. Side files are written last, so they may report what the
data pass found (a callable gives them then).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from torch import Tensor

from mixbits.export.shard_file import TensorMeta, shard_writer
from mixbits.export.staging import staged_dir
from mixbits.io import atomic_write_json

WEIGHTS = "model.safetensors"
HF_METADATA = {"format": "pt"}  # what transformers expects in a safetensors header


def write_parts(path: Path, metas: Sequence[Mapping[str, TensorMeta]],
                produce: Callable[[int], Mapping[str, Tensor]]) -> None:
    """Write the safetensors file `path`: part i's tensors `produce(i)`, exactly those of `metas[i]`."""
    every: dict[str, TensorMeta] = {}
    for part in metas:
        clash = set(part) & set(every)
        if clash:
            raise ValueError(f"tensor {sorted(clash)[0]!r} appears in two parts")
        every.update(part)
    with shard_writer(path, every, HF_METADATA) as writer:
        for i, part in enumerate(metas):
            tensors = produce(i)
            if set(tensors) != set(part):
                extra, lacking = sorted(set(tensors) - set(part)), sorted(set(part) - set(tensors))
                raise ValueError(f"part {i} produced {extra[:3]} beyond its header and lacks {lacking[:3]}")
            for name in part:
                writer.write(name, tensors[name])
            del tensors


def write_streamed_folder(
    path: str | Path,
    config,
    metas: Sequence[Mapping[str, TensorMeta]],
    produce: Callable[[int], Mapping[str, Tensor]],
    tokenizer=None,
    side_files: Callable[[], Mapping[str, object]] | None = None,
    kind: str = "export",
) -> Path:
    """Write config.json, model.safetensors (parts streamed), the tokenizer and side files to `path`."""
    path = Path(path)
    with staged_dir(path, kind=kind) as tmp:
        write_parts(tmp / WEIGHTS, metas, produce)
        config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, data in (side_files() if side_files else {}).items():
            atomic_write_json(tmp / name, data)
    return path
