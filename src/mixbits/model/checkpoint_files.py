"""Checkpoint files: the shard index, the tensors the safetensors headers list (`checkpoint_tensors`,
`read_tensor`: one tensor's bytes by a plain file read at its header offset), and pickle-only
checkpoints converted once into safetensors.

A Hugging Face folder holds its weights as `model.safetensors`, as shards listed in
`model.safetensors.index.json`, or (older uploads) as pickles: `pytorch_model.bin` or shards listed in
`pytorch_model.bin.index.json`. A pickle can run arbitrary code when loaded, and it cannot be read one
tensor at a time, so it is converted once, shard by shard, with torch's weights-only loader (which
refuses any object that is not a tensor or a plain container) into safetensors in a cache folder.
The cache key covers each file's resolved path, size and modification time and this converter's
version; the copy appears by an atomic rename, so an interrupted conversion is redone, not trusted.

Peak memory of a conversion: one pickle shard, memory-mapped (`torch.load(mmap=True)`), plus the
clones of tensors that share storage with another (safetensors stores no aliases).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from mixbits.errors import UserError
from mixbits.safeload import load_file, safetensors_header

log = logging.getLogger(__name__)

__all__ = ["PICKLE_INDEX", "PICKLE_SINGLE", "SAFE_INDEX", "SAFE_SINGLE", "TensorEntry", "checkpoint_tensors",
           "convert_pickle_checkpoint", "index_files", "read_tensor"]

SAFE_SINGLE, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
PICKLE_SINGLE, PICKLE_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
_CONVERTER_VERSION = "1"  # part of the conversion cache key: bump when the conversion changes
_SAFE_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                "BOOL": torch.bool}


def index_files(index: Path) -> dict[str, Path]:
    """Tensor name -> shard path from an index file, refusing shards that are listed but absent."""
    document = load_file(index, "shard index")
    weight_map = document.get("weight_map") if isinstance(document, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise UserError(f"{index} has no 'weight_map' of tensor name -> shard file; re-download or re-save the "
                        f"checkpoint with save_pretrained")
    shards = {name: index.parent / shard for name, shard in weight_map.items()}
    missing = sorted({p.name for p in shards.values() if not p.is_file()})
    if missing:
        raise UserError(f"{index} lists {len(missing)} shard(s) that are not in {index.parent}: "
                        f"{', '.join(missing[:5])}; copy or re-download the missing shard files (the download "
                        f"was probably interrupted)")
    return shards


def _pickle_files(folder: Path) -> list[Path]:
    if (folder / PICKLE_INDEX).is_file():
        return sorted(set(index_files(folder / PICKLE_INDEX).values()))
    return [folder / PICKLE_SINGLE]


def _conversion_key(files: list[Path]) -> str:
    digest = hashlib.sha256(_CONVERTER_VERSION.encode())
    for file in files:
        stat = file.stat()
        digest.update(f"{file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def _load_weights_only(file: Path) -> dict[str, torch.Tensor]:
    import pickle

    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as err:
        raise UserError(f"{file} cannot be read with torch's weights-only loader ({str(err).splitlines()[0]}); "
                        f"mixbits never unpickles arbitrary objects: convert it to safetensors yourself from a "
                        f"source you trust (from_pretrained, then save_pretrained)") from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{file} is not a flat state dict of tensors; save it again with save_pretrained")
    return state


def convert_pickle_checkpoint(folder: str | Path, *, cache_dir: str | Path | None = None) -> Path:
    """The safetensors copy of a pickle-only checkpoint, converted once (shard by shard) into `cache_dir`.

    Default `cache_dir`: `<mixbits home>/converted`. The copy appears by an atomic rename, so an
    interrupted conversion is redone rather than trusted. Tensors that share storage are cloned
    (safetensors stores no aliases); tied weights are re-tied by `LazyCheckpoint`.
    """
    from safetensors.torch import save_file

    from mixbits.data.cache import mixbits_home, safe_name

    folder = Path(folder)
    files = _pickle_files(folder)
    cache = Path(cache_dir) if cache_dir is not None else mixbits_home() / "converted"
    target = cache / f"{safe_name(folder.resolve().name)}-{_conversion_key(files)}"
    if (target / SAFE_INDEX).is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    log.info("converting the pickle checkpoint %s once to safetensors at %s (torch weights-only loader)",
             folder, target)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=cache))
    try:
        weight_map = {}
        for i, file in enumerate(files):
            state, seen = _load_weights_only(file), set()
            shard = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
            tensors = {}
            for key, value in state.items():
                ptr = value.untyped_storage().data_ptr()
                tensors[key] = value.clone().contiguous() if ptr in seen else value.contiguous()
                seen.add(ptr)
                weight_map[key] = shard
            save_file(tensors, str(tmp / shard), metadata={"format": "pt"})
            del state, tensors
        (tmp / SAFE_INDEX).write_text(json.dumps({"metadata": {"converted_from": str(folder)},
                                                  "weight_map": weight_map}, indent=1))
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / SAFE_INDEX).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


@dataclass(frozen=True)
class TensorEntry:
    """Where one checkpoint tensor lives: its shard, shape and stored dtype (read from the header only)."""

    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int = -1  # where its bytes start in the file (-1: unknown; read through safetensors then)

    @property
    def nbytes(self) -> int:
        return _numel(self.shape) * self.dtype.itemsize


def _numel(shape: Iterable[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _headers(files: Iterable[Path]) -> dict[str, TensorEntry]:
    """Every tensor's entry from the safetensors headers (no tensor data is read; a truncated or corrupt
    shard is refused here, naming it)."""
    entries: dict[str, TensorEntry] = {}
    for file in files:
        header, start = safetensors_header(file, "checkpoint shard")
        for key, info in header.items():
            dtype = _SAFE_DTYPES.get(info.get("dtype"))
            if dtype is None:
                raise UserError(f"{file}: tensor {key!r} has dtype {info.get('dtype')}, which mixbits cannot "
                                f"load; accepted: {sorted(_SAFE_DTYPES)}")
            shape, (begin, end) = tuple(int(d) for d in info["shape"]), info["data_offsets"]
            if end - begin != _numel(shape) * dtype.itemsize:
                raise UserError(f"checkpoint shard {str(file)!r} is corrupt: tensor {key!r} of shape {list(shape)} "
                                f"{info['dtype']} spans {end - begin} bytes; copy or write it again")
            entries[key] = TensorEntry(file, shape, dtype, start + begin)
    return entries


def read_tensor(handle, entry: TensorEntry) -> torch.Tensor:
    """One tensor read with a plain file read into fresh memory (no mapping: its pages never stay resident)."""
    if sys.byteorder != "little":
        raise UserError(f"{entry.file}: safetensors data is little-endian and this machine is big-endian; "
                        "mixbits streams checkpoints on little-endian machines only")
    raw = torch.empty(entry.nbytes, dtype=torch.uint8)
    handle.seek(entry.offset)
    if entry.nbytes and handle.readinto(raw.numpy()) != entry.nbytes:
        raise UserError(f"checkpoint shard {str(entry.file)!r} ended inside a tensor; copy or write it again")
    return raw.view(entry.dtype).reshape(entry.shape)


def checkpoint_tensors(folder: str | Path, *, cache_dir: str | Path | None = None) -> dict[str, TensorEntry]:
    """Every tensor of the checkpoint in `folder` (headers only); a pickle-only one is converted first."""
    folder = Path(folder)
    if (folder / SAFE_INDEX).is_file():
        shards = index_files(folder / SAFE_INDEX)
        entries = _headers(sorted(set(shards.values())))
        absent = sorted(k for k, f in shards.items() if k not in entries or entries[k].file != f)
        if absent:
            raise UserError(f"{folder / SAFE_INDEX} places {len(absent)} tensor(s) in shards that do not hold them, "
                            f"e.g. {absent[0]!r} in {shards[absent[0]].name}; re-download the checkpoint")
        return entries
    if (folder / SAFE_SINGLE).is_file():
        return _headers([folder / SAFE_SINGLE])
    if (folder / PICKLE_INDEX).is_file() or (folder / PICKLE_SINGLE).is_file():
        return checkpoint_tensors(convert_pickle_checkpoint(folder, cache_dir=cache_dir))
    raise UserError(f"{folder} holds no weights: expected {SAFE_SINGLE}, {SAFE_INDEX}, {PICKLE_SINGLE} or "
                    f"{PICKLE_INDEX}; pass a folder written by save_pretrained")
