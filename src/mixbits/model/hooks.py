"""Input hooks on named linears, and the one accumulator of their input Gram matrices.

`input_hooks` calls ``fn(name, x)`` with the input x [..., in] of each named module before it
runs (GPT-2's ``Conv1D`` takes its input as [..., in] like ``nn.Linear``, so one hook serves
both). `SharedInputGrams` is such an ``fn``: it adds H = Σ_tokens xᵀx per linear with
`quant.gram.GramAccumulator` (the math), under the shared-input rule:

    a linear fed the very same tensor object as the linear hooked just before it (q/k/v on the
    normed hidden state, gate/up in a Llama MLP) shares that linear's accumulator instead of
    adding the same product again; the sharing must be the same in every pass.

Sharing saves one in x in float32 matrix and one product per sibling. Memory: in² float32 per
distinct input on `device` (64 MiB at in = 4096, 484 MiB at 11008), plus a reference to the last
input seen, dropped by `new_pass()`. Hooks are always removed, also when the forward raises.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from mixbits.quant.gram import GramAccumulator


def _first_tensor(args: tuple, kwargs: dict) -> Tensor:
    if args:
        return args[0]
    return next(v for v in kwargs.values() if isinstance(v, Tensor))


@contextlib.contextmanager
def input_hooks(model: nn.Module, names: list[str], fn: Callable[[str, Tensor], None]) -> Iterator[None]:
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


class SharedInputGrams:
    """H = Σ xᵀx per hooked linear under the shared-input rule (module docstring).

    Call `new_pass()` before each forward pass (window or batch): sharing is only recognised
    within one pass. `H(name)` is float32 [in, in] on `device`; linears that share an input
    return the same tensor object.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.acc: dict[str, GramAccumulator] = {}
        self.owner: dict[str, str] = {}  # name -> the linear whose accumulator it uses (itself if its own)
        self._last: tuple[Tensor, str] | None = None

    def new_pass(self) -> None:
        self._last = None  # holds one activation at most, and never across passes

    def __call__(self, name: str, x: Tensor) -> None:
        shares = self._last is not None and self._last[0] is x and self._last[1] != name
        owner = self.owner[self._last[1]] if shares else name
        if self.owner.setdefault(name, owner) != owner:
            raise RuntimeError(
                f"{name} shared its input with {self.owner[name]} in one pass and with {owner} in another; "
                "the forward pass is not deterministic, so Gram matrices cannot be shared")
        self._last = (x, name)
        if owner == name:
            self.acc.setdefault(name, GramAccumulator(x.shape[-1], self.device)).add(x)

    def H(self, name: str) -> Tensor:
        return self.acc[self.owner[name]].H

    def shared(self) -> int:
        """How many linears use another linear's matrix."""
        return sum(owner != name for name, owner in self.owner.items())

    def groups(self) -> list[list[str]]:
        """Names in call order, grouped by shared input."""
        out: dict[str, list[str]] = {}
        for name, owner in self.owner.items():
            out.setdefault(owner, []).append(name)
        return list(out.values())


@torch.no_grad()
def input_square_sums(model: nn.Module, names: list[str], windows: Tensor) -> dict[str, Tensor]:
    """diag(XᵀX) per named linear: the sum over `windows` (LongTensor [n, seqlen], one forward each, on the
    model's device) of the squared inputs of each input channel, float32 on the CPU (llama.cpp's imatrix
    is this per token averaged)."""
    device = next(model.parameters()).device
    sums: dict[str, Tensor] = {}

    def add(name: str, x: Tensor) -> None:
        part = x.detach().reshape(-1, x.shape[-1]).double().square().sum(0).cpu()
        sums[name] = part if name not in sums else sums[name] + part

    with input_hooks(model, names, add):
        for window in windows:
            model(window[None].to(device))
    return {n: s.float() for n, s in sums.items()}
