"""The empirical Fisher diagonal block by block: the full-model numbers with one block in memory.

Idea: the gradient of window n's loss with respect to block i's weights needs only block i, its input
X_i[n] and the gradient G_{i+1}[n] = ∂loss_n/∂X_{i+1}[n] of the loss with respect to its output. So:

    forward    X_{i+1} = block_i(X_i)                 i = 0 .. L-1, keeping every X_i
    head       G_L = ∂ loss(head(X_L)) / ∂X_L          the model's own final norm, head and loss
    backward   recompute block_i(X_i) with grad, then (G_i, g_i) = vjp(block_i, G_{i+1})
               F_i += g_i² (float32)                    i = L-1 .. 0

    F_i = (1/N) Σ_n g_{n,i}²,    g_{n,i} = ∂loss_n/∂W_i

which is `sensitivity/fisher.py`'s `empirical_fisher` (one backward per window) computed in another
order: the same operations on the same values, so the same numbers up to floating-point summation.

Peak memory: one block's weights (the source materializes one at a time; everything outside the
blocks only during capture and the head), the block boundaries X_0 .. X_L of the N windows
(N · S · H per boundary in the compute dtype; with `offload_dir`, only about three boundaries
in memory and the others on disk, one safetensors file each), the gradients G (one boundary),
one window's autograd graph through one block, and the Fisher of that block's linears in float32
(freed after `fisher_by_block` yields it; `streamed_fisher` keeps them all: the size of the
model's linears in float32).

Trade-off: every block runs forward twice (once to save its input, once with grad) instead of
once, and the boundaries are stored rather than recomputed (keeping only every k-th boundary and
recomputing would trade memory for more forwards). Source: gradient checkpointing (Chen et al.
2016) at block granularity, llm-compressor's sequential pipeline for the block loop.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from mixbits.model.arch import LinearInfo, get_weight
from mixbits.model.blockwise import capture_block_inputs
from mixbits.model.stream import BlockSource, as_source, call_block, head_forward
from mixbits.quant.spec import QuantSpec
from mixbits.sensitivity.fisher import fisher_damage
from mixbits.sensitivity.gradient import gradient_damage

log = logging.getLogger(__name__)

__all__ = ["fisher_by_block", "streamed_fisher", "streamed_fisher_table"]


class Boundaries:
    """The hidden states entering each block, in memory or one safetensors file per block."""

    def __init__(self, folder: str | Path | None, store: torch.device):
        self.folder, self.store, self.kept = (Path(folder) if folder is not None else None), store, {}
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)

    def put(self, index: int, hidden: Sequence[torch.Tensor]) -> None:
        if self.folder is None:
            self.kept[index] = tuple(hidden)
            return
        from safetensors.torch import save_file

        save_file({str(n): h.contiguous() for n, h in enumerate(hidden)}, str(self._path(index)))

    def take(self, index: int) -> tuple[torch.Tensor, ...]:
        if self.folder is None:
            return self.kept.pop(index)
        from safetensors.torch import load_file

        path = self._path(index)
        loaded = load_file(str(path), device=str(self.store))
        path.unlink()
        return tuple(loaded[str(n)] for n in range(len(loaded)))

    def _path(self, index: int) -> Path:
        return self.folder / f"boundary-{index:05d}.safetensors"


@contextlib.contextmanager
def _differentiable(params: Sequence[nn.Parameter]) -> Iterator[None]:
    saved = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p, flag in zip(params, saved):
            p.requires_grad_(flag)


@torch.no_grad()
def _forward(source: BlockSource, hidden, args, kwargs, boundaries: Boundaries, store, progress: bool):
    """X_L for every window, saving each block's input; also whether blocks return tuples."""
    as_tuple = False
    for i in tqdm(range(source.n_blocks), desc="fisher forward", disable=not progress, leave=False):
        boundaries.put(i, hidden)
        with source.block(i) as block:
            outs = []
            for h, a, k in zip(hidden, args, kwargs):
                out, as_tuple = call_block(block, h.to(source.device), a, k)
                outs.append(out.to(store))
        hidden = tuple(outs)
    return hidden, as_tuple


def _head_gradients(source: BlockSource, hidden, windows: torch.Tensor, as_tuple: bool, store) -> list[torch.Tensor]:
    """∂loss_n/∂X_L[n] for every window n, from the model's own head and loss."""
    grads = []
    with source.resident() as model, torch.enable_grad():
        for n, h in enumerate(hidden):
            x = h.to(source.device).requires_grad_(True)
            loss = head_forward(model, x, windows[n : n + 1], labels=True, as_tuple=as_tuple).loss
            (grad,) = torch.autograd.grad(loss, x)
            grads.append(grad.to(store))
    return grads


def fisher_by_block(
    model: nn.Module | BlockSource,
    windows: torch.Tensor,
    linears: Mapping[str, LinearInfo],
    *,
    device: torch.device | str | None = None,
    store: torch.device | str = "cpu",
    offload_dir: str | Path | None = None,
    progress: bool = True,
    mean_gradient: str | None = None,
) -> Iterator[tuple[int, nn.Module, dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
    """(block index, the model with that block still materialized, {linear: Fisher [out, in] float32},
    {linear: mean gradient}), from the last block to the first; each block's Fisher is the mean over
    `windows` [n, seqlen] of squared per-window gradients, and with `mean_gradient` "signed" /
    "absolute" the same pass gives (1/N) Σ_n g_n / (1/N) Σ_n |g_n| (`gradient.gradient_statistics`;
    else the second dict is empty). `model`: a loaded model (then `device` says where blocks run) or a
    `LazyCheckpoint`. `store`: where boundaries and gradients wait; `offload_dir`: keep boundaries
    on disk there instead of in memory (the files are deleted as they are consumed)."""
    source = as_source(model, device)
    store = torch.device(store)
    with source.resident() as loaded:
        inputs = capture_block_inputs(loaded, windows, batch_size=1, store=store, progress=False)
    args, kwargs, hidden = inputs.args, inputs.kwargs, inputs.hidden
    del inputs  # X_0 is now held by the boundaries only (on disk with offload_dir)
    boundaries = Boundaries(offload_dir, store)
    hidden, as_tuple = _forward(source, hidden, args, kwargs, boundaries, store, progress)
    grads = _head_gradients(source, hidden, windows, as_tuple, store)
    log.debug("fisher: %d windows through %d blocks; boundaries kept %s", len(windows), source.n_blocks,
              offload_dir or f"on {store}")
    del hidden
    by_block: dict[int, list[str]] = {}
    for name, info in linears.items():
        by_block.setdefault(info.block, []).append(name)
    for i in tqdm(reversed(range(source.n_blocks)), total=source.n_blocks, desc="fisher backward",
                  disable=not progress, leave=False):
        with source.block(i):
            fisher, mean = _block_fisher(source, i, boundaries.take(i), args, kwargs, grads, by_block.get(i, []),
                                         linears, mean_gradient)
            yield i, source.model, fisher, mean
        del fisher, mean  # before the next block's accumulators exist


def _block_fisher(source: BlockSource, i: int, saved, args, kwargs, grads: list, names: list[str],
                  linears: Mapping[str, LinearInfo], mean_gradient: str | None = None):
    """Block i's Fisher (and mean gradient) over all windows, replacing grads[n] by the gradient at the
    block's input. Its own frame holds the block's parameters, so nothing of the block outlives the call."""
    weights = [source.model.get_submodule(name).weight for name in names]
    zeros = lambda: {name: torch.zeros(w.shape[::-1] if linears[name].transposed else w.shape,  # noqa: E731
                                       dtype=torch.float32, device=source.device) for name, w in zip(names, weights)}
    fisher, mean = zeros(), (zeros() if mean_gradient is not None else {})
    with _differentiable(weights), torch.enable_grad():
        for n, x in enumerate(saved):
            grads[n] = _window_backward(source, i, x, args[n], kwargs[n], grads[n], weights, names, linears, fisher,
                                        mean, mean_gradient == "absolute")
    return ({name: f.div_(len(saved)) for name, f in fisher.items()},
            {name: g.div_(len(saved)) for name, g in mean.items()})


def _window_backward(source, i, x, args, kwargs, grad_out, weights, names, linears, fisher, mean, absolute):
    """Accumulate one window's squared weight gradients of block i (and the gradients into `mean`,
    their magnitudes with `absolute`); returns ∂loss/∂(block input)."""
    block = source.model.get_submodule(f"{source.block_path}.{i}")
    x = x.to(source.device).requires_grad_(i > 0)
    out, _ = call_block(block, x, args, kwargs)
    wanted = ([x] if i > 0 else []) + list(weights)
    if not wanted:
        return grad_out
    got = torch.autograd.grad(out, wanted, grad_outputs=grad_out.to(source.device, out.dtype), allow_unused=True)
    for name, grad in zip(names, got[1:] if i > 0 else got):
        if grad is not None:
            g = (grad.t() if linears[name].transposed else grad).float()
            fisher[name].add_(g.square())
            if name in mean:
                mean[name].add_(g.abs() if absolute else g)
    return got[0].detach().to(grad_out.device) if i > 0 else grad_out


def streamed_fisher(
    model: nn.Module | BlockSource,
    windows: torch.Tensor,
    linears: Mapping[str, LinearInfo],
    **kwargs,
) -> dict[str, torch.Tensor]:
    """Every linear's Fisher [out, in] float32, as `empirical_fisher` returns it (keeps them all:
    use `fisher_by_block` or `streamed_fisher_table` for models whose Fisher does not fit)."""
    fisher: dict[str, torch.Tensor] = {}
    for _, _, block_fisher, _ in fisher_by_block(model, windows, linears, **kwargs):
        fisher.update(block_fisher)
    return {name: fisher[name] for name in linears}


def streamed_fisher_table(
    model: nn.Module | BlockSource,
    windows: torch.Tensor,
    linears: Mapping[str, LinearInfo],
    configs: Sequence[QuantSpec],
    *,
    damage_rows: int | None = None,
    **kwargs,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Damage [U, C] and the Fisher trace per linear, as `fisher_table` returns them (ggml types on
    `damage_rows` rows per layer, scaled); each block's damage is computed while the block is
    materialized, then its Fisher is freed."""
    row = {name: u for u, name in enumerate(linears)}
    damage = np.zeros((len(linears), len(configs)))
    trace = np.zeros(len(linears))
    for _, loaded, fisher, _ in fisher_by_block(model, windows, linears, **kwargs):
        _fill_rows(loaded, fisher, configs, [row[name] for name in fisher], damage, trace, damage_rows)
    return damage, {"fisher_trace": trace}


def streamed_gradient_fisher_tables(
    model: nn.Module | BlockSource,
    windows: torch.Tensor,
    linears: Mapping[str, LinearInfo],
    configs: Sequence[QuantSpec],
    *,
    absolute: bool = False,
    damage_rows: int | None = None,
    **kwargs,
) -> dict[str, tuple[np.ndarray, dict[str, np.ndarray]]]:
    """{"gradient": table, "fisher": table} from ONE streamed pass, each as `gradient.gradient_fisher_tables`
    returns it; each block's rows are computed while the block is materialized."""
    row = {name: u for u, name in enumerate(linears)}
    damage = {m: np.zeros((len(linears), len(configs))) for m in ("gradient", "fisher")}
    trace, l1 = np.zeros(len(linears)), np.zeros(len(linears))
    for _, loaded, fisher, mean in fisher_by_block(model, windows, linears,
                                                   mean_gradient="absolute" if absolute else "signed", **kwargs):
        for name in list(mean):
            g = mean.pop(name)
            damage["gradient"][row[name]] = gradient_damage(get_weight(loaded.get_submodule(name)), g, configs,
                                                            damage_rows=damage_rows)
            l1[row[name]] = float(g.abs().sum())
        _fill_rows(loaded, fisher, configs, [row[name] for name in fisher], damage["fisher"], trace, damage_rows)
    return {"gradient": (damage["gradient"], {"gradient_l1": l1}), "fisher": (damage["fisher"], {"fisher_trace": trace})}


def _fill_rows(model: nn.Module, fisher: dict[str, torch.Tensor], configs, rows: list[int], damage, trace,
               damage_rows: int | None = None) -> None:
    """Damage and trace rows of one block's linears; each Fisher is dropped as soon as its row is done."""
    for name, u in zip(list(fisher), rows):
        f = fisher.pop(name)
        damage[u] = fisher_damage(get_weight(model.get_submodule(name)), f, configs, damage_rows=damage_rows)
        trace[u] = float(f.sum())
