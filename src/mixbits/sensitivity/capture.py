"""Model plumbing for sensitivity passes: hooks and gradient switches, no math.

Three things every method needs from a live model, kept apart from the formulas that use them:

* `collect_gram` — forward pre-hooks on the linears accumulate each one's input Gram matrix
  H = Σ_tokens xᵀx (float32 [in, in]) in one forward pass. GPT-2's ``Conv1D`` takes its input
  as [..., in] like ``nn.Linear``, so one hook serves both. Linears fed the very same tensor
  (q/k/v on the normed hidden state, gate/up in a Llama MLP) share one Gram matrix object: the
  hook sees the same input as the linear called just before it and skips the second product.
  Memory: in² float32 per distinct input, on `device` (64 MiB at in = 4096, 484 MiB at 11008);
  fine up to ~8192 inputs; callers with many wide linears pass them in chunks.
* `window_gradients` — the gradient of the LM loss of each window for every linear weight, as
  [out, in], with only those weights requiring grad for the duration (restored afterwards).
* `second_order_ready` — the same switch plus an attention kernel that supports double
  backward (SDPA's math kernel); fused flash kernels have no second derivative.

Hooks and ``requires_grad`` flags are always restored, also when the forward raises.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from mixbits.model.arch import LinearInfo

log = logging.getLogger(__name__)

_NO_DOUBLE_BACKWARD = ("flash_attention_2", "flash_attention_3", "flex_attention")


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor:
    if args:
        return args[0]
    return next(v for v in kwargs.values() if isinstance(v, torch.Tensor))


@contextlib.contextmanager
def input_hooks(model: nn.Module, names: list[str], fn: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
    """Call ``fn(name, x)`` with the input x [..., in] of every named module before it runs."""
    handles = []
    try:
        for name in names:
            def hook(module, args, kwargs, name=name):
                fn(name, _first_tensor(args, kwargs))
            handles.append(model.get_submodule(name).register_forward_pre_hook(hook, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


class _GramAccumulator:
    """Adds xᵀx per linear; a linear fed the same tensor as the previous one shares its matrix."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.grams: dict[str, torch.Tensor] = {}
        self.alias: dict[str, str | None] = {}  # name -> owner whose Gram it shares (None: own)
        self.last: tuple[torch.Tensor, str] | None = None

    def new_window(self) -> None:
        self.last = None  # holds one activation at most, and never across windows

    def __call__(self, name: str, x: torch.Tensor) -> None:
        same = self.last is not None and self.last[0] is x and self.last[1] != name
        owner = self.last[1] if same else None
        if owner is not None:
            owner = self.alias[owner] or owner  # k_proj shares q_proj's: v_proj shares it too
        if self.alias.setdefault(name, owner) != owner:
            raise RuntimeError(
                f"{name} shared its input with {self.alias[name]} in one window and with {owner} in another; "
                "the forward pass is not deterministic, so Gram matrices cannot be shared"
            )
        self.last = (x, name)
        if owner is not None:
            self.grams[name] = self.grams[owner]
            return
        rows = x.detach().reshape(-1, x.shape[-1]).to(self.device, torch.float32)
        gram = self.grams.get(name)
        if gram is None:
            gram = self.grams[name] = torch.zeros(rows.shape[1], rows.shape[1], device=self.device)
        gram.addmm_(rows.t(), rows)


def collect_gram(
    model: nn.Module,
    windows: torch.Tensor,
    linears: Mapping[str, LinearInfo],
    *,
    device: torch.device,
    progress: bool = True,
) -> tuple[dict[str, torch.Tensor], int]:
    """Input Gram matrices Σ xᵀx [in, in] float32 on `device` of each linear, and the token count.

    One forward pass over `windows` (LongTensor [n, seqlen]); the count is n·seqlen, the number
    of rows each Gram matrix sums (each linear runs once per token). Linears that read the same
    tensor return the same matrix object.
    """
    names = list(linears)
    acc = _GramAccumulator(device)
    with torch.no_grad(), input_hooks(model, names, acc):
        for window in tqdm(windows, desc="gram", disable=not progress, leave=False):
            acc.new_window()
            model(input_ids=window.unsqueeze(0).to(device))
        acc.new_window()
    missing = [n for n in names if n not in acc.grams]
    if missing:
        raise RuntimeError(f"no input reached {missing[:3]} during the forward pass; are they used by the model?")
    for name in names:
        info = linears[name]
        if acc.grams[name].shape[0] != info.in_features:
            raise RuntimeError(f"{name} saw inputs of width {acc.grams[name].shape[0]}, expected {info.in_features}")
    shared = sum(owner is not None for owner in acc.alias.values())
    log.debug("collected %d Gram matrices (%d shared with a sibling linear)", len(names), shared)
    return {n: acc.grams[n] for n in names}, int(windows.numel())


@contextlib.contextmanager
def grad_only_on(model: nn.Module, names: list[str]) -> Iterator[list[nn.Parameter]]:
    """Make only the named modules' weights require grad; yield those weights; restore all flags."""
    saved = {name: p.requires_grad for name, p in model.named_parameters()}
    weights = [model.get_submodule(n).weight for n in names]
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for w in weights:
            w.requires_grad_(True)
        yield weights
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(saved[name])


@contextlib.contextmanager
def second_order_ready(model: nn.Module, names: list[str]) -> Iterator[list[nn.Parameter]]:
    """`grad_only_on` plus an attention kernel that can be differentiated twice."""
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if impl in _NO_DOUBLE_BACKWARD:
        raise ValueError(
            f"attention implementation {impl!r} has no second derivative; load the model with "
            "attn_implementation='sdpa' or 'eager' for Hessian-vector products"
        )
    with sdpa_kernel(SDPBackend.MATH), grad_only_on(model, names) as weights:
        yield weights


def as_out_in(grad: torch.Tensor, info: LinearInfo) -> torch.Tensor:
    """A gradient in the module's storage layout, as [out, in]."""
    return grad.t() if info.transposed else grad


def window_gradients(
    model: nn.Module,
    windows: torch.Tensor,
    linears: Mapping[str, LinearInfo],
    *,
    device: torch.device,
    progress: bool = True,
    desc: str = "gradients",
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield, per window, the gradient of its mean next-token loss for every linear, as [out, in].

    The tensors are valid until the next window is requested.
    """
    names = list(linears)
    with grad_only_on(model, names) as weights:
        for window in tqdm(windows, desc=desc, disable=not progress, leave=False):
            ids = window.unsqueeze(0).to(device)
            loss = model(input_ids=ids, labels=ids).loss
            grads = torch.autograd.grad(loss, weights)
            yield {n: as_out_in(g, linears[n]) for n, g in zip(names, grads)}
