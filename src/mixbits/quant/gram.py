"""The Gram matrix H = XᵀX of a linear layer's inputs, accumulated in a fixed order, and the output
error tr((W − Q) H (W − Q)ᵀ) it prices: what GPTQ, the clip search's importance and the output-error
and gain tables all read (one accumulator for all of them: model/hooks.py feeds it)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["GRAM_ROWS", "GramAccumulator", "gram", "output_error"]


# Rows per XᵀX product. MKL splits a product's inner (token) dimension across threads when it is
# long next to the output (measured: 2048 tokens at 64-256 inputs), and the sum then depends on
# the thread count. `mixbits.reproducible` asks MKL not to; slices of 256 tokens keep XᵀX
# bit-identical at 1 and 2 threads even without it (every width tried, 64-4096), at <= 5 % of
# the time of one product.
GRAM_ROWS = 256


def gram(x: Tensor) -> Tensor:
    """X^T X [in, in] in float32 of inputs x [..., in] (all leading dimensions are tokens)."""
    acc = GramAccumulator(x.shape[-1], x.device)
    acc.add(x)
    return acc.H


class GramAccumulator:
    """Running H = sum over tokens of x x^T (a SUM, not a mean; `mean()` divides by `count`).

    GPTQ's reference scales by 2 / n; no scale changes GPTQ's result (the damping is relative).
    Feed it from a forward hook: `acc.add(inputs[0])`. Float32, on the first input's device
    unless `device` is given.
    """

    def __init__(self, in_features: int, device: torch.device | str | None = None) -> None:
        if in_features < 1:
            raise ValueError(f"in_features={in_features!r} must be a positive integer")
        self.in_features = in_features
        self.count = 0
        self._device = None if device is None else torch.device(device)
        self._sum: Tensor | None = None

    def add(self, x: Tensor) -> None:
        """Accumulate inputs x [..., in_features]."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"inputs have shape {tuple(x.shape)}; expected [..., {self.in_features}]")
        if self._sum is None:
            device = x.device if self._device is None else self._device
            self._sum = torch.zeros(self.in_features, self.in_features, device=device)
        x2 = x.detach().reshape(-1, self.in_features).to(device=self._sum.device, dtype=torch.float32)
        for rows in x2.split(GRAM_ROWS):  # a fixed order of sums, whatever the thread count
            self._sum.addmm_(rows.T, rows)
        self.count += x2.shape[0]

    @property
    def H(self) -> Tensor:
        """The sum X^T X so far, float32 [in, in] (zeros before any input)."""
        if self._sum is None:
            return torch.zeros(self.in_features, self.in_features, device=self._device)
        return self._sum

    def mean(self) -> Tensor:
        """X^T X / count."""
        if self.count == 0:
            raise ValueError("no inputs accumulated yet; call add() with calibration inputs first")
        return self.H / self.count


def output_error(w: Tensor, q: Tensor, H: Tensor) -> float:
    """tr((W - Q) H (W - Q)^T) = ||X (W - Q)^T||^2 when H = X^T X; float32 on w's device."""
    d = w.detach().float() - q.detach().to(device=w.device, dtype=torch.float32)
    return float(((d @ H.to(device=w.device, dtype=torch.float32)) * d).sum())
