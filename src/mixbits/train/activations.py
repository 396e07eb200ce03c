"""The activation streams of block-wise training, kept in CPU memory or on disk.

Block-AP follows two streams through the model, for the training and the validation windows:

    fp:  X_{i+1} = block_i(X_i)          the original model: block i's target is fp's X_{i+1}
    q:   Y_{i+1} = block_i^q(Y_i)        the quantized model: block i trains on input Y_i

A `Stream` is one of them at one block boundary: a list of hidden-state batches
[batch, seq, hidden] plus each batch's other block arguments (mask, rotary embeddings, ...),
captured once from the model that stream belongs to. `advance` runs a block (only it on the
device) over every batch and returns the stream one boundary further. The hidden states wait
on the CPU, or with a directory (`offload`) one file per batch, read back when needed; files of
a stream are deleted by `close` once the next boundary exists. torch.save/load round-trips are
exact, so offloading never changes a number.

Trade-off: 4 streams x windows x seq x hidden x 4 B (train + val, fp + q) of CPU memory or disk,
against recomputing earlier blocks. Capture runs in chunks of windows so an offloaded run never
holds all of block 0's inputs in memory at once.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from mixbits.model.blockwise import BlockInputs, block_forward, capture_block_inputs

CAPTURE_CHUNK = 32  # batches captured per forward of the model's embeddings


@dataclass(eq=False)
class Stream:
    """Hidden-state batches and their block arguments at one block boundary."""

    args: list[tuple] = field(default_factory=list)
    kwargs: list[dict] = field(default_factory=list)
    directory: Path | None = None
    _hidden: list = field(default_factory=list)

    def __len__(self) -> int:
        return len(self._hidden)

    def append(self, hidden: Tensor, args: tuple, kwargs: dict) -> None:
        hidden = hidden.detach().to("cpu")
        if self.directory is not None:
            path = self.directory / f"{len(self._hidden):06d}.pt"
            torch.save(hidden.contiguous(), path)
            hidden = path
        self._hidden.append(hidden)
        self.args.append(args)
        self.kwargs.append(kwargs)

    def hidden(self, i: int) -> Tensor:
        item = self._hidden[i]
        return torch.load(item, weights_only=True) if isinstance(item, Path) else item

    def batch(self, i: int) -> tuple[Tensor, tuple, dict]:
        return self.hidden(i), self.args[i], self.kwargs[i]

    def __iter__(self) -> Iterator[tuple[Tensor, tuple, dict]]:
        return (self.batch(i) for i in range(len(self)))

    def close(self) -> None:
        """Drop the hidden states (and their files)."""
        self._hidden.clear()
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)


def new_stream(offload_root: Path | None) -> Stream:
    """An empty stream, in memory, or in a fresh folder under `offload_root`."""
    if offload_root is None:
        return Stream()
    offload_root.mkdir(parents=True, exist_ok=True)
    return Stream(directory=Path(tempfile.mkdtemp(prefix="stream-", dir=offload_root)))


def capture_stream(model: nn.Module, windows: Tensor, *, batch_size: int, offload_root: Path | None,
                   progress: bool) -> Stream:
    """Block-0 inputs of `model` for `windows` [n, seqlen], batch by batch, chunk by chunk."""
    stream = new_stream(offload_root)
    chunk = batch_size * CAPTURE_CHUNK
    for start in range(0, len(windows), chunk):
        inputs = capture_block_inputs(model, windows[start:start + chunk], batch_size=batch_size,
                                      store="cpu", progress=progress)
        for hidden, args, kwargs in zip(inputs.hidden, inputs.args, inputs.kwargs):
            stream.append(hidden, args, kwargs)
    return stream


@torch.no_grad()
def advance(block: nn.Module, stream: Stream, *, device: torch.device, offload_root: Path | None) -> Stream:
    """The stream after `block` (already on `device`): same arguments, new hidden states."""
    out = new_stream(offload_root)
    for hidden, args, kwargs in stream:
        (new,) = block_forward(block, BlockInputs((hidden,), (args,), (kwargs,)), device=device, store="cpu")
        out.append(new, args, kwargs)
    return out
