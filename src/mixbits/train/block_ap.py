"""Block-AP: train one quantized block to reproduce the original block's output.

For block i with trainable state θ = {W_l, s_l, z_l} of its planned linears (`QuantizedBlock`),
inputs Y (the already quantized blocks' outputs) and targets T = block_i(X) (the original
block on the original inputs), minimise

    L(θ) = mean over batches of  ‖block_i^θ(Y) − T‖² / numel                  (MSE)

with AdamW (`optim.GuardedOptimizer`): one group per linear's weight, lr by its bits, one group
for all s and z. Batches are the captured batches, their order reshuffled every epoch by the
given torch.Generator. At the start and after every epoch (and after a final partial epoch) the
state is finalized (fp16 scales, integer zeros, rounded codes: what will be stored) and scored
on the validation stream; the best finalized state, the start included, is what the block keeps:

* the restored block is the best one validation saw, and never worse than its start; when no
  epoch beat the start, the start (round-to-nearest or the given init) is kept and logged;
* non-finite losses or gradients skip the step and halve the lr; after `max_nonfinite` of them
  (or a non-finite parameter) training stops and the block falls back to its start;
* `patience`: training stops after ceil(patience) epochs without a validation improvement.

Trade-off: a validation pass per epoch (val windows are few: 64 against 4096 in the paper) buys
best-state restore and early stopping. Batches are not re-mixed across epochs (the captured
batches stay together) because their extra arguments (masks, rotary tables) were captured per
batch. Source: Chen et al. 2024, EfficientQAT (Block-AP), and its `quantize/block_ap.py`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from mixbits.model.blockwise import to_device
from mixbits.train.activations import Stream
from mixbits.train.optim import GuardedOptimizer
from mixbits.train.quantized_block import FinalLinear, QuantizedBlock

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BlockHParams:
    """How one block trains. weight_lr: linear name -> lr; patience None = never stop early."""

    epochs: float
    quant_lr: float
    weight_lr: Mapping[str, float]
    min_lr_factor: float = 20.0
    weight_decay: float = 0.0
    grad_clip: float | None = 0.3
    patience: float | None = None
    max_nonfinite: int = 5


@dataclass(frozen=True, eq=False)
class BlockOutcome:
    """The kept state and how training went. best_epoch 0 means the start was kept."""

    final: Mapping[str, FinalLinear]
    loss_start: float
    loss_end: float
    best_epoch: float
    epochs_run: float
    steps: int
    train_loss: float | None
    nonfinite_steps: int
    lr_scale_end: float
    fallback: bool
    val_history: tuple[float, ...] = field(default_factory=tuple)

    @property
    def kept_start(self) -> bool:
        return self.best_epoch == 0


def mse(out: Tensor, target: Tensor) -> Tensor:
    return F.mse_loss(out.float(), target.to(out.device, torch.float32))


@torch.no_grad()
def stream_loss(qblock: QuantizedBlock, inputs: Stream, targets: Stream, final: Mapping[str, FinalLinear] | None,
                device: torch.device) -> float:
    """Mean batch MSE of the block with the finalized state `final` (inf when it is None)."""
    if final is None:
        return math.inf
    weights = qblock.stored_weights(final)
    total = 0.0
    for i in range(len(inputs)):
        hidden, args, kwargs = inputs.batch(i)
        out = qblock(hidden.to(device, torch.float32), to_device(args, device), to_device(kwargs, device), weights)
        total += float(mse(out, targets.hidden(i)))
    return total / len(inputs) if math.isfinite(total) else math.inf


def step_order(n_batches: int, steps: int, generator: torch.Generator) -> list[int]:
    """Batch index of every step: a fresh permutation of the batches per (partial) epoch."""
    order: list[int] = []
    while len(order) < steps:
        order += torch.randperm(n_batches, generator=generator).tolist()
    return order[:steps]


class _Best:
    """The best finalized state validation has seen (the start first), and the patience count."""

    def __init__(self, start: Mapping[str, FinalLinear], loss: float, patience: float | None) -> None:
        self.state, self.loss, self.epoch, self.since = start, loss, 0.0, 0
        self.patience = None if patience is None else math.ceil(patience)
        self.history = [loss]

    def offer(self, state: Mapping[str, FinalLinear] | None, loss: float, epoch: float) -> bool:
        """Record an epoch's state; True when patience says to stop."""
        self.history.append(loss)
        if loss < self.loss:
            self.state, self.loss, self.epoch, self.since = state, loss, epoch, 0
            return False
        self.since += 1
        return self.patience is not None and self.since >= self.patience


def _start(qblock: QuantizedBlock, val: tuple[Stream, Stream], device: torch.device,
           what: str) -> tuple[Mapping[str, FinalLinear], float]:
    start = qblock.finalize()
    loss = stream_loss(qblock, *val, start, device)
    if start is None or not math.isfinite(loss):
        raise ValueError(f"{what}: the start state gives a non-finite validation loss ({loss}); the init "
                         "or the original model produces inf/NaN here; check the model's dtype (use float32)")
    return start, loss


def _check_data(train: tuple[Stream, Stream], val: tuple[Stream, Stream], what: str) -> None:
    (inputs, targets), (val_in, val_target) = train, val
    if not len(inputs) or len(targets) != len(inputs) or not len(val_in) or len(val_target) != len(val_in):
        raise ValueError(f"{what}: {len(inputs)} input / {len(targets)} target training batches and "
                         f"{len(val_in)} / {len(val_target)} validation batches; each pair must match and be non-empty")


def train_block(qblock: QuantizedBlock, train: tuple[Stream, Stream], val: tuple[Stream, Stream],
                hp: BlockHParams, *, device: torch.device, generator: torch.Generator, what: str = "block",
                progress: bool = True) -> BlockOutcome:
    """Train `qblock` on train = (inputs, targets), keep the best state on val; see the module docstring."""
    _check_data(train, val, what)
    (inputs, targets), n = train, len(train[0])
    start, loss_start = _start(qblock, val, device, what)
    steps = max(1, round(hp.epochs * n))
    opt = GuardedOptimizer(qblock.param_groups(hp.quant_lr, hp.weight_lr), total_steps=steps,
                           min_lr_factor=hp.min_lr_factor, weight_decay=hp.weight_decay, grad_clip=hp.grad_clip,
                           max_nonfinite=hp.max_nonfinite, what=what)
    best, losses, train_loss, done = _Best(start, loss_start, hp.patience), [], None, 0
    for done, b in enumerate(tqdm(step_order(n, steps, generator), desc=what, disable=not progress, leave=False), 1):
        hidden, args, kwargs = inputs.batch(b)
        out = qblock(hidden.to(device, torch.float32), to_device(args, device), to_device(kwargs, device),
                     qblock.fake_weights())
        loss = mse(out, targets.hidden(b))
        if opt.step(loss):
            losses.append(float(loss.detach()))
        if opt.exhausted:
            break
        if done % n == 0 or done == steps:  # an epoch (or the last, partial one) ends: validate
            train_loss, losses = (sum(losses) / len(losses) if losses else None), []
            final = qblock.finalize()
            if best.offer(final, stream_loss(qblock, *val, final, device), done / n):
                log.info("%s: no validation improvement for %d epoch(s); stopping at epoch %.2f", what, best.since,
                         done / n)
                break
    if opt.exhausted:
        log.warning("%s: %d non-finite steps; falling back to the start state", what, opt.nonfinite)
        best.state, best.loss, best.epoch = start, loss_start, 0.0
    elif best.epoch == 0:
        log.info("%s: training did not beat the start state (val %.4g); keeping the start", what, loss_start)
    return BlockOutcome(best.state, loss_start, best.loss, best.epoch, done / n, done, train_loss, opt.nonfinite,
                        opt.lr_scale, opt.exhausted, tuple(best.history))
