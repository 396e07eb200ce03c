"""The optimizer step both trainers share: AdamW, cosine decay, clipping, non-finite guard.

Learning rate of group g at step t of T (EfficientQAT's CosineAnnealingLR, eta_min = lr / f):

    lr_g(t) = h · (lr_g / f + (lr_g - lr_g / f) · (1 + cos(π t / T)) / 2)

where h starts at 1 and halves at every non-finite event. A step whose loss or gradient norm
(before clipping, over all trainable tensors) is not finite is skipped: no update, gradients
dropped, h halved, training goes on with the next batch (retrying the same batch at the same
parameters would only give the same non-finite value back: the lr does not enter the forward).
After `max_nonfinite` such events, or as soon as a parameter itself is not finite (an update
overflowed), the guard reports `exhausted` and the caller falls back to its start state.
The schedule is a pure function of t, so no scheduler state needs saving; resume never resumes
mid-block.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
from torch import Tensor

log = logging.getLogger(__name__)


def cosine_lr(lr: float, step: int, total: int, min_lr_factor: float) -> float:
    """lr at `step` of `total`, decaying from lr to lr / min_lr_factor."""
    low = lr / min_lr_factor
    return low + (lr - low) * (1 + math.cos(math.pi * min(step, total) / max(total, 1))) / 2


class GuardedOptimizer:
    """AdamW over `groups` (dicts with params, lr, name) stepping through the schedule above."""

    def __init__(self, groups: list[dict], *, total_steps: int, min_lr_factor: float, weight_decay: float,
                 grad_clip: float | None, max_nonfinite: int, what: str) -> None:
        self.base = [g["lr"] for g in groups]
        self.params = [p for g in groups for p in g["params"]]
        self.optimizer = torch.optim.AdamW(groups, weight_decay=weight_decay)
        self.total, self.min_lr_factor, self.grad_clip = total_steps, min_lr_factor, grad_clip
        self.max_nonfinite, self.what = max_nonfinite, what
        self.step_index = 0
        self.lr_scale = 1.0
        self.nonfinite = 0
        self.exhausted = False
        self.last_grad_norm = float("nan")

    def _set_lr(self) -> None:
        for group, lr in zip(self.optimizer.param_groups, self.base):
            group["lr"] = self.lr_scale * cosine_lr(lr, self.step_index, self.total, self.min_lr_factor)

    def _fail(self, why: str) -> None:
        self.nonfinite += 1
        self.lr_scale *= 0.5
        finite_params = all(bool(torch.isfinite(p).all()) for p in self.params)
        self.exhausted = self.nonfinite >= self.max_nonfinite or not finite_params
        log.warning("%s: non-finite %s at step %d; step skipped, lr halved to x%.3g (%d/%d)%s", self.what, why,
                    self.step_index, self.lr_scale, self.nonfinite, self.max_nonfinite,
                    "; giving up" if self.exhausted else "")

    def step(self, loss: Tensor, backward: Callable[[], None] | None = None) -> bool:
        """Backward `loss` and update; False when the step was skipped as non-finite. `backward`: what
        sets the gradients instead of `loss.backward()` (a streamed trainer goes back block by block)."""
        self._set_lr()
        taken = False
        if not bool(torch.isfinite(loss.detach())):
            self._fail("loss")
        else:
            (backward or loss.backward)()
            clip = self.grad_clip if self.grad_clip is not None else math.inf
            norm = torch.nn.utils.clip_grad_norm_(self.params, clip)
            self.last_grad_norm = float(norm)
            if math.isfinite(self.last_grad_norm):
                self.optimizer.step()
                taken = True
            else:
                self._fail("gradient")
        self.optimizer.zero_grad(set_to_none=True)
        self.step_index += 1
        if taken and not all(bool(torch.isfinite(p).all()) for p in self.params):
            self._fail("parameter after the update")
        return taken
