"""The Hutchinson Hessian trace block by block: `hessian.py`'s numbers with one block in memory.

Idea: a Hessian-vector product is the gradient of a directional derivative,

    H v = ∇_W (∇_W L · v) = ∇_W L̇,        L̇ = dL(W + εv)/dε at ε = 0,

so it is reverse mode (a gradient, which goes block by block as `fisher_streamed` does) of forward mode
(a tangent, which goes block by block as a forward does). With X_i the hidden states entering block i,
Ẋ_i their tangent along v, G_i = ∂L/∂X_i and Ġ_i = ∂L̇/∂X_i:

    forward   (X_{i+1}, Ẋ_{i+1}) = jvp(block_i, (X_i, W_i), (Ẋ_i, v_i))      Ẋ = 0 below the first linear
    head      G_L = ∇h(X_L),  Ġ_L = ∇²h(X_L) Ẋ_L     (double backward of the model's own head and loss;
              ∂L̇/∂Ẋ_L = G_L and ∂L̇/∂X_L = Ġ_L since L̇ = G_L · Ẋ_L)
    backward  (Ġ_i, G_i, (Hv)_i) = vjp of (x, ẋ, W_i) ↦ (block_i(x, W_i), jvp(block_i, (x, W_i), (ẋ, v_i)))
              with cotangents (Ġ_{i+1}, G_{i+1}), recomputed from the saved (X_i, Ẋ_i)
    sample    v_uᵀ (Hv)_u for each linear u of block i; Tr(H_u) ≈ the mean over windows and probes

Reverse over forward rather than the reverse mode's own tangent (forward over reverse): torch 2.13 has no
forward-mode formula for `silu_backward` (Llama's MLP), while every forward op has a backward. The block
runs through `torch.func` (`functional_call`, `jvp`, `vjp`) with SDPA's math kernel (`capture.
second_order_ready`): eager and sdpa attention both work; flash kernels are refused there. Layer norm
runs as its elementary ops inside the block (`_ElementaryLayerNorm`: torch's fused kernel gives wrong
second derivatives this way, silently).

Probes: `hessian.hutchinson_trace` draws, per window n and probe k (sample s = n·probes + k), every
linear's Rademacher v in `linears` order from one generator. `_Probes` draws them all once in that order,
keeping only the generator state where each block's run of linears starts, then replays block i's
vectors of sample s from that state: the same v's, so the same estimate up to floating-point order
(float32 relative 1e-4, tested). The caller's generator ends where `hessian.py` leaves it.

Peak memory: one block's weights; the boundaries X_i of the N windows and Ẋ_i of the N·probes samples
((1 + probes)× the Fisher's boundaries; with `offload_dir` on disk, one safetensors file per boundary,
deleted as consumed); G and Ġ at one boundary; one window's graph through one block's forward and
its tangent (about twice a training step's); that block's v and Hv; the generator states (samples ×
blocks, 5 KB each for a CPU generator, 16 B on CUDA). Cost: each block runs one jvp per sample forward
(about two forwards) and one vjp of a jvp backward (about four), versus `hessian.py`'s forward, backward
with graph and a double backward per sample; the probes are drawn three times (record, forward,
backward), N·probes times the linears' weight count each. Measured on random-weight bf16 Llamas, 2
windows x 256 tokens, one CPU thread (`python bench/memory.py --sizes 0.2b,0.6b,1.1b --stages
analyze-hessian --threads 1`, and at 0.2b with `--no-stream`): at 0.2B the method took 42 s streamed
against 32 s whole, at a process peak of 1.19 GiB against 3.67 GiB; 1.84 GiB at 1.1B (16 blocks)
against 1.78 GiB at 0.6B (8 blocks).

Top eigenvalue (`top_eigen`, the "hessian_top_eig" score, never used by the damage table): power
iteration needs one Hessian-vector product of ONE unit's block per unit per iteration, which streamed
costs a pass from that unit's block to the head and back per unit per iteration (units × iterations
passes over the checkpoint, 224 × 20 for a 7B Llama). Refused here with the fix (load the whole model).

Source: Pearlmutter 1994 (fast exact Hessian-vector products), `hessian.py` for the estimator,
`fisher_streamed.py` for the block loop.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, jvp, vjp
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode
from tqdm.auto import tqdm

from mixbits.errors import UserError
from mixbits.model.arch import LinearInfo, get_weight
from mixbits.model.blockwise import capture_block_inputs, to_device
from mixbits.model.stream import BlockSource, as_source, head_forward
from mixbits.quant.spec import QuantSpec
from mixbits.sensitivity.capture import second_order_ready
from mixbits.sensitivity.fisher_streamed import Boundaries
from mixbits.sensitivity.hessian import check_probes, hessian_damage, mean_traces, probe_generator, rademacher

log = logging.getLogger(__name__)

__all__ = ["check_streamed_options", "hutchinson_by_block", "streamed_hessian_table", "streamed_hutchinson_trace"]

TOP_EIGEN_STREAMED = (
    "hessian option top_eigen=True cannot be streamed: power iteration needs a pass over the checkpoint per "
    "linear per iteration; load the whole model (mixbits analyze --no-stream) for the hessian_top_eig score, "
    "or leave top_eigen off (the damage table uses only the trace)")


def check_streamed_options(options: Mapping[str, object]) -> None:
    """Refuse, before any compute, the hessian options a block source cannot serve."""
    if options.get("top_eigen"):
        raise UserError(TOP_EIGEN_STREAMED)


class _Probes:
    """`hessian.py`'s Rademacher vectors, replayed one block at a time (module docstring, "Probes")."""

    def __init__(self, model: nn.Module, linears: Mapping[str, LinearInfo], samples: int,
                 gen: torch.Generator, progress: bool):
        self.like = {n: (model.get_submodule(n).weight.shape, model.get_submodule(n).weight.dtype) for n in linears}
        self.runs: list[tuple[int, list[str]]] = []  # consecutive linears of one block, in `linears` order
        for name, info in linears.items():
            if self.runs and self.runs[-1][0] == info.block:
                self.runs[-1][1].append(name)
            else:
                self.runs.append((info.block, [name]))
        self.states = []
        for _ in tqdm(range(samples), desc="hessian probes", disable=not progress, leave=False):
            row = []
            for _, run in self.runs:
                row.append(gen.get_state())
                for name in run:
                    rademacher(*self.like[name], gen)  # drawn to advance the generator as hessian.py does
            self.states.append(row)
        self.replay = torch.Generator(device=gen.device)

    def block(self, sample: int, index: int, device: torch.device) -> dict[str, torch.Tensor]:
        """{linear of block `index`: its v in sample `sample`} on `device`."""
        out = {}
        for run, (block, names) in enumerate(self.runs):
            if block == index:
                self.replay.set_state(self.states[sample][run])
                out.update((n, rademacher(*self.like[n], self.replay).to(device)) for n in names)
        return out


def _layer_norm(x: torch.Tensor, normalized_shape, weight=None, bias=None, eps: float = 1e-5) -> torch.Tensor:
    """`F.layer_norm` from elementary ops, in float32 (as the fused kernel accumulates)."""
    dims = tuple(range(-len(normalized_shape), 0))
    y = x.float()
    centred = y - y.mean(dims, keepdim=True)
    y = centred * torch.rsqrt(centred.square().mean(dims, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


class _ElementaryLayerNorm(TorchFunctionMode):
    """Layer norm as its elementary ops. Reverse mode over forward mode through the fused kernel is wrong
    in torch 2.13, silently: its tangent formula reads the kernel's mean and 1/std outputs, which autograd
    treats as constants (relative error 0.4-0.7 against central differences in float64, where RMS norm,
    group norm, softmax, SDPA's math kernel and the activations agree to 1e-10). Nested forward mode
    through it is wrong as well: pytorch/pytorch#196700, open."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.layer_norm:
            return _layer_norm(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _functional(model: nn.Module) -> Iterator[None]:
    """No autograd graph outside torch.func's transforms, an attention kernel with derivatives of every
    order, and layer norm differentiable this way. Entered per step, never across a yield (grad mode
    is the caller's between blocks)."""
    with second_order_ready(model, []), torch.no_grad(), _ElementaryLayerNorm():
        yield


def _block_fn(block: nn.Module, args: tuple, kwargs: dict, device: torch.device, seen: dict):
    """x, {param key: weight} -> the block's new hidden state (the given weights replace its own)."""
    args, kwargs = to_device(args, device), to_device(kwargs, device)

    def f(x, weights):
        out = functional_call(block, weights, (x, *args), kwargs, strict=False)
        seen["as_tuple"] = not isinstance(out, torch.Tensor)
        return out[0] if seen["as_tuple"] else out

    return f


def _keys(names: Sequence[str], prefix: str) -> dict[str, str]:
    return {name: name[len(prefix) + 1:] + ".weight" for name in names}


def _primals_tangents(block: nn.Module, prefix: str, v: dict[str, torch.Tensor]):
    """({param key: weight}, {param key: v}) of the linears in `v`, keyed as `functional_call` wants."""
    keys = _keys(list(v), prefix)
    return {keys[n]: block.get_parameter(keys[n]) for n in v}, {keys[n]: t for n, t in v.items()}


def _forward(source: BlockSource, hidden, args, kwargs, probes: _Probes, per_window: int, first: int,
             boundaries: Boundaries, store: torch.device, progress: bool, seen: dict):
    """X_L of every window and Ẋ_L of every sample, saving (X_i, Ẋ_i) from block `first` on."""
    tangents: list[torch.Tensor] | None = None  # None while Ẋ = 0
    for i in tqdm(range(source.n_blocks), desc="hessian forward", disable=not progress, leave=False):
        if i >= first:
            boundaries.put(i, (*hidden, *(tangents or ())))
        with source.block(i) as block, _functional(source.model):
            prefix = f"{source.block_path}.{i}"
            outs, dots = [], []
            for n, h in enumerate(hidden):
                f = _block_fn(block, args[n], kwargs[n], source.device, seen)
                x = h.to(source.device)
                if i < first:
                    outs.append(f(x, {}).to(store))
                    continue
                for k in range(per_window):
                    s = n * per_window + k
                    w, tv = _primals_tangents(block, prefix, probes.block(s, i, source.device))
                    if tangents is None:
                        out, dot = jvp(lambda weights: f(x, weights), (w,), (tv,))
                    else:
                        out, dot = jvp(f, (x, w), (tangents[s].to(source.device), tv))
                    if k == 0:
                        outs.append(out.to(store))
                    dots.append(dot.to(store))
        hidden, tangents = tuple(outs), (dots if i >= first else None)
    return hidden, tangents


def _head(source: BlockSource, hidden, tangents, windows: torch.Tensor, per_window: int, as_tuple: bool,
          store: torch.device):
    """(G_L per window, Ġ_L per sample) from the model's own head and loss (double backward)."""
    grads, dots = [], []
    with source.resident() as model, second_order_ready(model, []), torch.enable_grad():
        for n, h in enumerate(hidden):
            x = h.to(source.device).requires_grad_(True)
            loss = head_forward(model, x, windows[n : n + 1], labels=True, as_tuple=as_tuple).loss
            (g,) = torch.autograd.grad(loss, x, create_graph=True)
            grads.append(g.detach().to(store))
            for k in range(per_window):
                xd = tangents[n * per_window + k].to(source.device, g.dtype)
                (gd,) = torch.autograd.grad(g, x, xd, retain_graph=k < per_window - 1)
                dots.append(gd.to(store))
            del loss, g
    return grads, dots


def _block_backward(source: BlockSource, i: int, first: int, saved, args, kwargs, grads: list, dots: list,
                    probes: _Probes, per_window: int, seen: dict) -> dict[str, float]:
    """Σ over samples of v_uᵀ(Hv)_u for block i's linears; replaces grads / dots by G_i / Ġ_i."""
    prefix, device = f"{source.block_path}.{i}", source.device
    block = source.model.get_submodule(prefix)
    windows = len(grads)
    sums: dict[str, float] = {}
    for n in range(windows):
        f = _block_fn(block, args[n], kwargs[n], device, seen)
        x = saved[n].to(device)
        for k in range(per_window):
            s = n * per_window + k
            v = probes.block(s, i, device)
            w, tv = _primals_tangents(block, prefix, v)
            keys = _keys(list(v), prefix)
            cotangents = (dots[s].to(device, x.dtype), grads[n].to(device, x.dtype))
            if i == first:  # Ẋ = 0 and nothing below needs G or Ġ
                _, pull = vjp(lambda weights: jvp(lambda u: f(x, u), (weights,), (tv,)), w)
                (hv,) = pull(cotangents)
            else:
                xd = saved[windows + s].to(device)
                _, pull = vjp(lambda x_, xd_, weights: jvp(f, (x_, weights), (xd_, tv)), x, xd, w)
                gdot, g, hv = pull(cotangents)
                dots[s] = gdot.to(dots[s].device)
                if k == per_window - 1:
                    grads[n] = g.to(grads[n].device)  # the same for every probe; the last one replaces G_{i+1}
            for name, vec in v.items():
                sums[name] = sums.get(name, 0.0) + float((vec.float() * hv[keys[name]].float()).sum())
    return sums


def hutchinson_by_block(
    model: nn.Module | BlockSource,
    windows: torch.Tensor,
    linears: Mapping[str, LinearInfo],
    *,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
    probes: int = 1,
    store: torch.device | str = "cpu",
    offload_dir: str | Path | None = None,
    progress: bool = True,
) -> Iterator[tuple[int, nn.Module, dict[str, float]]]:
    """(block index, the model with that block still materialized, {linear: Tr(H_u)}), from the last block
    holding a linear to the first; each trace as `hessian.hutchinson_trace` returns it (same generator ->
    same probes -> same numbers). `model`: a loaded model (`device` says where blocks run) or a
    `LazyCheckpoint`; `store`: where boundaries and gradients wait; `offload_dir`: boundaries on disk."""
    check_probes(windows, probes)
    source = as_source(model, device)
    store = torch.device(store)
    gen = probe_generator(generator, source.device)
    by_block: dict[int, list[str]] = {}
    for name, info in linears.items():
        by_block.setdefault(info.block, []).append(name)
    first = min(by_block)
    probe_set = _Probes(source.model, linears, len(windows) * probes, gen, progress)
    with source.resident() as loaded:
        inputs = capture_block_inputs(loaded, windows, batch_size=1, store=store, progress=False)
    args, kwargs, hidden = inputs.args, inputs.kwargs, inputs.hidden
    del inputs
    boundaries, seen = Boundaries(offload_dir, store), {"as_tuple": False}
    hidden, tangents = _forward(source, hidden, args, kwargs, probe_set, probes, first, boundaries, store, progress,
                                seen)
    grads, dots = _head(source, hidden, tangents, windows, probes, seen["as_tuple"], store)
    del hidden, tangents
    samples = len(windows) * probes
    for i in tqdm(range(source.n_blocks - 1, first - 1, -1), desc="hessian backward", disable=not progress,
                  leave=False):
        with source.block(i):
            with _functional(source.model):
                sums = _block_backward(source, i, first, boundaries.take(i), args, kwargs, grads, dots, probe_set,
                                       probes, seen)
            yield i, source.model, {name: sums[name] / samples for name in by_block.get(i, [])}


def streamed_hutchinson_trace(model: nn.Module | BlockSource, windows: torch.Tensor,
                              linears: Mapping[str, LinearInfo], **kwargs) -> dict[str, float]:
    """{linear: Tr(H_u)} in `linears` order, as `hessian.hutchinson_trace` returns it; arguments as
    `hutchinson_by_block`."""
    trace: dict[str, float] = {}
    for _, _, block_trace in hutchinson_by_block(model, windows, linears, **kwargs):
        trace.update(block_trace)
    return {name: trace[name] for name in linears}


def streamed_hessian_table(
    model: nn.Module | BlockSource,
    windows: torch.Tensor,
    linears: Mapping[str, LinearInfo],
    configs: Sequence[QuantSpec],
    *,
    top_eigen: bool = False,
    max_units: int | None = None,
    eig_windows: int = 4,
    eig_iters: int = 20,
    **kwargs,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Damage [U, C] and scores["hessian_trace"] (Tr/n), as `hessian.hessian_table` returns them; each
    block's rows are computed while it is materialized. `top_eigen` is refused (module docstring);
    `max_units`, `eig_windows` and `eig_iters` only serve it. Other arguments as `hutchinson_by_block`."""
    check_streamed_options({"top_eigen": top_eigen})
    row = {name: u for u, name in enumerate(linears)}
    trace, weights_damage = {}, np.zeros((len(linears), len(configs)))
    for _, loaded, block_trace in hutchinson_by_block(model, windows, linears, **kwargs):
        for name, t in block_trace.items():
            trace[name] = t
            weights_damage[row[name]] = hessian_damage(get_weight(loaded.get_submodule(name)),
                                                       t / linears[name].numel, configs)
    return weights_damage, {"hessian_trace": mean_traces(trace, linears)}
