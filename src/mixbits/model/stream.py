"""A model as a source of blocks: what every streamed stage asks of a model, lazy or loaded.

Idea: a streamed stage needs three things from a causal LM, never the whole of it at once:

    resident()  everything outside the blocks (embeddings, final norm, head) on the compute device
                (`hold=`: a lazy checkpoint may hold the embedding and head in that 16-bit dtype,
                rounded through it, computing in the compute dtype: model/upcast.py),
    block(i)    block i on the compute device,
    head        the model's own computation after its block loop (final norm, head, logit soft-capping,
                the loss), applied to hidden states X_L that the stage computed block by block.

`LazyCheckpoint` (model/lazy.py) provides the first two by reading tensors from the shards;
`LoadedModel` here provides them for a model already in memory by moving pieces to the device.
`head_forward` provides the third for any architecture without knowing its module names: it swaps
the block list for a single stand-in that ignores its input and returns X_L, then calls the model's
own forward, so everything the model does after its blocks (and its loss) is exactly the model's.

Peak memory: `resident()` holds the modules outside the blocks; `head_forward` adds one window's
logits [batch, seq, vocab] (and the embeddings of the ids, which the stand-in discards).
Trade-off: the embeddings run once more per head call (a lookup: negligible) in exchange for no
per-architecture code.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from mixbits.model.arch import find_blocks
from mixbits.model.blockwise import block_on, to_device

__all__ = ["BlockSource", "LoadedModel", "as_source", "call_block", "head_forward"]


@runtime_checkable
class BlockSource(Protocol):
    """What streamed stages use: the model object, the compute device, and the two contexts."""

    model: nn.Module
    device: torch.device
    n_blocks: int
    block_path: str

    def block(self, index: int) -> contextlib.AbstractContextManager[nn.Module]: ...

    def resident(self, hold: torch.dtype | None = None) -> contextlib.AbstractContextManager[nn.Module]: ...


class LoadedModel:
    """A model already in memory seen as a block source: pieces visit `device` while used.

    Where the model already sits on `device`, both contexts move nothing.
    """

    def __init__(self, model: nn.Module, device: torch.device | str):
        self.model, self.device = model, torch.device(device)
        self.block_path, self._blocks = find_blocks(model)
        self.n_blocks = len(self._blocks)

    def block(self, index: int) -> contextlib.AbstractContextManager[nn.Module]:
        return block_on(self._blocks[index], self.device)

    @contextlib.contextmanager
    def resident(self, hold: torch.dtype | None = None) -> Iterator[nn.Module]:
        """`hold` is accepted for the protocol and ignored: a loaded model's tensors stay as they are
        (a caller that wants them rounded rounds copies, as `quantize_streamed` does)."""
        outside = [p for n, p in self.model.named_parameters() if not n.startswith(self.block_path + ".")]
        home = outside[0].device if outside else self.device
        if home == self.device:
            yield self.model
            return
        with _without_blocks(self.model, self.block_path):
            self.model.to(self.device)
        try:
            yield self.model
        finally:
            with _without_blocks(self.model, self.block_path):
                self.model.to(home)


def as_source(model: nn.Module | BlockSource, device: torch.device | str | None = None) -> BlockSource:
    """`model` itself if it is a block source (a LazyCheckpoint), else a `LoadedModel` on `device`."""
    if isinstance(model, BlockSource) and not isinstance(model, nn.Module):
        return model
    if device is None:
        raise ValueError("device is required for a loaded model (where its blocks run)")
    return LoadedModel(model, device)


@contextlib.contextmanager
def _swapped_blocks(model: nn.Module, path: str, replacement: nn.ModuleList) -> Iterator[None]:
    owner_name, _, leaf = path.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    original = owner._modules[leaf]
    owner._modules[leaf] = replacement
    try:
        yield
    finally:
        owner._modules[leaf] = original


def _without_blocks(model: nn.Module, path: str) -> contextlib.AbstractContextManager[None]:
    return _swapped_blocks(model, path, nn.ModuleList())


def call_block(block: nn.Module, hidden: torch.Tensor, args: tuple, kwargs: dict) -> tuple[torch.Tensor, bool]:
    """(new hidden state, whether the block returned a tuple), arguments moved to the hidden's device."""
    device = hidden.device
    out = block(hidden, *to_device(args, device), **to_device(kwargs, device))
    if isinstance(out, torch.Tensor):
        return out, False
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0], True
    raise TypeError(f"a block returned {type(out).__name__}; expected a tensor or a tuple starting with one")


class _StandIn(nn.Module):
    """Takes the place of the whole block list: returns X_L whatever it is given.

    Attribute reads it does not have (a layer's `attention_type`, read by some model loops) go to
    the real last block, so the model's loop runs as it would for that block.
    """

    def __init__(self, hidden: torch.Tensor, template: nn.Module, as_tuple: bool):
        super().__init__()
        object.__setattr__(self, "_template", template)
        self._hidden, self._as_tuple = hidden, as_tuple

    def forward(self, *args, **kwargs):
        return (self._hidden,) if self._as_tuple else self._hidden

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_template"), name)


def head_forward(
    model: nn.Module, hidden: torch.Tensor, input_ids: torch.Tensor, *, labels: bool = False, as_tuple: bool = False
):
    """The model's output (logits, and the loss on `input_ids` when `labels`) for hidden states `hidden`
    [batch, seq, hidden] leaving its last block. `input_ids` [batch, seq] are the windows those states
    came from (the model still embeds them; the stand-in discards the result). `as_tuple`: whether the
    real blocks return tuples (`call_block` says). Runs with grad if the caller's mode has it."""
    path, blocks = find_blocks(model)
    stand_in = nn.ModuleList([_StandIn(hidden, blocks[len(blocks) - 1], as_tuple)])
    ids = input_ids.to(hidden.device)
    with _swapped_blocks(model, path, stand_in):
        return model(input_ids=ids, labels=ids if labels else None, use_cache=False)
