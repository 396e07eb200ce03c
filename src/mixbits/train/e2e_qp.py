"""E2E-QP: train only the step sizes, end to end, with the integer codes frozen.

After Block-AP every planned linear is W_hat = (q − z) · s with codes q and zero-points z
fixed. E2E-QP makes s [out, G] the only trainable tensors of the whole model and minimises the
causal language-model loss on the calibration windows,

    L(s) = − mean_t log p_s(x_t | x_<t),     W_hat_l(s_l) = (q_l − z_l) · s_l,

so the gradient reaches s directly (no rounding inside: q is constant). That is a few
thousandths of the weights, so it is cheap in optimizer state, and it lets the blocks
re-balance against each other, which block-wise training cannot see. The same guard as
Block-AP applies (`optim.GuardedOptimizer`: cosine decay, clipping, non-finite steps skipped
with the lr halved, fallback to the start after too many), and the kept scales are the best
on the validation windows, the start included, after rounding to fp16 as stored. The written
weights are dequantize(q, (s, z)), so the export stores exactly q again.

Trade-off: the whole model (not one block) sits on the device with activations for backward,
so this stage needs as much memory as fine-tuning with frozen weights. `train.e2e_streamed` takes
the same steps from a lazy checkpoint and the packed codes with one block materialized at a time
(every block read twice per step); both share `optimise_scales` and `step_weight`. Windows are reshuffled
at the sample level every epoch (input ids need no extra arguments). Source: Chen et al. 2024,
EfficientQAT (E2E-QP), `main_e2e_qp.py`; lr 2e-5 at 2 bits, 1e-5 above, clipping 0.3.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call
from tqdm.auto import tqdm

from mixbits.model.arch import find_linears, get_weight, set_weight
from mixbits.model.blockwise import block_on
from mixbits.quant.affine import FP16_MAX, FP16_TINY, QParams, quantize
from mixbits.quant.groups import expand_groups
from mixbits.quant.spec import QuantSpec
from mixbits.train.optim import GuardedOptimizer
from mixbits.train.quantized_block import clamp_ste

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class E2EParams:
    """How E2E-QP trains. lrs: linear name -> lr of its scales."""

    epochs: float
    batch_size: int
    lrs: Mapping[str, float]
    min_lr_factor: float = 20.0
    weight_decay: float = 0.0
    grad_clip: float | None = 0.3
    max_nonfinite: int = 5


@dataclass(frozen=True)
class E2EStats:
    loss_start: float
    loss_end: float
    best_epoch: float
    steps: int
    nonfinite_steps: int
    fallback: bool
    seconds: float
    val_history: tuple[float, ...]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["val_history"], d["kept_start"] = list(self.val_history), self.best_epoch == 0
        return d


def e2e_params(cfg, specs: Mapping[str, QuantSpec]) -> E2EParams:
    """E2E-QP's hyper-parameters from a `TrainConfig` (lr of each linear's scales by its bits)."""
    return E2EParams(cfg.e2e_epochs, cfg.e2e_batch_size, {n: cfg.e2e_lr_of(s.bits) for n, s in specs.items()},
                     cfg.min_lr_factor, cfg.weight_decay, cfg.e2e_grad_clip, cfg.max_nonfinite)


def step_weight(codes: Tensor, zero: Tensor, scale: Tensor, spec: QuantSpec) -> Tensor:
    """W_hat = (q − z) · s [out, in] float32 from codes q [out, in] and zero-points z [out, in] (float32,
    z expanded over its groups), differentiable in `scale` [out, G] (clamped to fp16's range with a
    straight-through clamp)."""
    s = expand_groups(clamp_ste(scale, FP16_TINY, FP16_MAX), codes.shape[1], spec.group_size)
    return (codes - zero) * s


class _FrozenCodes:
    """Codes and zero-points of every planned linear; weights as a function of the scales."""

    def __init__(self, model: nn.Module, specs: Mapping[str, QuantSpec], qparams: Mapping[str, QParams],
                 device: torch.device) -> None:
        infos = find_linears(model)
        self.specs, self.transposed = dict(specs), {n: infos[n].transposed for n in specs}
        self.dtype = {n: get_weight(model.get_submodule(n)).dtype for n in specs}
        self.codes, self.zero = {}, {}
        for n, spec in specs.items():
            qp = QParams(qparams[n].scale.to(device), qparams[n].zero.to(device))
            self.codes[n] = quantize(get_weight(model.get_submodule(n)).to(device), qp, spec).float()
            self.zero[n] = expand_groups(qp.zero.float(), self.codes[n].shape[1], spec.group_size)

    def weight(self, name: str, scale: Tensor) -> Tensor:
        """(q − z) · s as [out, in] float32, differentiable in `scale` [out, G]."""
        return step_weight(self.codes[name], self.zero[name], scale, self.specs[name])

    def weights(self, scales: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Model parameter key -> weight in the module's layout and dtype."""
        out = {}
        for n, s in scales.items():
            w = self.weight(n, s)
            out[f"{n}.weight"] = (w.t() if self.transposed[n] else w).to(self.dtype[n])
        return out


def stored_scales(scales: Mapping[str, Tensor]) -> dict[str, Tensor] | None:
    """Scales rounded to fp16 as stored; None if any is not finite."""
    if not all(bool(torch.isfinite(s).all()) for s in scales.values()):
        return None
    return {n: s.detach().float().clamp(FP16_TINY, FP16_MAX).half().float() for n, s in scales.items()}


def lm_loss(model: nn.Module, weights: Mapping[str, Tensor], ids: Tensor) -> Tensor:
    out = functional_call(model, dict(weights), (), {"input_ids": ids, "labels": ids, "use_cache": False},
                          strict=False)
    return out.loss.float()


@torch.no_grad()
def _val_loss(model, frozen: _FrozenCodes, scales, windows: Tensor, batch_size: int, device) -> float:
    if scales is None:
        return math.inf
    weights = frozen.weights(scales)
    losses = [float(lm_loss(model, weights, windows[i:i + batch_size].to(device)))
              for i in range(0, len(windows), batch_size)]
    value = sum(losses) / len(losses)
    return value if math.isfinite(value) else math.inf


def step_batches(n: int, batch_size: int, steps: int, generator: torch.Generator) -> list[Tensor]:
    """Window indices of every step: a fresh permutation per epoch, cut into batches."""
    out: list[Tensor] = []
    while len(out) < steps:
        out += list(torch.randperm(n, generator=generator).split(batch_size))
    return out[:steps]


def train_step_sizes(model: nn.Module, specs: Mapping[str, QuantSpec], qparams: Mapping[str, QParams],
                     windows: Tensor, val_windows: Tensor, hp: E2EParams, *, device: torch.device,
                     generator: torch.Generator, progress: bool = True) -> tuple[dict[str, QParams], E2EStats]:
    """Train the scales of `model`'s planned linears in place; returns the kept QParams and stats."""
    start_time = time.perf_counter()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.requires_grad_(False)
    try:
        with block_on(model, device):
            frozen = _FrozenCodes(model, specs, qparams, device)
            scales = {n: nn.Parameter(qparams[n].scale.to(device, torch.float32).clone()) for n in specs}
            kept, stats = _optimise(model, frozen, scales, windows, val_windows, hp, device, generator, progress)
            for n, s in kept.items():
                module = model.get_submodule(n)
                set_weight(module, frozen.weight(n, s).detach().to(get_weight(module).dtype))
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
    qps = {n: QParams(kept[n].cpu(), qparams[n].zero.cpu()) for n in specs}
    return qps, E2EStats(**{**asdict(stats), "seconds": time.perf_counter() - start_time})


def _optimise(model, frozen, scales, windows, val_windows, hp: E2EParams, device, generator, progress):
    def step(opt: GuardedOptimizer, idx: Tensor) -> None:
        opt.step(lm_loss(model, frozen.weights(scales), windows[idx].to(device)))

    return optimise_scales(scales, len(windows), hp, generator, step=step, progress=progress,
                           validate=lambda kept: _val_loss(model, frozen, kept, val_windows, hp.batch_size, device))


def optimise_scales(scales: Mapping[str, nn.Parameter], n_windows: int, hp: E2EParams, generator: torch.Generator, *,
                    step: Callable[[GuardedOptimizer, Tensor], None], validate: Callable[[dict | None], float],
                    progress: bool = True, what: str = "E2E-QP") -> tuple[dict[str, Tensor], E2EStats]:
    """The training loop both E2E-QP paths share: epochs, shuffling, the lr schedule, the guard,
    validation after each epoch and the best-state rule (the start included; fp16-rounded scales).

    step(opt, idx): one optimizer step on the windows `idx` (calls `opt.step`); validate(kept): the
    mean validation LM loss with the scales `kept` (None: not finite -> inf). Returns the kept scales
    (float32, fp16-exact) and the stats (seconds left 0 for the caller)."""
    start = stored_scales(scales)
    loss_start = validate(start)
    if not math.isfinite(loss_start):
        raise ValueError(f"E2E-QP: the starting model has a non-finite validation loss ({loss_start}); "
                         "check the Block-AP result and the model dtype (use float32)")
    per_epoch = math.ceil(n_windows / hp.batch_size)
    steps = max(1, round(hp.epochs * per_epoch))
    groups = [{"params": [s], "lr": hp.lrs[n], "name": n} for n, s in scales.items()]
    opt = GuardedOptimizer(groups, total_steps=steps, min_lr_factor=hp.min_lr_factor, weight_decay=hp.weight_decay,
                           grad_clip=hp.grad_clip, max_nonfinite=hp.max_nonfinite, what=what)
    best, best_loss, best_epoch, history = start, loss_start, 0.0, [loss_start]
    done = 0
    for done, idx in enumerate(tqdm(step_batches(n_windows, hp.batch_size, steps, generator), desc=what,
                                    disable=not progress, leave=False), 1):
        step(opt, idx)
        if opt.exhausted:
            break
        if done % per_epoch == 0 or done == steps:
            val = validate(stored_scales(scales))
            history.append(val)
            if val < best_loss:
                best, best_loss, best_epoch = stored_scales(scales), val, done / per_epoch
    if opt.exhausted:
        log.warning("%s: %d non-finite steps; keeping the scales Block-AP gave", what, opt.nonfinite)
        best, best_loss, best_epoch = start, loss_start, 0.0
    log.info("%s: validation LM loss %.4f -> %.4f (best epoch %.2f)", what, loss_start, best_loss, best_epoch)
    stats = E2EStats(loss_start, best_loss, best_epoch, done, opt.nonfinite, opt.exhausted, 0.0, tuple(history))
    return best, stats
