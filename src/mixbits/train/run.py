"""`train_model`: quantization-aware training of a whole model by its plan, block after block.

    1. init: `quantize_model` with cfg.init (rtn | clip | gptq) gives Q and QParams per linear;
    2. capture block-0 inputs of the original model (fp stream) and of the quantized copy
       (q stream), for the training and the validation windows (`activations`);
    3. for each block i: targets T = original block_i(fp inputs); train the quantized block on
       (q inputs -> T) with its schedule (`block_ap.train_block`); write the kept state into the
       quantized model; checkpoint it; q stream <- quantized block_i(q inputs), fp stream <- T;
    4. optionally E2E-QP (`e2e_qp`): the step sizes, end to end, codes frozen.

Only the block under training (a float32 working copy) and the block producing the next
stream are on `device`; both models and the streams stay where they are (CPU, or disk with
cfg.offload). Each block's RNG is `torch.Generator().manual_seed(seed_of(cfg.seed, i))`, so a
resumed run (`checkpoint`) reproduces an uninterrupted one bit for bit on the same device.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import tempfile
import time
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from mixbits.data.windows import text_fingerprint
from mixbits.model.apply import layer_shapes
from mixbits.model.arch import LinearInfo, find_blocks, find_linears, get_weight, set_weight
from mixbits.model.blockwise import block_on
from mixbits.model.quantize import quantize_model
from mixbits.plan import Plan
from mixbits.quant.affine import QParams
from mixbits.quant.gptq import GPTQConfig
from mixbits.quant.kquant import GGMLParams
from mixbits.quant.spec import GGMLSpec, QuantSpec
from mixbits.train.activations import Stream, advance, capture_stream
from mixbits.train.block_ap import BlockHParams, BlockOutcome, train_block
from mixbits.train.checkpoint import BlockCheckpoint
from mixbits.config import TrainConfig
from mixbits.train.e2e_qp import e2e_params, train_step_sizes
from mixbits.train.quantized_block import QuantizedBlock, start_of
from mixbits.train.report import BlockStats, TrainReport
from mixbits.train.schedule import BlockSchedule, block_bits, model_schedules, normalise_scores

log = logging.getLogger(__name__)

__all__ = ["seed_of", "train_model"]


def seed_of(seed: int, index: int) -> int:
    """The RNG seed of block `index` (-1: E2E-QP): independent of every other block's draws."""
    return (seed * 1_000_003 + index + 1) % (2**63)


def _check_windows(windows: Tensor, what: str) -> None:
    if not isinstance(windows, Tensor) or windows.dim() != 2 or windows.dtype != torch.long or len(windows) == 0:
        shape = tuple(windows.shape) if isinstance(windows, Tensor) else type(windows).__name__
        raise ValueError(f"{what} must be a non-empty LongTensor [n, seqlen]; got {shape}")


def _sensitivity(sensitivity: Mapping[int, float] | None, n_blocks: int) -> list[float] | None:
    if sensitivity is None:
        return None
    missing = [i for i in range(n_blocks) if i not in sensitivity]
    extra = [i for i in sensitivity if not 0 <= i < n_blocks]
    if missing or extra:
        raise ValueError(f"sensitivity must give one score per block 0..{n_blocks - 1}; missing {missing[:5]}, "
                         f"unknown {extra[:5]}")
    return normalise_scores([sensitivity[i] for i in range(n_blocks)])


def _model_fingerprint(model: nn.Module) -> str:
    """sha256 of the model's config and of every tensor's sum: a cheap identity check for resume."""
    h = hashlib.sha256(type(model).__name__.encode())
    config = getattr(model, "config", None)
    h.update((config.to_json_string(use_diff=False) if config is not None else "").encode())
    for name, tensor in model.state_dict().items():
        h.update(f"{name}:{tuple(tensor.shape)}:{float(tensor.double().sum())!r}".encode())
    return h.hexdigest()


class _Run:
    """The state of one `train_model` call; methods are the steps of the module docstring."""

    def __init__(self, model: nn.Module, plan: Plan, cfg: TrainConfig, device: torch.device,
                 scores: list[float] | None, progress: bool) -> None:
        self.model, self.plan, self.cfg, self.device, self.progress = model, plan, cfg, device, progress
        self.linears: dict[str, LinearInfo] = find_linears(model)
        self.prefix, blocks = find_blocks(model)
        self.n_blocks = len(blocks)
        self.scores = scores
        specs = dict(plan.specs)
        bits, mean = block_bits(specs, {n: self.linears[n].block for n in specs},
                                {n: self.linears[n].numel for n in specs}, self.n_blocks)
        self.schedules = model_schedules(cfg.schedule, scores, bits, base_epochs=cfg.epochs,
                                         base_patience=cfg.patience, mean_bits=mean,
                                         total_epoch_budget=cfg.total_epoch_budget)
        self.trained = plan.quantized()

    def names_of(self, index: int) -> list[str]:
        return [n for n in self.trained if self.linears[n].block == index]

    def fingerprint(self, calib: Tensor, val: Tensor, model: str | None = None) -> dict:
        """What a resumed run must share with the one that saved the blocks (`BlockCheckpoint`).
        `model`: the model's identity; default the sums of its tensors (a streamed run, whose
        weights are not in memory, names its checkpoint instead)."""
        return {"config": self.cfg.blockwise_dict(), "plan": self.plan.to_dict()["layers"],
                "calib": text_fingerprint(calib), "val": text_fingerprint(val), "sensitivity": self.scores,
                "model": _model_fingerprint(self.model) if model is None else model}

    def hparams(self, index: int) -> BlockHParams:
        sched = self.schedules[index]
        lrs = {n: self.cfg.weight_lr_of(self.trained[n].bits) * sched.lr_scale for n in self.names_of(index)}
        return BlockHParams(sched.epochs, self.cfg.quant_lr * sched.lr_scale, lrs, self.cfg.min_lr_factor,
                            self.cfg.weight_decay, self.cfg.grad_clip, sched.patience, self.cfg.max_nonfinite)

    def quantized_block(self, block_q: nn.Module, index: int, qparams: Mapping[str, QParams]) -> QuantizedBlock:
        """A float32 working copy of the quantized block on the device, started from the init."""
        work = copy.deepcopy(block_q).to(self.device, torch.float32)
        base = f"{self.prefix}.{index}."
        starts, keys, transposed = {}, {}, {}
        for n in self.names_of(index):
            original = get_weight(self.model.get_submodule(n)).to(self.device)
            written = get_weight(block_q.get_submodule(n[len(base):])).to(self.device)
            starts[n] = start_of(original, written, qparams[n], self.trained[n])
            keys[n] = n[len(base):] + ".weight"
            transposed[n] = self.linears[n].transposed
        return QuantizedBlock(work, keys, transposed, starts, self.device)

    def stats(self, index: int, outcome: BlockOutcome, hp: BlockHParams, seconds: float) -> BlockStats:
        sched: BlockSchedule = self.schedules[index]
        return BlockStats(
            index=index, sensitivity=None if self.scores is None else self.scores[index],
            bits={n: self.trained[n].label for n in self.names_of(index)}, epochs=sched.epochs,
            lr_scale=sched.lr_scale, quant_lr=hp.quant_lr, weight_lr=dict(hp.weight_lr), patience=sched.patience,
            loss_start=outcome.loss_start, loss_end=outcome.loss_end, best_epoch=outcome.best_epoch,
            epochs_run=outcome.epochs_run, steps=outcome.steps, train_loss=outcome.train_loss,
            nonfinite_steps=outcome.nonfinite_steps, fallback=outcome.fallback, seconds=seconds,
            val_history=outcome.val_history)


def _write(block_q: nn.Module, base: str, weights: Mapping[str, Tensor]) -> None:
    for n, w in weights.items():
        module = block_q.get_submodule(n[len(base):])
        set_weight(module, w.to(device=get_weight(module).device, dtype=get_weight(module).dtype))


def _train_one(run: _Run, index: int, block_q: nn.Module, streams: dict[str, Stream], targets: dict[str, Stream],
               qparams: dict[str, QParams]) -> tuple[BlockStats, dict[str, Tensor]]:
    """Train block `index`, write its kept state into `block_q`; returns stats and checkpoint tensors."""
    start = time.perf_counter()
    hp = run.hparams(index)
    qblock = run.quantized_block(block_q, index, qparams)
    generator = torch.Generator().manual_seed(seed_of(run.cfg.seed, index))
    outcome = train_block(qblock, (streams["train"], targets["train"]), (streams["val"], targets["val"]), hp,
                          device=run.device, generator=generator, what=f"block {index}", progress=run.progress)
    base = f"{run.prefix}.{index}."
    _write(block_q, base, {n: f.weight for n, f in outcome.final.items()})
    tensors = {}
    for n, f in outcome.final.items():
        qparams[n] = f.qparams
        tensors.update({f"{n}.weight": get_weight(block_q.get_submodule(n[len(base):])).detach(),
                        **{f"{n}.{k}": t for k, t in _grid_tensors(f.qparams).items()}})
    stats = run.stats(index, outcome, hp, time.perf_counter() - start)
    log.info("block %d: val MSE %.4g -> %.4g (x%.3f), best epoch %.2f%s%s", index, stats.loss_start,
             stats.loss_end, stats.ratio, stats.best_epoch, ", kept the start" if stats.kept_start else "",
             ", FELL BACK after non-finite steps" if stats.fallback else "")
    return stats, tensors


def _grid_tensors(qparams: QParams | GGMLParams) -> dict[str, Tensor]:
    """What a checkpoint keeps of a linear's qparams: scale and zero, or a ggml grid's d, dmin, sc, mn."""
    if isinstance(qparams, GGMLParams):
        return {"d": qparams.d, "dmin": qparams.dmin, "sc": qparams.sc, "mn": qparams.mn}
    return {"scale": qparams.scale, "zero": qparams.zero}


def _grid_of(tensors: Mapping[str, Tensor], name: str, spec: QuantSpec | GGMLSpec) -> QParams | GGMLParams:
    """`_grid_tensors` read back from a checkpoint's tensors."""
    if isinstance(spec, GGMLSpec):
        return GGMLParams(spec, *(tensors[f"{name}.{k}"] for k in ("d", "dmin", "sc", "mn")))
    return QParams(tensors[f"{name}.scale"], tensors[f"{name}.zero"])


def _replay(run: _Run, index: int, block_q: nn.Module, ckpt: BlockCheckpoint,
            qparams: dict[str, QParams]) -> BlockStats:
    """Write a finished block from its checkpoint into `block_q`."""
    tensors, stats = ckpt.load(index)
    base = f"{run.prefix}.{index}."
    names = run.names_of(index)
    _write(block_q, base, {n: tensors[f"{n}.weight"] for n in names})
    for n in names:
        qparams[n] = _grid_of(tensors, n, run.trained[n])
    return BlockStats.from_dict({**stats, "resumed": True})


def train_model(
    model: nn.Module,
    plan: Plan,
    calib_windows: Tensor,
    val_windows: Tensor,
    cfg: TrainConfig,
    *,
    device: torch.device | str,
    sensitivity: Mapping[int, float] | None = None,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
    progress: bool = True,
    on_block_done: Callable[[int], None] | None = None,
    gptq: GPTQConfig = GPTQConfig(),
) -> tuple[nn.Module, TrainReport]:
    """A quantized, trained copy of `model` (the original is untouched) and its report.

    calib_windows / val_windows: LongTensor [n, seqlen] to train on / to select states with.
    sensitivity: raw score per block index (min-max normalised here), needed by every schedule
    but `fixed`. checkpoint_dir: where finished blocks are saved; resume: continue from it.
    on_block_done(i): called after block i is finished and checkpointed (progress, tests).
    gptq: the GPTQ settings of a gptq init.
    """
    start = time.perf_counter()
    _check_windows(calib_windows, "calib_windows")
    _check_windows(val_windows, "val_windows")
    plan.validate(layer_shapes(model))
    device = torch.device(device)
    _, blocks = find_blocks(model)
    run = _Run(model, plan, cfg, device, _sensitivity(sensitivity, len(blocks)), progress)
    ckpt = None if checkpoint_dir is None else BlockCheckpoint(
        checkpoint_dir, run.fingerprint(calib_windows, val_windows), resume=resume)
    finished = set(ckpt.finished()) if ckpt is not None else set()
    model_q, init = quantize_model(model, plan, quantizer=cfg.init, device=device, batch_size=cfg.batch_size,
                                   windows=None if cfg.init == "rtn" else calib_windows, progress=progress, gptq=gptq)
    qparams = dict(init.qparams)
    stats = _block_loop(run, model_q, {"train": calib_windows, "val": val_windows}, ckpt, finished, qparams,
                        on_block_done)
    e2e = None
    if cfg.e2e:
        e2e = _e2e(run, model_q, qparams, calib_windows, val_windows)
    report = TrainReport(tuple(stats), qparams, cfg.init, cfg.schedule, cfg.to_dict(), e2e,
                         time.perf_counter() - start)
    log.info("trained %d block(s) in %.1f s (%d resumed, %d kept their start, %d fell back)", len(stats),
             report.seconds, len(report.resumed_blocks), sum(s.kept_start for s in stats),
             sum(s.fallback for s in stats))
    return model_q, report


def _block_loop(run: _Run, model_q: nn.Module, windows: dict[str, Tensor], ckpt: BlockCheckpoint | None,
                finished: set[int], qparams: dict[str, QParams], on_block_done) -> list[BlockStats]:
    """Step 3 of the module docstring over every block."""
    cfg, device = run.cfg, run.device
    _, blocks = find_blocks(run.model)
    _, blocks_q = find_blocks(model_q)
    stats: list[BlockStats] = []
    with ExitStack() as stack:
        root = None
        if cfg.offload:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mixbits-offload-",
                                                                        dir=cfg.offload_dir)))
        capture = dict(batch_size=cfg.batch_size, offload_root=root, progress=False)
        fp = {k: capture_stream(run.model, w, **capture) for k, w in windows.items()}
        q = {k: capture_stream(model_q, w, **capture) for k, w in windows.items()}
        for index in tqdm(range(run.n_blocks), desc="Block-AP", disable=not run.progress):
            with block_on(blocks[index], device):
                targets = {k: advance(blocks[index], s, device=device, offload_root=root) for k, s in fp.items()}
            if run.names_of(index):
                if index in finished:
                    stats.append(_replay(run, index, blocks_q[index], ckpt, qparams))
                else:
                    block_stats, tensors = _train_one(run, index, blocks_q[index], q, targets, qparams)
                    stats.append(block_stats)
                    if ckpt is not None:
                        ckpt.save(index, tensors, block_stats.to_dict())
            if index < run.n_blocks - 1:
                with block_on(blocks_q[index], device):
                    q_next = {k: advance(blocks_q[index], s, device=device, offload_root=root) for k, s in q.items()}
                for s in (*q.values(), *fp.values()):
                    s.close()
                q, fp = q_next, targets
            if on_block_done is not None:
                on_block_done(index)
    return stats


def _e2e(run: _Run, model_q: nn.Module, qparams: dict[str, QParams], calib: Tensor, val: Tensor) -> dict:
    generator = torch.Generator().manual_seed(seed_of(run.cfg.seed, -1))
    new, stats = train_step_sizes(model_q, run.trained, qparams, calib, val, e2e_params(run.cfg, run.trained),
                                  device=run.device, generator=generator, progress=run.progress)
    qparams.update(new)
    return stats.to_dict()
