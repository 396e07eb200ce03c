"""Will the run fit? Its peak memory predicted from the model's shapes before any weight is read.

Idea: `mixbits run` is a chain of stages, each streamed block by block (model/memory.py predicts
one stage's peak from shapes). The run's peak is the largest stage's, plus what the process
holds throughout:

    peak(run) = max_stage peak(stage) + runtime + read buffer + allocator slack

    stages   fisher            the empirical Fisher, block by block (`predict_fisher`)
             gain table        the quantizer's gain per layer x config: one block's Hessians and a
                               GPTQ working set (`predict_gptq`), when --damage follow and not rtn
             quantize+evaluate one variant at a time (original, mixed, up to two uniform baselines):
                               its block quantized on the calibration boundaries while the
                               evaluation windows pass through it; the reference's summary stays
                               for every later variant, so the count of variants costs time, not memory
             train             Block-AP (with --qat): one block in float32 with its gradient and
                               AdamW's two moments, the training and validation boundaries
             e2e               E2E-QP (with train --e2e): one block with its codes and W_hat, every
                               step size with AdamW's moments, one batch's boundaries at every block
             zeroshot          (with --tasks) one model at a time placed by accelerate: its weights
                               up to the --max-memory share, the rest on disk (model/dispatch.py)
    runtime                    python, torch, transformers and mixbits, the tokenizer and the texts:
                               0.75-0.80 GiB measured for `mixbits run` / `analyze` on the CPU with a
                               6 M-parameter checkpoint (bench/memory.py --sizes tiny), counted as 0.8 GiB
    read buffer                the tensor being read, in the checkpoint's dtype, before its cast
                               (read with a plain file read, not mapped: model/lazy.py)
    preloaded checkpoint       with --preload, the whole checkpoint in its own dtype (model/lazy.py)
    allocator slack            the CLI pins glibc's mmap threshold (model/memory.py), so a streamed
                               run's freed tensors go back to the system: none counted; a
                               whole-model run keeps freed copies in the heap regardless: about
                               two blocks' weights (bench/memory.py, 0.5 GiB at hidden 2048)

Each stage's head (final norm, head, one batch's logits) is one of its phases. With stream=False,
or an option that still loads the whole model (--iterative, --qat), every variant is a
float32 copy of the whole model, all alive at once, and training comes on top of them.

On CUDA the stages' tensors are compared with the device's budget (`cuda:N=...`), the runtime and
mapped pages with the host's (`cpu=...`). `check_run_memory` logs the prediction with its parts and,
under `max_memory`, refuses a run that cannot fit, naming the stage, the block, the sizes and the
fixes that would make it fit (each fix re-predicted, not guessed).

Trade-off: the count is closed-form and cheap; it is an estimate (kernels' temporaries, allocator
fragmentation), checked against measured peaks on tiny models and by bench/memory.py on checkpoints
of 0.2-2.2 B parameters.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import torch
from torch import nn

from mixbits.config import DataConfig, RunConfig, TrainConfig, resolve_device
from mixbits.devices import compute_torch_dtype, parse_max_memory
from mixbits.model.arch import find_blocks
from mixbits.model.memory import (
    MemoryPrediction,
    ModelShapes,
    model_shapes,
    predict_evaluation,
    predict_fisher,
    predict_gptq,
)

log = logging.getLogger(__name__)

__all__ = ["RUNTIME_BYTES", "RunMemory", "check_run_memory", "predict_run", "predict_train", "renamed", "skeleton_of",
           "streams"]

RUNTIME_BYTES = 820 * 2**20  # a mixbits process on the CPU: 0.75-0.80 GiB measured on a 6 M-parameter model
CUDA_CONTEXT_BYTES = 512 * 2**20  # the CUDA context and kernels on the device
SLACK_BLOCKS = 2  # freed memory glibc keeps when its mmap threshold is not pinned: ~2 blocks (bench/memory.py, 0.6b)
_AUTO_FULL_BYTES = 256 * 2**20  # eval/streamed.py's topk="auto": full log-probs up to this size, else hidden states
_CHARS_PER_TOKEN = 3  # a whole test split's token count, estimated from its characters (English BPE: ~4)


@dataclass(frozen=True)
class RunMemory:
    """The predicted peak of a run: its stages, the largest block, and what the process holds throughout."""

    budget_device: str  # the max_memory key the stages are compared with: "cpu" or "cuda:N"
    dtype: torch.dtype  # compute dtype
    stages: tuple[MemoryPrediction, ...]
    held: MappingProxyType  # {part: bytes} held by the process throughout (on the host)
    block: int  # index of the largest block
    block_bytes: int  # its weights in the compute dtype
    block_name: str = ""

    @property
    def peak(self) -> MemoryPrediction:
        return max(self.stages, key=lambda s: s.total)

    @property
    def total(self) -> int:
        """Everything on one device (CPU runs): the largest stage plus what is held throughout."""
        return self.peak.total + sum(self.held.values())

    def on(self, device: str) -> int:
        """Bytes predicted on a max_memory device key: the stages and, on the host, what is held."""
        if device == self.budget_device:
            return self.total if device == "cpu" else self.peak.total + CUDA_CONTEXT_BYTES
        return sum(self.held.values()) if device == "cpu" else 0

    def where(self) -> str:
        """Where the peak phase is: at the largest block, or outside the blocks (capture, head)."""
        if any(word in self.peak.phase for word in ("head", "capture")):
            return "outside the blocks (embeddings, final norm, head)"
        return f"at {self.block_name or f'block {self.block}'} (the largest block, {size_text(self.block_bytes)})"

    def describe(self) -> str:
        held = ", ".join(f"{k} {size_text(v)}" for k, v in self.held.items() if v)
        stages = "; ".join(f"{s.stage} {size_text(s.total)}" for s in self.stages)
        peak = self.peak
        parts = ", ".join(f"{k} {size_text(v)}" for k, v in peak.parts.items() if v)
        return (f"predicted peak {size_text(self.total)} in {str(self.dtype).removeprefix('torch.')}: {peak.stage} "
                f"{size_text(peak.total)} during {peak.phase} {self.where()} ({parts}); "
                f"plus {held}; stages: {stages}")


def size_text(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def renamed(prediction: MemoryPrediction, stage: str) -> MemoryPrediction:
    """The same prediction under another stage name."""
    return dataclasses.replace(prediction, stage=stage)


_SHARED = ("block weights", "block temporaries", "quantizer temporaries", "outside weights", "whole model")


def _union(first: MemoryPrediction, first_phase: str, second: MemoryPrediction, second_phase: str,
           stage: str, prefix: str) -> MemoryPrediction:
    """Two phases' tensors alive at once (interleaved passes over the same block): parts that are one
    object in both (the block's weights, its temporaries) counted once, the rest added."""
    parts = dict(first.phase_parts(first_phase))
    for name, size in second.phase_parts(second_phase).items():
        if name in _SHARED:
            parts[name] = max(parts.get(name, 0), size)
        else:
            parts[f"{prefix}{name}"] = parts.get(f"{prefix}{name}", 0) + size
    return MemoryPrediction(stage, f"{first_phase} + {prefix}{second_phase}", MappingProxyType(parts))


def _eval_topk(windows: int, seqlen: int, vocab: int) -> str | None:
    """The reference summary `eval.streamed` keeps with topk="auto": full log-probs, else hidden states."""
    return None if windows * (seqlen - 1) * vocab * 4 <= _AUTO_FULL_BYTES else "hidden"


def _quantize_evaluate(cfg: RunConfig, shapes: ModelShapes, dtype: torch.dtype, eval_n: int,
                       held: int) -> MemoryPrediction:
    """A variant's block quantized (rtn: one linear at a time; clip/gptq: on the calibration
    boundaries with the block's Hessians) while the evaluation windows go through it. `held`: bytes
    per value of the embedding and head (the original's in its checkpoint dtype, a variant's rounded
    to float16, whichever is wider)."""
    seqlen, b = cfg.data.seqlen, dtype.itemsize
    evaluation = predict_evaluation(shapes, windows=eval_n, seqlen=seqlen, dtype=dtype, held=held,
                                    topk=_eval_topk(eval_n, seqlen, shapes.vocab), streamed=True)
    phases = {phase: dict(parts) for phase, parts in evaluation.phases.items()}
    phases["blocks"]["packed block (float16 bound)"] = max(shapes.block_params) * 2  # what the sink is given
    # stored-dtype copies swapped in for what the checkpoint does not hold rounded already (final norm, ...)
    phases["head"]["rounded outside copies"] = (shapes.outside_params - shapes.held_params) * b
    evaluation = dataclasses.replace(evaluation, phases=MappingProxyType(phases), parts=phases[evaluation.phase])
    if cfg.quantizer == "rtn":  # no calibration windows: the peak phase of the evaluation
        phase = max(phases, key=lambda k: sum(phases[k].values()))
        return MemoryPrediction("quantize+evaluate", phase, MappingProxyType(phases[phase]))
    quantize = predict_gptq(shapes, windows=cfg.data.calib_windows, seqlen=seqlen, dtype=dtype, held=held)
    return max((_union(evaluation, "blocks", quantize, "block", "quantize+evaluate", "calibration "),
                _union(evaluation, "head", quantize, "capture", "quantize+evaluate", "calibration ")),
               key=lambda p: p.total)


def _whole_model(cfg: RunConfig, shapes: ModelShapes, dtype: torch.dtype, eval_n: int, variants: int) -> MemoryPrediction:
    """stream=False: the original and every variant, each a whole copy, plus evaluation's buffers."""
    b = dtype.itemsize
    evaluation = predict_evaluation(shapes, windows=eval_n, seqlen=cfg.data.seqlen, dtype=dtype, streamed=False,
                                    topk=None)
    parts = {"original model": shapes.total_params * b, "quantized copies": (variants - 1) * shapes.total_params * b}
    parts.update({k: v for k, v in evaluation.parts.items() if k not in ("block weights", "whole model")})
    return MemoryPrediction("quantize+evaluate", f"{variants} models alive", MappingProxyType(parts))


def _train(t: TrainConfig, shapes: ModelShapes) -> MemoryPrediction:
    """Block-AP (train/streamed.py, train/run.py): the original block and its quantized copy, the
    float32 working copy with its gradient and AdamW's two moments, the start and best states kept for
    the restore, the fake-quantization graph of a step; the fp, q, target and next streams
    for the training and validation windows at one block boundary (two batches each with offload);
    for a clip / gptq init also the calibration stream and the block's Hessians; one batch's graph."""
    boundary = t.seqlen * shapes.hidden * 4
    kept = 4 * (2 * t.batch_size if t.offload else t.train_size + t.val_size) * boundary
    grad_io = max((sum(i + o for o, i in blk) for blk in shapes.block_linears), default=0)
    activations = t.batch_size * (t.seqlen * grad_io * 4 + shapes.heads * t.seqlen ** 2 * 4)
    block = max(shapes.block_params) * 4
    parts = {"original block, quantized copy": 2 * block,
             "working copy, gradient, AdamW moments": 4 * block,
             "start and best finalized states": 2 * block,
             # the straight-through fake quantization keeps W/s, its rounding, the dequantized W and their
             # gradients per step: about 4 blocks (12 blocks in all measured 10.8-12.5 on a 256-wide Llama)
             "fake-quantization graph": 4 * block,
             "boundaries (fp, q, targets, next)": kept, "block activations": activations}
    if t.init != "rtn":
        parts["init calibration stream, Hessians"] = t.train_size * boundary + max(
            (sum(4 * i * i for _, i in blk) for blk in shapes.block_linears), default=0)
    return MemoryPrediction("train", "block", MappingProxyType(parts))


def _e2e(t: TrainConfig, shapes: ModelShapes, scales: int | None) -> MemoryPrediction:
    """E2E-QP streamed (train/e2e_streamed.py): one block materialized with its codes, zero-points and
    W_hat in float32 and the autograd graph's copy of (q − z); every step size in float32 with its
    gradient, AdamW's two moments and the start and best copies; one batch's boundaries at every block
    (about three with cfg.offload, the rest on disk) and its gradient; one batch's block activations;
    the validation windows at one boundary, twice.
    `scales`: how many step sizes the plan trains (None: one per 32 weights, an upper bound)."""
    weights = sum(o * i for blk in shapes.block_linears for o, i in blk)
    scales = weights // 32 if scales is None else scales
    boundary = t.seqlen * shapes.hidden * 4
    grad_io = max((sum(i + o for o, i in blk) for blk in shapes.block_linears), default=0)
    activations = t.e2e_batch_size * (t.seqlen * grad_io * 4 + shapes.heads * t.seqlen ** 2 * 4)
    return MemoryPrediction("e2e", "block", MappingProxyType({
        "block, codes, zero-points, W_hat, graph": 5 * max(shapes.block_params) * 4,
        "step sizes, gradient, AdamW moments, start and best": 6 * 4 * scales,
        "one batch's boundaries and gradient": (3 if t.offload else shapes.n_blocks + 2) * t.e2e_batch_size * boundary,
        "block activations": activations, "validation boundaries": 2 * t.val_size * boundary}))


def _zeroshot(cfg: RunConfig, shapes: ModelShapes, dtype: torch.dtype, device: torch.device) -> MemoryPrediction:
    """Zero-shot tasks in a streamed run (model/dispatch.py): one model at a time, its weights in the
    compute dtype up to the share accelerate is given (--max-memory less the runtime; the rest on
    disk), the mixed model first loaded packed (bounded by 8 bits a block weight), and lm-eval's
    batch of 8 sequences' logits (512 tokens assumed; task contexts are usually shorter)."""
    weights = shapes.total_params * dtype.itemsize
    if cfg.max_memory is not None:
        budget = parse_max_memory(cfg.max_memory)
        key = "cpu" if device.type == "cpu" else f"cuda:{device.index or 0}"
        if key in budget:
            weights = min(weights, max(budget[key] - (RUNTIME_BYTES if key == "cpu" else 0), 0))
    packed = shapes.outside_params * dtype.itemsize + sum(shapes.block_params)
    return MemoryPrediction("zeroshot", "one model", MappingProxyType({
        "model weights (accelerate's share)": max(weights, packed), "lm-eval batch logits": 8 * 512 * shapes.vocab * 4}))


def eval_windows_of(cfg: RunConfig, given: int | None) -> int:
    if given is not None:
        return given
    if cfg.data.eval_windows:
        return cfg.data.eval_windows
    from mixbits.data.text import load_text  # the whole test split: windows estimated from its characters

    chars = sum(len(doc) for doc in load_text(cfg.data.dataset, "test"))
    return max(1, math.ceil(chars / _CHARS_PER_TOKEN / cfg.data.seqlen))


def predict_run(
    cfg: RunConfig, shapes: ModelShapes, *, device: torch.device, checkpoint_dtype: torch.dtype = torch.float32,
    variants: int | None = None, eval_windows: int | None = None,
) -> RunMemory:
    """The run's predicted peak (module docstring). `variants`: models quantized and scored besides
    the original (default: mixed + two uniform baselines, or the mixed one alone without baselines);
    `eval_windows`: the test windows (default from cfg; for 0, the whole split, estimated)."""
    streamed = streams(cfg)
    dtype = compute_torch_dtype(cfg.compute_dtype) or (
        checkpoint_dtype if device.type == "cuda" and streamed else torch.float32)
    variants = variants if variants is not None else (3 if cfg.baselines else 1)
    eval_n = eval_windows_of(cfg, eval_windows)
    d, offload = cfg.data, cfg.offload_dir is not None
    stages = []
    # a lazy checkpoint holds embedding and head in the stored dtype where it is narrower (model/upcast.py)
    stored = min(dtype.itemsize, checkpoint_dtype.itemsize if checkpoint_dtype.is_floating_point else 4)
    if cfg.plan is None:
        stages.append(predict_fisher(shapes, windows=d.calib_windows, seqlen=d.seqlen, dtype=dtype,
                                     streamed=streamed, offload=offload, held=stored))
        if cfg.quantizer != "rtn" and cfg.damage == "follow":
            stages.append(renamed(predict_gptq(shapes, windows=d.calib_windows, seqlen=d.seqlen, dtype=dtype,
                                               streamed=streamed, held=stored), "gain table"))
    stages.append(_quantize_evaluate(cfg, shapes, dtype, eval_n, max(stored, min(dtype.itemsize, 2))) if streamed
                  else _whole_model(cfg, shapes, dtype, eval_n, 1 + variants))
    if cfg.tasks and streamed:  # the whole-model path scores the models it already holds
        stages.append(_zeroshot(cfg, shapes, dtype, device))
    if cfg.train is not None:  # after quantization; without streaming the models stay alive
        train = _train(cfg.train, shapes)
        if not streamed:
            models = {k: v for k, v in stages[-1].parts.items() if k in ("original model", "quantized copies")}
            train = dataclasses.replace(train, parts=MappingProxyType({**models, **train.parts}))
        stages.append(train)
    block = max(range(shapes.n_blocks), key=lambda i: shapes.block_params[i]) if shapes.n_blocks else 0
    largest_tensor = max([shapes.vocab * shapes.hidden] + [o * i for blk in shapes.block_linears for o, i in blk])
    held = {"runtime": RUNTIME_BYTES,
            "read buffer": largest_tensor * checkpoint_dtype.itemsize if streamed else 0,
            # the embedding and head held in 16 bits share it (counted in the stages)
            "checkpoint held in RAM (--preload)": ((shapes.total_params - (shapes.held_params if stored < dtype.itemsize
                                                                           else 0)) * checkpoint_dtype.itemsize
                                                   if streamed and cfg.preload else 0),
            # check_run_memory pins the mmap threshold of a streamed run: freed tensors are returned
            "allocator slack": 0 if streamed else SLACK_BLOCKS * max(shapes.block_params, default=0) * dtype.itemsize}
    budget_device = "cpu" if device.type == "cpu" else f"cuda:{device.index or 0}"
    return RunMemory(budget_device, dtype, tuple(stages), MappingProxyType(held), block,
                     shapes.block_params[block] * dtype.itemsize if shapes.n_blocks else 0)


def predict_train(
    cfg: TrainConfig, shapes: ModelShapes, *, device: torch.device, checkpoint_dtype: torch.dtype = torch.float32,
    eval_windows: int = 24, e2e_scales: int | None = None,
) -> RunMemory:
    """`mixbits train` streamed (jobs/train.py, train/streamed.py): Block-AP block by block in float32
    (its block with gradient and AdamW moments, the training and validation boundaries), with cfg.e2e
    E2E-QP block by block (`_e2e`; e2e_scales: the plan's step sizes), then the original, the initial
    quantization (`cfg.init`, on the training windows) and the trained model scored one block at a time
    on `eval_windows` test windows; plus what the process holds."""
    data = DataConfig(dataset=cfg.dataset, seqlen=cfg.seqlen, calib_windows=cfg.train_size, eval_windows=eval_windows)
    run = RunConfig(data=data, quantizer=cfg.init)  # the init pass and the scoring are `mixbits run`'s
    memory = predict_run(run, shapes, device=device, checkpoint_dtype=checkpoint_dtype, variants=2,
                         eval_windows=eval_windows)
    scoring = next(s for s in memory.stages if s.stage == "quantize+evaluate")
    e2e = (_e2e(cfg, shapes, e2e_scales),) if cfg.e2e else ()
    return dataclasses.replace(memory, stages=(_train(cfg, shapes), *e2e, scoring))


def streams(cfg: RunConfig) -> bool:
    """Whether the run works block by block: cfg.stream, and none of the options that still load the
    whole model (--iterative, --qat; `jobs.run_streamed.whole_model_reasons`)."""
    return cfg.stream and cfg.iterative is None and cfg.train is None


def skeleton_of(source: str | Path) -> tuple[nn.Module, torch.dtype]:
    """(the model on the meta device, the checkpoint's dtype from config.json) of a local folder or
    a hub id (its config only); reads no weight."""
    from mixbits.model.lazy import _load_config, _skeleton

    if Path(source).expanduser().is_dir():
        config = _load_config(Path(source).expanduser())
    else:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(source), trust_remote_code=False)
    stored = getattr(config, "torch_dtype", None) or getattr(config, "dtype", None) or torch.float32
    stored = getattr(torch, stored) if isinstance(stored, str) else stored
    return _skeleton(config, torch.float32), stored


def _model_of(source) -> tuple[nn.Module, torch.dtype]:
    if isinstance(source, (str, Path)):
        return skeleton_of(source)
    if hasattr(source, "checkpoint_dtype") and hasattr(source, "model"):  # a LazyCheckpoint
        return source.model, source.checkpoint_dtype
    floating = [p.dtype for p in source.parameters() if p.is_floating_point()]
    return source, floating[0] if floating else torch.float32


def check_run_memory(
    cfg: RunConfig, source: str | Path | nn.Module, *, device: torch.device | None = None,
    variants: int | None = None, eval_windows: int | None = None,
) -> RunMemory:
    """Predict the run's peak, log it with its parts, and under cfg.max_memory refuse (UserError) a
    run that cannot fit, before any weight is read. The prediction of a streamed run assumes glibc's
    mmap threshold pinned, as the CLI does for its process (`model.memory.fix_mmap_threshold`; a
    library caller may call it too). `source`: a local model folder (config.json is read, nothing
    else), a `LazyCheckpoint`, or a model (loaded or on the meta device)."""
    device = device if device is not None else resolve_device(cfg.device)
    model, stored = _model_of(source)
    shapes = model_shapes(model)
    block_path, _ = find_blocks(model)
    kwargs = dict(device=device, checkpoint_dtype=stored, variants=variants, eval_windows=eval_windows)
    memory = predict_run(cfg, shapes, **kwargs)
    memory = dataclasses.replace(memory, block_name=f"{block_path}.{memory.block}")
    log.info("memory: %s", memory.describe())
    if cfg.max_memory is not None:
        from mixbits.model.budget_fixes import enforce  # its fixes re-predict with predict_run

        enforce(cfg, shapes, memory, parse_max_memory(cfg.max_memory), kwargs)
    return memory
