"""Run a model one transformer block at a time on captured calibration inputs.

Idea: the layers of block i see only what block i-1 hands it, so block-wise algorithms (GPTQ,
Block-AP training) never need the whole model on the accelerator. We run the model once up to
block 0 and stop it there, keeping the hidden states X_0 [batch, seq, hidden] of every batch of
windows together with the other arguments block 0 was called with (attention mask, rotary
position embeddings, position ids, cache flags). Then

    X_{i+1} = block_i(X_i, *args, **kwargs)        for i = 0 .. L-1,

with only block i on the device. The extra arguments are the same for every block (the model
computes them once before its block loop), so they are captured once per batch and reused.
Final norm and head are left to the caller: X_L is what the model's last norm receives.

How the stop works: a forward pre-hook on block 0 records (args, kwargs) and raises the private
`_StopForward`, which unwinds the model's forward; nothing past the embeddings runs. This sees
exactly what the model passes, so it serves every architecture whose blocks are called with
the hidden state first (Llama family, GPT-2, ...) without per-architecture code.

Trade-off: captured states cost n * seq * hidden floats per block boundary (kept on `store`,
the CPU by default: 128 windows x 2048 x 4096 x 4 B = 4 GiB), traded for holding one block on
the device. Extra arguments that are equal from one batch to the next (the causal mask when
all windows have one length) are stored once, not per batch. Source: the `Catcher` module of
IST-DASLab/gptq and the block loop of llm-compressor's sequential pipeline.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch
from torch import nn
from tqdm.auto import tqdm

from mixbits.model.arch import find_blocks

log = logging.getLogger(__name__)

__all__ = ["BlockInputs", "block_forward", "block_on", "capture_block_inputs", "run_blocks"]


class _StopForward(Exception):
    """Raised by the block-0 pre-hook once its inputs are recorded; never leaves this module."""


@dataclass(frozen=True)
class BlockInputs:
    """What a block receives, per batch of windows.

    hidden: one tensor [batch, seq, hidden] per batch. args / kwargs: the other positional and
    keyword arguments of that batch's block call, kept on the device they were captured on
    (moved to the block's device at call time).
    """

    hidden: tuple[torch.Tensor, ...]
    args: tuple[tuple, ...]
    kwargs: tuple[dict, ...]

    def __len__(self) -> int:
        return len(self.hidden)

    @property
    def n_tokens(self) -> int:
        """Tokens over all batches (batch * seq summed)."""
        return sum(h.shape[0] * h.shape[1] for h in self.hidden)

    def with_hidden(self, hidden: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> "BlockInputs":
        """The same extra arguments with new hidden states (a block's outputs)."""
        if len(hidden) != len(self.hidden):
            raise ValueError(f"{len(hidden)} hidden-state batches given for {len(self.hidden)} captured batches")
        return replace(self, hidden=tuple(hidden))


def to_device(value, device: torch.device):
    """`value` with every tensor inside (nested tuples, lists, dicts) moved to `device`."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(to_device(v, device) for v in value)
    if isinstance(value, list):
        return [to_device(v, device) for v in value]
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


def _same(a, b) -> bool:
    """Structural equality of captured arguments, tensors compared by value."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b))
    if isinstance(a, (tuple, list)) and type(a) is type(b):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a is b or (type(a) is type(b) and isinstance(a, (bool, int, float, str)) and a == b)


def _dedupe(value, previous):
    """`previous` where it equals `value` (so repeated masks share one tensor), else `value`."""
    if previous is not None and _same(value, previous):
        return previous
    if isinstance(value, dict) and isinstance(previous, dict):
        return {k: _dedupe(v, previous.get(k)) for k, v in value.items()}
    if isinstance(value, tuple) and isinstance(previous, tuple) and len(value) == len(previous):
        return tuple(_dedupe(v, p) for v, p in zip(value, previous))
    return value


def _input_device(model: nn.Module) -> torch.device:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    param = next(embeddings.parameters()) if embeddings is not None else next(model.parameters())
    return param.device


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    batch_size: int = 1,
    store: torch.device | str = "cpu",
    progress: bool = True,
) -> BlockInputs:
    """Hidden states and call arguments entering block 0, for `windows` LongTensor [n, seqlen].

    The model runs (up to block 0) where its embeddings are; hidden states go to `store`, the
    extra arguments stay where the model made them. Hooks are removed also when it fails.
    """
    if windows.dim() != 2 or windows.dtype != torch.long or windows.shape[0] == 0:
        raise ValueError(
            f"windows must be a non-empty LongTensor [n, seqlen]; got {tuple(windows.shape)} {windows.dtype}"
        )
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer (windows per forward)")
    _, blocks = find_blocks(model)
    store, where = torch.device(store), _input_device(model)
    hidden, args, kwargs = [], [], []
    seen: dict = {}

    def hook(module, call_args, call_kwargs):
        if not call_args:
            raise RuntimeError(f"block 0 ({type(module).__name__}) was called without a positional hidden state")
        hidden.append(call_args[0].detach().to(store))
        args.append(_dedupe(tuple(call_args[1:]), seen.get("args")))
        kwargs.append(_dedupe(dict(call_kwargs), seen.get("kwargs")))
        seen.update(args=args[-1], kwargs=kwargs[-1])
        raise _StopForward

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for start in tqdm(range(0, len(windows), batch_size), desc="capture", disable=not progress, leave=False):
            try:
                model(input_ids=windows[start : start + batch_size].to(where), use_cache=False)
            except _StopForward:
                continue
            raise RuntimeError(f"the forward of {type(model).__name__} finished without calling block 0")
    finally:
        handle.remove()
    log.debug("captured block-0 inputs: %d batches, %d tokens", len(hidden), windows.numel())
    return BlockInputs(tuple(hidden), tuple(args), tuple(kwargs))


def _device_of(module: nn.Module) -> torch.device | None:
    param = next(module.parameters(), None)
    return None if param is None else param.device


@contextlib.contextmanager
def block_on(block: nn.Module, device: torch.device | str) -> Iterator[nn.Module]:
    """Move `block` to `device` for the duration, then back to where it was (a no-op if there)."""
    home = _device_of(block)
    block.to(device)
    try:
        yield block
    finally:
        if home is not None:
            block.to(home)


def _hidden_of(output) -> torch.Tensor:
    """A block's new hidden state: the tensor itself (transformers 5) or the first of a tuple."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"a block returned {type(output).__name__}; expected a tensor or a tuple starting with one")


@torch.no_grad()
def block_forward(
    block: nn.Module, inputs: BlockInputs, *, device: torch.device | str, store: torch.device | str | None = None
) -> list[torch.Tensor]:
    """Outputs of `block` (already on `device`) for every captured batch, kept on `store`
    (default: where each input batch was)."""
    device = torch.device(device)
    outputs = []
    for hidden, args, kwargs in zip(inputs.hidden, inputs.args, inputs.kwargs):
        out = _hidden_of(block(hidden.to(device), *to_device(args, device), **to_device(kwargs, device)))
        outputs.append(out.detach().to(hidden.device if store is None else store))
    return outputs


@torch.no_grad()
def run_blocks(
    model: nn.Module, inputs: BlockInputs, *, device: torch.device | str, progress: bool = True
) -> BlockInputs:
    """Run every block in turn, each moved to `device` only while it runs; returns the hidden
    states leaving the last block (what the final norm receives)."""
    _, blocks = find_blocks(model)
    for block in tqdm(blocks, desc="blocks", disable=not progress, leave=False):
        with block_on(block, device):
            inputs = inputs.with_hidden(block_forward(block, inputs, device=device))
    return inputs
