"""E2E-QP streamed: the step sizes trained end to end with one block materialized at a time.

Idea: after streamed Block-AP (`train.streamed.train_streamed`) every block's codes q, zero-points z
and step sizes s sit packed in the native folder. E2E-QP (`train.e2e_qp`) trains only s, on the
causal LM loss of the calibration windows. Its gradient needs a backward pass through the whole
model but not the whole model in memory; per step, on a batch of windows (activation checkpointing
at block granularity, as the streamed Fisher does: `sensitivity/fisher_streamed.py`):

    capture    X_0 = the embeddings of the batch (rounded through fp16, as stored)
    forward    X_{i+1} = B_i(X_i; W_hat_i(s_i)),  W_hat = (q − z) · s,   i = 0 .. L-1, keeping X_i
    head       loss = the model's own final norm, head and loss on X_L;  G_L = ∂loss/∂X_L
    backward   for i = L-1 .. 0: rebuild W_hat_i from block i's packed codes and the current s_i,
               recompute B_i(X_i) with grad, (G_i, ∂loss/∂s_i) = vjp(B_i, G_{i+1})

then the optimizer step on every s (clipping over all of them). Block i is the source's block with
its other tensors rounded through fp16 (what the folder stores) and W_hat swapped in for its planned
weights, so the numbers are `e2e_qp.train_step_sizes`' on the Block-AP model; the loop around the
step (epochs, shuffling, lr schedule, `GuardedOptimizer`, validation, best state) is the same
function (`e2e_qp.optimise_scales`). On the CPU in float32 with one thread the kept scales equal
the whole-model run's bit for bit (tests/train/test_e2e_streamed.py).

Afterwards each block's shard is written again (`NativeWriter.write_block`: atomic per block) with
the new `.scales`; `.qweight` and `.qzeros` are the bytes Block-AP wrote (the codes never change).
Before E2E starts the folder is completed (everything outside the blocks, index, mixbits.json), so
from then on it always loads: the Block-AP model, or, during the rewrite, some blocks with new scales.

Resume (with a `BlockCheckpoint`): the kept scales and the statistics are saved in one file
(checkpoint/e2e_scales.safetensors, atomically) before any shard is rewritten. A run killed before
that restarts E2E-QP from Block-AP's scales (the shards still hold them; the seeded batches give the
same result); one killed after it loads them and rewrites the blocks not yet rewritten. Once that
file exists, a resume with other E2E settings is refused (some shards may already hold its scales).

Peak memory: one block materialized (compute dtype) plus its W_hat and its codes and zeros in
float32 (more copies of its planned linears), the autograd graph of one block for one batch; every
boundary X_0 .. X_L of the current batch only ((L+1) · batch · S · H floats on `store`; with
cfg.offload one safetensors file each under cfg.offload_dir, read back and deleted by the backward:
the streamed Fisher's `Boundaries`); the validation windows at one boundary (twice while a block
runs); everything outside the blocks during capture and the head, with one batch's logits. All
blocks' scales stay in memory in float32 with their gradient, AdamW's two moments and the start and
best copies: 24 bytes per group of `group_size` weights, a few thousandths of the weights (24 / 128
= 0.19 bytes a weight at group 128, against 2 for the bf16 weights: `budget.predict_train`).

Trade-off: every step reads each block twice from the checkpoint (forward, then the recompute) and
every block's packed shard twice, instead of holding the model; the boundaries of one batch are kept
rather than recomputed. Source: Chen et al. 2024, EfficientQAT (E2E-QP); gradient checkpointing
(Chen et al. 2016) at block granularity.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as save_safetensors
from torch import Tensor, nn
from torch.func import functional_call

from mixbits.config import TrainConfig
from mixbits.errors import UserError
from mixbits.io import atomic_write_bytes
from mixbits.model.arch import LinearInfo, find_linears
from mixbits.model.blockwise import capture_block_inputs, to_device
from mixbits.model.quantize_streamed import stored_form, rounded, swapped
from mixbits.model.stream import BlockSource, head_forward
from mixbits.plan import Plan
from mixbits.quant.affine import QParams
from mixbits.quant.groups import expand_groups, num_groups
from mixbits.quant.packed import layer_from_state
from mixbits.quant.spec import QuantSpec
from mixbits.safeload import check_safetensors
from mixbits.sensitivity.fisher_streamed import Boundaries
from mixbits.train.checkpoint import BlockCheckpoint
from mixbits.train.e2e_qp import E2EStats, e2e_params, optimise_scales, step_weight
from mixbits.train.optim import GuardedOptimizer
from mixbits.train.report import TrainReport
from mixbits.train.run import _check_windows, seed_of
from mixbits.train.streamed import STORAGE_DTYPE, offload_root, stored_outside

log = logging.getLogger(__name__)

__all__ = ["E2E_FILE", "seal", "step_size_count", "train_e2e_streamed"]

E2E_FILE = "e2e_scales.safetensors"
E2E_FORMAT = "mixbits.e2e-scales/1"


class _Walk:
    """Block i of the quantized model as the sink holds it, run with step sizes given per call."""

    def __init__(self, source: BlockSource, sink, specs: Mapping[str, QuantSpec], linears: Mapping[str, LinearInfo]):
        self.source, self.sink, self.specs, self.linears = source, sink, dict(specs), linears
        self.names = {i: [n for n in specs if linears[n].block == i] for i in range(source.n_blocks)}

    def packed(self, index: int) -> dict[str, tuple[Tensor, QParams]]:
        """name -> (codes [out, in] float32, stored QParams) of block `index`'s planned linears."""
        tensors, out = self.sink.read_block(index), {}
        for n in self.names[index]:
            own = {k[len(n) + 1:]: v for k, v in tensors.items() if k.startswith(f"{n}.")}
            layer = layer_from_state(own, self.specs[n], self.linears[n].in_features, self.linears[n].out_features)
            out[n] = (layer.codes().float(), layer.qparams())
        return out

    @contextlib.contextmanager
    def block(self, index: int) -> Iterator[Callable]:
        """run(x, args, kwargs, scales) -> (block output, whether the block returns a tuple), with
        W_hat = (q − z) · scales[name] in place of each planned weight (differentiable in the scales)."""
        device, model = self.source.device, self.source.model
        base = f"{self.source.block_path}.{index}."
        frozen = {}
        for n, (codes, qp) in self.packed(index).items():
            zero = expand_groups(qp.zero.float().to(device), codes.shape[1], self.specs[n].group_size)
            frozen[n] = (codes.to(device), zero)
        with self.source.block(index) as block:
            planned = {f"{n}.weight" for n in frozen}
            state = [base + k for k in block.state_dict() if base + k not in planned]
            with swapped(model, block, rounded(model, state, STORAGE_DTYPE)):

                def run(x: Tensor, args: tuple, kwargs: dict, scales: Mapping[str, Tensor]) -> tuple[Tensor, bool]:
                    weights = {}
                    for n, (codes, zero) in frozen.items():
                        w = step_weight(codes, zero, scales[n], self.specs[n])
                        key = n[len(base):] + ".weight"
                        weights[key] = (w.t() if self.linears[n].transposed else w).to(block.get_parameter(key).dtype)
                    out = functional_call(block, weights, (x, *to_device(args, x.device)), to_device(kwargs, x.device),
                                          strict=False)
                    return (out, False) if isinstance(out, Tensor) else (out[0], True)

                yield run


class _Trainer:
    """One E2E-QP step and one validation, block by block (module docstring)."""

    def __init__(self, walk: _Walk, scales: Mapping[str, nn.Parameter], store: torch.device, offload: Path | None):
        self.walk, self.scales, self.store, self.offload = walk, scales, store, offload
        self.source = walk.source

    def _capture(self, ids: Tensor, batch_size: int):
        with stored_outside(self.source) as model:
            return capture_block_inputs(model, ids, batch_size=batch_size, store=self.store, progress=False)

    @torch.no_grad()
    def _forward(self, hidden: list[Tensor], inputs, scales, saved: Boundaries | None = None) -> bool:
        """hidden[b] <- X_L of batch b, in place; saves each block's input in `saved` (one batch)."""
        as_tuple, device = False, self.source.device
        for i in range(self.source.n_blocks):
            if saved is not None:
                saved.put(i, hidden)
            with self.walk.block(i) as run:
                for b, (args, kwargs) in enumerate(zip(inputs.args, inputs.kwargs)):
                    out, as_tuple = run(hidden[b].to(device), args, kwargs, scales)
                    hidden[b] = out.to(self.store)
        return as_tuple

    def step(self, opt: GuardedOptimizer, ids: Tensor) -> None:
        inputs, saved = self._capture(ids, len(ids)), Boundaries(self.offload, self.store)
        hidden = list(inputs.hidden)
        as_tuple = self._forward(hidden, inputs, self.scales, saved)
        with stored_outside(self.source) as model, torch.enable_grad():
            x = hidden[0].to(self.source.device).requires_grad_(True)
            loss = head_forward(model, x, ids, labels=True, as_tuple=as_tuple).loss.float()
            grad = torch.autograd.grad(loss, x)[0].to(self.store) if bool(torch.isfinite(loss)) else None
            loss = loss.detach()  # the head's graph (its logits, the head's weights) goes before any block comes
        del x, hidden

        def backward() -> None:
            self._backward(saved, inputs.args[0], inputs.kwargs[0], grad)

        opt.step(loss, backward=backward)

    def _backward(self, saved: Boundaries, args: tuple, kwargs: dict, grad: Tensor) -> None:
        """Each scale's .grad from G_L, block by block from the last (module docstring)."""
        device = self.source.device
        for i in reversed(range(self.source.n_blocks)):
            (x_in,) = saved.take(i)
            mine = [self.scales[n] for n in self.walk.names[i]]
            if not mine and i == 0:
                break
            with self.walk.block(i) as run, torch.enable_grad():
                x = x_in.to(device).requires_grad_(i > 0)
                out, _ = run(x, args, kwargs, self.scales)
                wanted = ([x] if i > 0 else []) + mine
                got = torch.autograd.grad(out, wanted, grad_outputs=grad.to(device, out.dtype), allow_unused=True)
            for s, g in zip(mine, got[1:] if i > 0 else got):
                s.grad = g
            grad = got[0].detach().to(self.store) if i > 0 else grad
            del x, out, got

    @torch.no_grad()
    def validate(self, scales: Mapping[str, Tensor] | None, windows: Tensor, batch_size: int) -> float:
        """Mean LM loss over the batches of `windows` (as `e2e_qp._val_loss`); inf if not finite."""
        if scales is None:
            return math.inf
        inputs = self._capture(windows, batch_size)
        hidden = list(inputs.hidden)
        as_tuple = self._forward(hidden, inputs, scales)
        with stored_outside(self.source) as model:
            losses = [float(head_forward(model, h.to(self.source.device), windows[b * batch_size:(b + 1) * batch_size],
                                         labels=True, as_tuple=as_tuple).loss.float()) for b, h in enumerate(hidden)]
        value = sum(losses) / len(losses)
        return value if math.isfinite(value) else math.inf


def step_size_count(plan: Plan, shapes: Mapping[str, tuple[int, int]]) -> int:
    """How many step sizes E2E-QP trains for `plan` on linears of `shapes` (name -> (out, in))."""
    return sum(shapes[n][0] * num_groups(shapes[n][1], s.group_size) for n, s in plan.quantized().items()
               if isinstance(s, QuantSpec))  # E2E-QP trains no ggml grid (refused up front)


def seal(source: BlockSource, sink) -> None:
    """Complete the native folder around the blocks the sink holds: everything outside the blocks
    (rounded as stored, as `finish_streamed` writes it), then the index and mixbits.json, so the
    folder loads from here on whatever happens to it next."""
    prefix = f"{source.block_path}."
    outside = [n for n in source.model.state_dict() if not n.startswith(prefix)]
    with stored_outside(source) as model:
        sink.write_rest(*stored_form(model, outside, set()))
    sink.finish()


def _fingerprint(checkpoint: BlockCheckpoint, cfg: TrainConfig) -> dict:
    """What a resume must share with the run that saved the kept scales: the blocks' run and the E2E settings."""
    return {"blocks": checkpoint.fingerprint, "e2e": {k: v for k, v in cfg.to_dict().items() if k.startswith("e2e")}}


def _load_kept(checkpoint: BlockCheckpoint | None, cfg: TrainConfig) -> tuple[dict[str, Tensor], dict] | None:
    """(kept scales, stats) saved by an earlier run of these settings; None if there are none."""
    if checkpoint is None or not (checkpoint.directory / E2E_FILE).is_file():
        return None
    path = checkpoint.directory / E2E_FILE
    check_safetensors(path, "E2E-QP scales file")
    with safe_open(str(path), "pt") as handle:
        meta = handle.metadata() or {}
        kept = {k: handle.get_tensor(k) for k in handle.keys()}
    saved, wanted = json.loads(meta.get("run", "null")), json.loads(json.dumps(_fingerprint(checkpoint, cfg)))
    if saved != wanted:
        diff = sorted(k for k in wanted["e2e"] if (saved or {}).get("e2e", {}).get(k) != wanted["e2e"][k])
        raise UserError(f"cannot resume from {str(checkpoint.directory)!r}: its E2E-QP scales were trained with other "
                        f"settings ({', '.join(diff) or 'another run'}) and may already be in the model's shards; "
                        "rerun with the same settings, or choose an empty output folder")
    log.info("resuming: E2E-QP's trained scales are saved in %s; rewriting the blocks that lack them", path)
    return kept, json.loads(meta["stats"])


def _save_kept(checkpoint: BlockCheckpoint | None, cfg: TrainConfig, kept: Mapping[str, Tensor], stats: dict) -> None:
    if checkpoint is None:
        return
    meta = {"format": E2E_FORMAT, "run": json.dumps(_fingerprint(checkpoint, cfg)), "stats": json.dumps(stats)}
    data = {n: s.detach().cpu().contiguous() for n, s in kept.items()}
    atomic_write_bytes(checkpoint.directory / E2E_FILE, save_safetensors(data, metadata=meta))


def _rewrite(walk: _Walk, kept: Mapping[str, Tensor], after_block: Callable[[int], None] | None) -> int:
    """Each block's shard written again with the kept scales (atomically, one block at a time; codes and
    every other tensor as they were). Blocks that already hold them are left alone. Returns how many."""
    rewritten = 0
    for i in range(walk.source.n_blocks):
        tensors = walk.sink.read_block(i)
        new = {f"{n}.scales": kept[n].to(torch.float16) for n in walk.names[i]}
        if any(not torch.equal(tensors[k], v) for k, v in new.items()):
            walk.sink.write_block(i, {**tensors, **new})
            rewritten += 1
        if after_block is not None:
            after_block(i)
    return rewritten


def train_e2e_streamed(
    source: BlockSource,
    plan: Plan,
    calib_windows: Tensor,
    val_windows: Tensor,
    cfg: TrainConfig,
    *,
    sink,
    report: TrainReport,
    checkpoint: BlockCheckpoint | None = None,
    store: torch.device | str = "cpu",
    progress: bool = True,
    after_block: Callable[[int], None] | None = None,
) -> TrainReport:
    """E2E-QP of the Block-AP model the sink holds (module docstring); returns `report` with the kept
    qparams and the E2E statistics. sink: the `NativeWriter` `train_streamed` wrote (every block
    done); checkpoint: the same run's `BlockCheckpoint` (None: nothing saved, nothing resumed);
    after_block(i): called once block i's shard holds the new scales (tests)."""
    start = time.perf_counter()
    _check_windows(calib_windows, "calib_windows")
    _check_windows(val_windows, "val_windows")
    missing = sorted(set(range(source.n_blocks)) - sink.done_blocks())
    if missing:
        raise RuntimeError(f"blocks {missing[:10]} are not in the sink; run train_streamed to the end first")
    linears, specs = find_linears(source.model), plan.quantized()
    typed = [n for n, s in specs.items() if not isinstance(s, QuantSpec)]
    if typed:
        raise ValueError(f"E2E-QP trains affine step sizes; layers {typed[:3]} are planned as ggml types "
                         "(their scales are not (q − z) · s): train without e2e, or plan affine specs")
    walk, store = _Walk(source, sink, specs, linears), torch.device(store)
    seal(source, sink)
    saved = _load_kept(checkpoint, cfg)
    if saved is None:
        kept, stats = _train(walk, specs, calib_windows, val_windows, cfg, store, progress)
        stats = {**asdict(stats), "seconds": time.perf_counter() - start}
        _save_kept(checkpoint, cfg, kept, stats)
    else:
        kept, stats = saved
    rewritten = _rewrite(walk, kept, after_block)
    log.info("E2E-QP (streamed): %d block shard(s) rewritten with the trained scales", rewritten)
    qparams = {**report.qparams, **{n: QParams(kept[n].float(), report.qparams[n].zero) for n in specs}}
    e2e = E2EStats(**{**stats, "val_history": tuple(stats["val_history"])}).to_dict()
    return replace(report, qparams=qparams, e2e=e2e, seconds=report.seconds + time.perf_counter() - start)


def _train(walk: _Walk, specs: Mapping[str, QuantSpec], calib: Tensor, val: Tensor, cfg: TrainConfig,
           store: torch.device, progress: bool) -> tuple[dict[str, Tensor], E2EStats]:
    """The step sizes trained from the scales the sink holds: the kept scales (fp16-exact) and stats."""
    source, hp = walk.source, e2e_params(cfg, specs)
    start = {}
    for i in range(source.n_blocks):  # the scales as stored (fp16), not re-derived
        tensors = walk.sink.read_block(i)
        start.update({n: tensors[f"{n}.scales"].float() for n in walk.names[i]})
    scales = {n: nn.Parameter(start[n].to(source.device, torch.float32).clone()) for n in specs}
    generator = torch.Generator().manual_seed(seed_of(cfg.seed, -1))
    flags = {n: p.requires_grad for n, p in source.model.named_parameters()}
    source.model.requires_grad_(False)  # only the scales learn (materialized tensors take the skeleton's flags)
    try:
        with offload_root(cfg) as root:  # with cfg.offload the batch's boundaries wait there, one file each
            trainer = _Trainer(walk, scales, store, root)
            kept, stats = optimise_scales(
                scales, len(calib), hp, generator, progress=progress, what="E2E-QP (streamed)",
                step=lambda opt, idx: trainer.step(opt, calib[idx]),
                validate=lambda sc: trainer.validate(sc, val, hp.batch_size))
    finally:
        for n, p in source.model.named_parameters():
            p.requires_grad_(flags[n])
    return {n: s.cpu() for n, s in kept.items()}, stats
