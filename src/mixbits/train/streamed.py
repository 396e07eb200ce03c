"""Block-AP streamed: train a model block by block from a lazy checkpoint, writing each packed block as it finishes.

Idea: Block-AP (`train.run.train_model`) already works one block at a time; only its start, the
whole-model `quantize_model`, and its end, a whole quantized copy, need the model. Here the model is a
`BlockSource` (a lazy checkpoint: model/lazy.py) and one pass over its blocks does all the work:

    capture   fp stream X_0 (training and validation windows) from the original embeddings; q stream
              Y_0 from the embeddings rounded through float16 (as the native format stores them);
              for a clip / gptq init also C_0, the calibration windows, in `quantize_model`'s batches
    block i   materialize the original block B_i;  targets T = B_i(X_i);
              Bq = B_i copied, its other tensors rounded through float16, each planned linear
                   quantized with cfg.init (H = Σ xᵀx over C_i for clip / gptq);  C_{i+1} = Bq(C_i);
              train Bq on (Y_i -> T) (`block_ap.train_block`, the very step `train_model` runs);
              hand its packed tensors to the sink (`export.native_shards.NativeWriter`);
              Y_{i+1} = Bq(Y_i), X_{i+1} = T; release B_i and Bq

This is `train_model`'s order of operations exactly: its init is `quantize_model` over the whole model
before any training, so block i's init is calibrated on C_i, the stream through the *init* blocks < i
(not through the trained ones), and that is what C carries. Same seeds, same float32 operations on
the same inputs: the same trained weights and scales, bit for bit (tests/train/test_streamed.py).

Resume: the packed shards are the checkpoint. A block counts as finished when the sink holds it and
the run's `BlockCheckpoint` (same fingerprint) holds its statistics, which are saved after the shard
(no weights there). A finished block is read back from the sink (`dequantized_block`) instead of
trained; its init is computed again only when C must go on past it (clip / gptq init).

Peak memory: one block three times (the original, its quantized copy, the float32 working copy with
its latent weights and AdamW moments: `train.quantized_block`), the streams at one block boundary,
4 · (n_train + n_val) · S · H floats for fp, q and the next boundary (on disk with cfg.offload), plus
n_train · S · H and one block's Gram matrices for a clip / gptq init; outside the blocks only during
capture. Never the whole model. Compute is float32 (the caller opens the checkpoint so).

Trade-off: the shards, not a float32 copy of the trained weights, are the checkpoint (the packed size
on disk instead of 4 bytes a weight); a clip / gptq init keeps one more stream at a block boundary
(C) instead of a whole quantized model.

E2E-QP (cfg.e2e) is the next stage, not part of this pass: `train.e2e_streamed.train_e2e_streamed`
trains the step sizes end to end over the blocks written here, one block at a time, and rewrites
their shards (jobs/train.py runs it after `train_streamed`, as `train_model` runs E2E-QP after its
block loop).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from mixbits.config import TrainConfig
from mixbits.model.apply import layer_shapes, round_to_storage
from mixbits.model.arch import get_bias, get_weight, set_weight
from mixbits.model.blockwise import BlockInputs, block_forward, capture_block_inputs
from mixbits.model.quantize import block_grams, params_on_cpu, quantize_layer
from mixbits.model.quantize_streamed import (
    BlockSink,
    Scorer,
    rounded,
    swapped,
    dequantized_block,
    quantize_streamed,
)
from mixbits.model.stream import BlockSource
from mixbits.plan import Plan
from mixbits.quant.affine import QParams
from mixbits.quant.gptq import GPTQConfig
from mixbits.quant.packed import packed_tensors
from mixbits.train.activations import Stream, advance, capture_stream
from mixbits.train.checkpoint import BlockCheckpoint
from mixbits.train.report import BlockStats, TrainReport
from mixbits.train.run import _check_windows, _Run, _sensitivity, _train_one

log = logging.getLogger(__name__)

__all__ = ["STORAGE_DTYPE", "finish_streamed", "stored_outside", "train_fingerprint", "train_streamed"]

STORAGE_DTYPE = torch.float16  # what the native format stores every tensor but the packed linears in


def train_fingerprint(source: BlockSource, plan: Plan, calib_windows: Tensor, val_windows: Tensor, cfg: TrainConfig,
                      *, model: str, sensitivity: Mapping[int, float] | None = None,
                      gptq: GPTQConfig = GPTQConfig()) -> dict:
    """What a resumed streamed run must share with the one that wrote the blocks: `train_model`'s
    fingerprint with `model` (the checkpoint's identity, as the caller knows it) for the tensor sums,
    and the GPTQ settings of a gptq init. Give it to both the sink (`NativeWriter(provenance=)`) and
    the `BlockCheckpoint`."""
    run = _Run(source.model, plan, cfg, source.device, _sensitivity(sensitivity, source.n_blocks), False)
    return {**run.fingerprint(calib_windows, val_windows, model=model),
            "gptq": dataclasses.asdict(gptq) if cfg.init == "gptq" else None}


def train_streamed(
    source: BlockSource,
    plan: Plan,
    calib_windows: Tensor,
    val_windows: Tensor,
    cfg: TrainConfig,
    *,
    sink: BlockSink,
    checkpoint: BlockCheckpoint | None = None,
    sensitivity: Mapping[int, float] | None = None,
    progress: bool = True,
    on_block_done: Callable[[int], None] | None = None,
    gptq: GPTQConfig = GPTQConfig(),
) -> TrainReport:
    """Block-AP of `source` by `plan`, every block packed into `sink` as it finishes (module docstring).

    Arguments as `train_model`; blocks run on `source.device`. checkpoint: the statistics of finished
    blocks (`train_fingerprint` names the run); without it nothing is resumed. The sink receives every
    block (untrained ones too: their tensors rounded as stored) but not what lies outside the blocks:
    `finish_streamed` writes that, scoring the trained variant in the same pass. Returns the report;
    its qparams are those the sink holds. Block-AP only: with cfg.e2e the caller runs
    `e2e_streamed.train_e2e_streamed` next (the e2e fields do not enter the blocks' fingerprint)."""
    start = time.perf_counter()
    _check_windows(calib_windows, "calib_windows")
    _check_windows(val_windows, "val_windows")
    plan.validate(layer_shapes(source.model))
    run = _Run(source.model, plan, cfg, source.device, _sensitivity(sensitivity, source.n_blocks), progress)
    finished = _finished(checkpoint, sink, source.n_blocks)
    qparams: dict[str, QParams] = {}
    stats: list[BlockStats] = []
    with offload_root(cfg) as root:
        pass_ = _Pass(run, source, sink, checkpoint, gptq, root)
        pass_.capture({"train": calib_windows, "val": val_windows}, calib_windows)
        for index in tqdm(range(source.n_blocks), desc="Block-AP (streamed)", disable=not progress):
            block_stats = pass_.block(index, index in finished, qparams)
            if block_stats is not None:
                stats.append(block_stats)
            if on_block_done is not None:
                on_block_done(index)
        pass_.close()
    report = TrainReport(tuple(stats), qparams, cfg.init, cfg.schedule, cfg.to_dict(), None,
                         time.perf_counter() - start)
    log.info("trained %d block(s) streamed in %.1f s (%d resumed, %d kept their start, %d fell back)", len(stats),
             report.seconds, len(report.resumed_blocks), sum(s.kept_start for s in stats),
             sum(s.fallback for s in stats))
    return report


def _finished(checkpoint: BlockCheckpoint | None, sink: BlockSink, n_blocks: int) -> set[int]:
    """The leading blocks both the sink and the checkpoint hold (block i's inputs depend on every block < i)."""
    if checkpoint is None:
        return set()
    recorded, written, out = set(checkpoint.finished()), sink.done_blocks(), set()
    while len(out) < n_blocks and len(out) in recorded and len(out) in written:
        out.add(len(out))
    return out


@contextlib.contextmanager
def offload_root(cfg: TrainConfig) -> Iterator[Path | None]:
    if not cfg.offload:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="mixbits-offload-", dir=cfg.offload_dir) as folder:
        yield Path(folder)


@contextlib.contextmanager
def stored_outside(source: BlockSource) -> Iterator[nn.Module]:
    """Everything outside the blocks materialized and rounded through float16, as the native format
    (and `quantize_model`'s copy) holds it; the source's own tensors are left as they are."""
    prefix = f"{source.block_path}."
    outside = [n for n in source.model.state_dict() if not n.startswith(prefix)]
    with source.resident(STORAGE_DTYPE) as model, swapped(model, model, rounded(model, outside, STORAGE_DTYPE)):
        yield model


class _Pass:
    """The streams one pass carries from block to block, and the steps of block i (module docstring)."""

    def __init__(self, run: _Run, source: BlockSource, sink: BlockSink, checkpoint: BlockCheckpoint | None,
                 gptq: GPTQConfig, root: Path | None) -> None:
        self.run, self.source, self.sink, self.checkpoint = run, source, sink, checkpoint
        self.gptq, self.root = gptq, root
        self.fp: dict[str, Stream] = {}
        self.q: dict[str, Stream] = {}
        self.calib: BlockInputs | None = None  # C: the stream through the init blocks (clip / gptq init)
        self.tokens = 0

    def capture(self, windows: Mapping[str, Tensor], calib: Tensor) -> None:
        cfg = self.run.cfg
        kw = dict(batch_size=cfg.batch_size, offload_root=self.root, progress=False)
        with self.source.resident() as model:
            self.fp = {k: capture_stream(model, w, **kw) for k, w in windows.items()}
        with stored_outside(self.source) as model:
            self.q = {k: capture_stream(model, w, **kw) for k, w in windows.items()}
            if cfg.init != "rtn":  # quantize_model's capture: all windows at once, in training batches
                self.calib = capture_block_inputs(model, calib, batch_size=cfg.batch_size, store="cpu",
                                                  progress=False)
                self.tokens = self.calib.n_tokens

    def block(self, index: int, finished: bool, qparams: dict[str, QParams]) -> BlockStats | None:
        """Block `index` trained (or read back when `finished`), written, and the streams one block further."""
        run, device, last = self.run, self.source.device, index == self.source.n_blocks - 1
        names = run.names_of(index)
        with self.source.block(index) as original:
            targets = {k: advance(original, s, device=device, offload_root=self.root) for k, s in self.fp.items()}
            block_q = self._start(original, index, names, qparams, init=not finished or self.calib is not None)
            if self.calib is not None and not last:
                self.calib = self.calib.with_hidden(block_forward(block_q, self.calib, device=device))
            if finished:
                stats = self._read_back(block_q, index, names, qparams)
            else:
                stats = _train_one(run, index, block_q, self.q, targets, qparams)[0] if names else None
                self.sink.write_block(index, self._packed(block_q, index, names, qparams))
                if self.checkpoint is not None:  # after the shard: its presence marks the block finished
                    self.checkpoint.save(index, {}, stats.to_dict() if stats is not None else {})
        if last:
            for s in targets.values():
                s.close()
            return stats
        q_next = {k: advance(block_q, s, device=device, offload_root=self.root) for k, s in self.q.items()}
        for s in (*self.q.values(), *self.fp.values()):
            s.close()
        self.q, self.fp = q_next, targets
        return stats

    def close(self) -> None:
        for s in (*self.q.values(), *self.fp.values()):
            s.close()

    def _start(self, original: nn.Module, index: int, names: list[str], qparams: dict[str, QParams], *,
               init: bool) -> nn.Module:
        """Bq: a copy of the block, its other tensors rounded as stored, its planned linears quantized
        with cfg.init as `quantize_model` does (`init=False`: left unquantized, to be read back)."""
        run, device, base = self.run, self.source.device, f"{self.source.block_path}.{index}."
        local = {n: n[len(base):] for n in names}
        block_q = copy.deepcopy(original)
        round_to_storage(block_q, Plan({local[n]: run.trained[n] for n in names}), STORAGE_DTYPE)
        if not (init and names):
            return block_q
        grams = None
        if self.calib is not None:
            grams = block_grams(block_q, block_q, list(local.values()), self.calib, device)
        for n in names:
            module = block_q.get_submodule(local[n])
            weight = get_weight(module)
            lq, _ = quantize_layer(weight, run.trained[n], run.cfg.init, device,
                                   H=None if grams is None else grams.H(local[n]), tokens=self.tokens, gptq=self.gptq)
            set_weight(module, lq.weight.to(device=weight.device, dtype=weight.dtype))
            qparams[n] = params_on_cpu(lq.qparams)
        return block_q

    def _read_back(self, block_q: nn.Module, index: int, names: list[str], qparams: dict[str, QParams]
                   ) -> BlockStats | None:
        """A finished block's written weights and scales, from the sink, into Bq; its saved statistics."""
        base = f"{self.source.block_path}.{index}."
        stored = dequantized_block(self.sink.read_block(index), {n: self.run.trained[n] for n in names},
                                   self.run.linears)
        for n, (weight, qp) in stored.items():
            module = block_q.get_submodule(n[len(base):])
            set_weight(module, weight.to(device=get_weight(module).device, dtype=get_weight(module).dtype))
            qparams[n] = qp
        _, saved = self.checkpoint.load(index)
        return BlockStats.from_dict({**saved, "resumed": True}) if names else None

    def _packed(self, block_q: nn.Module, index: int, names: list[str], qparams: Mapping[str, QParams]
                ) -> dict[str, Tensor]:
        """Block `index` as the native format stores it: planned linears packed with their qparams (the
        codes training finalized), every other tensor of Bq as it is (already rounded)."""
        base, tensors, packed = f"{self.source.block_path}.{index}.", {}, set()
        for n in names:
            module = block_q.get_submodule(n[len(base):])
            bias = get_bias(module)
            tensors.update(packed_tensors(n, get_weight(module).detach().cpu(), self.run.trained[n], qparams[n],
                                          None if bias is None else bias.detach().cpu()))
            packed.update({f"{n}.weight", f"{n}.bias"})
        for key, value in block_q.state_dict().items():
            if base + key not in packed:
                tensors[base + key] = value.detach().cpu()
        return tensors


def finish_streamed(source: BlockSource, plan: Plan, sink: BlockSink, *, scorer: Scorer | None = None,
                    name: str = "trained", progress: bool = True):
    """After `train_streamed`: the trained variant read back from `sink` block by block, its evaluation
    windows pushed through and scored on `scorer` (which holds the original's reference; None: no
    evaluation), and everything outside the blocks written to the sink, rounded as stored. One more
    pass over the source (`quantize_streamed` resuming from a sink that holds every block: nothing is
    quantized). Returns the scorer's result (None without one)."""
    missing = sorted(set(range(source.n_blocks)) - sink.done_blocks())
    if missing:
        raise RuntimeError(f"blocks {missing[:10]} are not in the sink; run train_streamed to the end first")
    return quantize_streamed(source, plan, scorer=scorer, name=name, sink=sink, storage_dtype=STORAGE_DTYPE,
                             progress=progress).evaluation
