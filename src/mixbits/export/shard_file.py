"""safetensors files written tensor by tensor, with a header computed from shapes alone.

The format (the safetensors specification): 8 bytes little-endian N, N bytes of JSON
`{"__metadata__": {str: str}, name: {"dtype", "shape", "data_offsets": [begin, end]}, ...}`
padded with spaces to a multiple of 8, then the tensors' bytes, contiguous, in offset order.

Why mixbits writes it itself instead of `safetensors.torch.save_file`: that call needs every
tensor in memory at once and serialises them into one more buffer (twice the shard), and it
orders the data by dtype, an internal rule. Here the header is a pure function of (name, shape,
dtype) in the caller's order, so
  * `file_nbytes(metas)` is the exact size of the file before any tensor exists (what the size
    of a quantized model is computed from, and what lets a writer emit the header first), and
  * `ShardWriter` streams the data: the header first, then each tensor as it is produced, each
    checked against its header entry; peak memory is the tensor being written.
Files are written through `mixbits.io.atomic_file` (a kill leaves no half file under the final
name) and read back with `safetensors.safe_open`, which accepts any order of contiguous data.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from mixbits.io import atomic_file

DTYPE_TAGS = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}


@dataclass(frozen=True)
class TensorMeta:
    """What the header says of one tensor: its shape and dtype."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * self.dtype.itemsize

    @classmethod
    def of(cls, tensor) -> "TensorMeta":
        """The meta of anything with `.shape` and `.dtype` (a tensor, a meta-device tensor)."""
        return cls(tuple(int(s) for s in tensor.shape), tensor.dtype)


def header_bytes(metas: Mapping[str, TensorMeta], metadata: Mapping[str, str] | None = None) -> bytes:
    """The header JSON (padded) of a file holding `metas` in this order."""
    entries: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, meta in metas.items():
        if meta.dtype not in DTYPE_TAGS:
            raise ValueError(f"tensor {name!r} has dtype {meta.dtype}, which safetensors files here do not hold; "
                             f"use one of {', '.join(str(d) for d in DTYPE_TAGS)}")
        entries[name] = {"dtype": DTYPE_TAGS[meta.dtype], "shape": list(meta.shape),
                         "data_offsets": [offset, offset + meta.nbytes]}
        offset += meta.nbytes
    text = json.dumps(entries, separators=(",", ":")).encode("utf-8")
    return text + b" " * (-len(text) % 8)


def file_nbytes(metas: Mapping[str, TensorMeta], metadata: Mapping[str, str] | None = None) -> int:
    """Exact bytes of the file `ShardWriter` writes for `metas`: 8 + header + data."""
    return 8 + len(header_bytes(metas, metadata)) + sum(m.nbytes for m in metas.values())


def _raw(tensor: Tensor):
    """The tensor's bytes as a buffer, without a copy when it is already contiguous on the CPU."""
    if sys.byteorder != "little":
        raise RuntimeError("safetensors files are little-endian; this machine is big-endian")
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy() if flat.numel() else b""


class ShardWriter:
    """Writes one file: the header at creation, then `write(name, tensor)` in header order."""

    def __init__(self, handle, metas: Mapping[str, TensorMeta], metadata: Mapping[str, str] | None) -> None:
        self._handle, self._pending = handle, list(metas.items())
        self._digest = hashlib.sha256()
        header = header_bytes(metas, metadata)
        self._put(len(header).to_bytes(8, "little"))
        self._put(header)

    def _put(self, data) -> None:
        self._handle.write(data)
        self._digest.update(data)

    def write(self, name: str, tensor: Tensor) -> None:
        if not self._pending:
            raise ValueError(f"tensor {name!r} is not in this file's header, which is already complete")
        want_name, want = self._pending.pop(0)
        got = TensorMeta.of(tensor)
        if name != want_name or got != want:
            raise ValueError(f"tensor {name!r} {got.shape} {got.dtype} written where the header expects "
                             f"{want_name!r} {want.shape} {want.dtype}")
        self._put(_raw(tensor))

    @property
    def sha256(self) -> str:
        return self._digest.hexdigest()

    def check_complete(self) -> None:
        if self._pending:
            raise ValueError(f"{len(self._pending)} tensor(s) of the header were never written, "
                             f"e.g. {self._pending[0][0]!r}")


@contextmanager
def shard_writer(path: str | Path, metas: Mapping[str, TensorMeta],
                 metadata: Mapping[str, str] | None = None) -> Iterator[ShardWriter]:
    """Write the file `path` atomically, its data streamed through the yielded `ShardWriter`."""
    with atomic_file(path) as tmp, open(tmp, "wb") as handle:
        writer = ShardWriter(handle, metas, metadata)
        yield writer
        writer.check_complete()
        handle.flush()
        os.fsync(handle.fileno())


def write_shard(path: str | Path, tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None) -> str:
    """Write `tensors` (in name order) to `path` atomically; returns the file's sha256."""
    ordered = {name: tensors[name] for name in sorted(tensors)}
    with shard_writer(path, {n: TensorMeta.of(t) for n, t in ordered.items()}, metadata) as writer:
        for name, tensor in ordered.items():
            writer.write(name, tensor)
    return writer.sha256


def read_header(path: str | Path) -> dict[str, TensorMeta]:
    """The tensors a safetensors file holds (name -> meta), from its header alone."""
    tags = {tag: dtype for dtype, tag in DTYPE_TAGS.items()}
    with open(path, "rb") as handle:
        n = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(n).decode("utf-8"))
    return {name: TensorMeta(tuple(e["shape"]), tags[e["dtype"]]) for name, e in header.items()
            if name != "__metadata__"}
