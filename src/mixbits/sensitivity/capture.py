"""Model plumbing for sensitivity passes: hooks and gradient switches, no math.

Three things every method needs from a live model, kept apart from the formulas that use them:

* `collect_gram` — each linear's input Gram matrix H = Σ_tokens xᵀx (float32 [in, in]) over
  one forward pass of the whole model, by `model.hooks.SharedInputGrams` (linears fed the very
  same tensor, q/k/v and gate/up, share one matrix object). Memory: in² float32 per distinct
  input, on `device` (64 MiB at in = 4096, 484 MiB at 11008); fine up to ~8192 inputs; callers
  with many wide linears pass them in chunks.
* `window_gradients` — the gradient of the LM loss of each window for every linear weight, as
  [out, in], with only those weights requiring grad for the duration (restored afterwards).
* `second_order_ready` — the same switch plus an attention kernel that supports double
  backward (SDPA's math kernel); fused flash kernels have no second derivative.

Hooks and ``requires_grad`` flags are always restored, also when the forward raises.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from mixbits.model.arch import LinearInfo
from mixbits.model.hooks import SharedInputGrams, input_hooks

log = logging.getLogger(__name__)

_NO_DOUBLE_BACKWARD = ("flash_attention_2", "flash_attention_3", "flex_attention")


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
    acc = SharedInputGrams(device)
    with torch.no_grad(), input_hooks(model, names, acc):
        for window in tqdm(windows, desc="gram", disable=not progress, leave=False):
            acc.new_pass()
            model(input_ids=window.unsqueeze(0).to(device))
        acc.new_pass()
    missing = [n for n in names if n not in acc.owner]
    if missing:
        raise RuntimeError(f"no input reached {missing[:3]} during the forward pass; are they used by the model?")
    grams = {n: acc.H(n) for n in names}
    for name in names:
        if grams[name].shape[0] != linears[name].in_features:
            raise RuntimeError(f"{name} saw inputs of width {grams[name].shape[0]}, expected {linears[name].in_features}")
    log.debug("collected %d Gram matrices (%d shared with a sibling linear)", len(names), acc.shared())
    return grams, int(windows.numel())


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
