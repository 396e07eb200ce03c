"""Peak memory of a streamed stage, predicted from shapes before anything is loaded.

Idea: a streamed stage goes through phases (capture, the block loop, the head, a backward loop) and
in each phase holds a known set of tensors whose sizes follow from the model's shapes and the
calibration settings. The prediction is the largest phase total:

    peak = max_phase Σ_part bytes(part)

with, for N windows of S tokens, hidden size H, vocabulary V, L blocks, compute dtype of b bytes:

    block weights      the largest block's parameters · b   (the whole model when not streamed)
    outside weights    embeddings, final norm, head · b      (only during capture and the head; a lazy
                       checkpoint holds embedding and head in 16 bits: `held` bytes each, one chunk cast)
    boundary           N · S · H · b  hidden states at one block boundary
    logits             batch · S · V · 4 · k  one batch's logits in float32 and the k temporaries the
                       head makes from them (k = 3 for the loss and its gradient, 4 for log-softmax + KL)
    block activations  one window through the largest block: S · Σ_linears (in + out) · b with grad
                       (what the backward keeps), S · Σ_linears out · b without (the temporaries),
                       plus heads · S² · b for one attention matrix
    Hessians           Σ_linears in² · 4 for the largest block (GPTQ's float32 Gram matrices)
    quantizer          5 · 4 · the largest linear's size: fake-quantizing it in float32 (the variant's
                       override in evaluation, the damage table after the Fisher)

What it covers: tensors the stage allocates (weights, hidden states, gradients, logits, Fisher
and Hessian accumulators, the reference's summary for evaluation). What it does not: the Python
interpreter and libraries (about 0.5–1 GB resident for torch + transformers), the allocator's
fragmentation, the page cache of memory-mapped shards, and tensors the caller holds (the windows).
Tests check it against the peak of live tensor bytes that torch's profiler records on the CPU.

The allocator matters as much as the count: glibc's malloc raises its mmap threshold each time a
large block is freed, after which large tensors come from the heap and freed ones are kept, so a
block loop's resident peak drifts upward with depth (a random 16-block Llama, hidden 512: 815 MiB
instead of 692 MiB, and 200–325 MiB still held after the run; `mixbits run` on bench/memory.py's
0.6b checkpoint: 2.34 GiB instead of 1.40 GiB, the excess growing variant after variant).
`fix_mmap_threshold()` pins the threshold so every tensor over the threshold is its own mapping,
returned to the system when freed; fresh pages fault in, which costs wall time (measured by
bench/memory.py beside the peak). The CLI pins it at `MMAP_THRESHOLD` for its own process
(cli/common.py); a library never changes it behind its caller's back.

Trade-off: a closed-form count is cheap and runs before any tensor is read, so a run can refuse
with the figure and the fix; it is an estimate of activations (kernels may keep more or less
than the count above), so it is checked on the tiny models and states its parts for a reader.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType

import torch
from torch import nn

from mixbits.model.arch import find_blocks, find_linears
from mixbits.model.upcast import CHUNK_BYTES, held_names

__all__ = ["MemoryPrediction", "ModelShapes", "activation_bytes", "block_linear_params", "fix_mmap_threshold",
           "model_shapes", "peak_of", "predict_evaluation", "predict_fisher", "predict_gptq", "weight_bytes"]

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MMAP_THRESHOLD = 1 << 20  # what the CLI pins: tensors over 1 MiB are their own mappings


@dataclass(frozen=True)
class ModelShapes:
    """What the predictions need, read from parameter shapes only (works on a meta skeleton)."""

    hidden: int
    vocab: int
    heads: int
    block_params: tuple[int, ...]  # parameters per block
    outside_params: int  # parameters outside the blocks, tied tensors once
    block_linears: tuple[tuple[tuple[int, int], ...], ...]  # (out, in) of each linear, per block
    held_params: int = 0  # of outside_params: the embedding and head weights a lazy checkpoint holds in 16 bits

    @property
    def n_blocks(self) -> int:
        return len(self.block_params)

    @property
    def total_params(self) -> int:
        return sum(self.block_params) + self.outside_params


def model_shapes(model: nn.Module) -> ModelShapes:
    """The shapes of `model` (loaded, or the meta skeleton of a `LazyCheckpoint`)."""
    _, blocks = find_blocks(model)
    inside = {id(p) for p in blocks.parameters()}
    outside = sum(p.numel() for p in model.parameters() if id(p) not in inside)
    linears: list[list[tuple[int, int]]] = [[] for _ in blocks]
    for info in find_linears(model).values():
        linears[info.block].append((info.out_features, info.in_features))
    config = model.config
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None) or 1
    return ModelShapes(
        hidden=model.get_input_embeddings().weight.shape[1],
        vocab=model.get_output_embeddings().weight.shape[0],
        heads=int(heads),
        block_params=tuple(sum(p.numel() for p in b.parameters()) for b in blocks),
        outside_params=outside,
        block_linears=tuple(tuple(x) for x in linears),
        held_params=sum(p.numel() for n, p in model.named_parameters() if n in set(held_names(model))),
    )


@dataclass(frozen=True)
class MemoryPrediction:
    """The peak phase of a stage and its parts in bytes."""

    stage: str
    phase: str
    parts: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))
    phases: MappingProxyType = field(default_factory=lambda: MappingProxyType({}), compare=False)  # every phase's parts

    def phase_parts(self, phase: str) -> MappingProxyType:
        """The parts of one phase (the peak phase's are `parts`)."""
        return self.phases.get(phase, self.parts if phase == self.phase else MappingProxyType({}))

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def describe(self) -> str:
        parts = ", ".join(f"{name} {_gib(size)}" for name, size in self.parts.items() if size)
        return f"{self.stage}: predicted peak {_gib(self.total)} during {self.phase} ({parts})"


def _gib(size: int) -> str:
    return f"{size / 2**30:.2f} GiB" if size >= 2**28 else f"{size / 2**20:.1f} MiB"


def peak_of(stage: str, phases: dict[str, dict[str, int]]) -> MemoryPrediction:
    """A stage's prediction from its phases' parts: the phase with the largest total is the peak."""
    phase = max(phases, key=lambda p: sum(phases[p].values()))
    return MemoryPrediction(stage, phase, MappingProxyType(dict(phases[phase])),
                            MappingProxyType({p: MappingProxyType(dict(v)) for p, v in phases.items()}))


def activation_bytes(shapes: ModelShapes, seqlen: int, size: int, *, grad: bool) -> int:
    """One window through the largest block: with grad, every linear's input and output and one
    attention matrix kept for the backward; without, the linear outputs and one attention matrix."""
    io = max((sum((i if grad else 0) + o for o, i in block) for block in shapes.block_linears), default=0)
    return seqlen * io * size + shapes.heads * seqlen * seqlen * size


def block_linear_params(shapes: ModelShapes) -> int:
    """Weights of the linears of the largest block."""
    return max((sum(o * i for o, i in block) for block in shapes.block_linears), default=0)


def _quantizer_temporaries(shapes: ModelShapes) -> int:
    """Fake-quantizing the largest linear in float32: its copy, scales, codes, error (~5 copies)."""
    return 5 * 4 * max((o * i for block in shapes.block_linears for o, i in block), default=0)


def weight_bytes(shapes: ModelShapes, size: int, streamed: bool, held: int | None = None) -> tuple[int, int]:
    """(bytes held while a block works, bytes held during capture / head); `held`: bytes per value of the
    embedding and head weights when streamed (model/upcast.py; default `size`), plus one chunk of the
    head cast to the compute dtype when they are held narrower."""
    if not streamed:
        return shapes.total_params * size, 0
    held = size if held is None else held
    chunk = min(CHUNK_BYTES, shapes.vocab * shapes.hidden * size) if held < size else 0
    outside = (shapes.outside_params - shapes.held_params) * size + shapes.held_params * held + chunk
    return max(shapes.block_params) * size, outside


def predict_fisher(
    shapes: ModelShapes, *, windows: int, seqlen: int, dtype: torch.dtype = torch.float32,
    streamed: bool = True, offload: bool = False, held: int | None = None,
) -> MemoryPrediction:
    """`sensitivity/fisher_streamed.py`: the inputs of every block kept (on disk with `offload`),
    X_L, the output gradients G and, per block, one window's graph and the block's Fisher."""
    b = dtype.itemsize
    block, outside = weight_bytes(shapes, b, streamed, held)
    model = block if not streamed else 0
    boundary = windows * seqlen * shapes.hidden * b
    saved = 0 if offload else shapes.n_blocks * boundary
    return peak_of("fisher", {
        "capture": {"outside weights": outside, "whole model": model, "boundaries": boundary},
        "block forward": {"block weights": block, "boundaries": saved + (3 if offload else 1) * boundary,
                          "block temporaries": activation_bytes(shapes, seqlen, b, grad=False)},
        "head": {"outside weights": outside, "whole model": model, "boundaries": saved + boundary,
                 "gradients": boundary, "logits": seqlen * shapes.vocab * 4 * 3},
        "block backward": {"block weights": block, "boundaries": saved or boundary, "gradients": 2 * boundary,
                           "block activations": activation_bytes(shapes, seqlen, b, grad=True),
                           "weight gradients + Fisher": block_linear_params(shapes) * (b + 4)},
        "damage table": {"block weights": block, "boundaries": saved or boundary, "gradients": boundary,
                         "Fisher": block_linear_params(shapes) * 4, "quantizer temporaries": _quantizer_temporaries(shapes)},
    })


def predict_evaluation(
    shapes: ModelShapes, *, windows: int, seqlen: int, dtype: torch.dtype = torch.float32,
    batch_size: int = 1, topk: int | str | None = None, streamed: bool = True, held: int | None = None,
) -> MemoryPrediction:
    """`eval/streamed.py` with the reference's full log-probs (topk None), its final hidden states
    (topk "hidden") or its top-k: the captured block-0 inputs stay (every variant starts from them),
    plus one variant's current boundaries."""
    b = dtype.itemsize
    block, outside = weight_bytes(shapes, b, streamed, held)
    boundary = windows * seqlen * shapes.hidden * b
    positions = windows * (seqlen - 1)
    if topk is None:
        summary = positions * shapes.vocab * 4
    elif topk == "hidden":
        summary = boundary
    else:
        summary = positions * (12 * topk + 12)
    return peak_of("evaluation", {
        "blocks": {"block weights": block, "overridden linears": block_linear_params(shapes) * b,
                   "quantizer temporaries": _quantizer_temporaries(shapes),
                   "boundaries": 3 * boundary, "reference summary": summary,
                   "block temporaries": batch_size * activation_bytes(shapes, seqlen, b, grad=False)},
        "head": {"outside weights": outside, "whole model": 0 if streamed else block, "boundaries": 2 * boundary,
                 "logits": batch_size * seqlen * shapes.vocab * 4 * 4, "reference summary": summary},
    })


def predict_gptq(
    shapes: ModelShapes, *, windows: int, seqlen: int, dtype: torch.dtype = torch.float32, streamed: bool = True, held: int | None = None,
) -> MemoryPrediction:
    """A block-wise GPTQ pass: one block, its linears' float32 Hessians, two boundaries, and GPTQ's
    working set for the largest linear (the inverse Hessian factor and float32 copies of W, Q, E).
    Hessians are counted one per linear; linears that share an input share one Gram matrix in
    `quant/` (q/k/v, gate/up), so this bounds them from above. Checked against the measured peak of
    `model.quantize_streamed` (with its evaluation) in tests/model/test_budget.py."""
    b = dtype.itemsize
    block, outside = weight_bytes(shapes, b, streamed, held)
    boundary = windows * seqlen * shapes.hidden * b
    hessians = max((sum(4 * i * i for _, i in blk) for blk in shapes.block_linears), default=0)
    largest = max(((o, i) for blk in shapes.block_linears for o, i in blk), key=lambda s: s[0] * s[1], default=(0, 0))
    return peak_of("gptq", {
        "capture": {"outside weights": outside, "whole model": 0 if streamed else block, "boundaries": boundary},
        "block": {"block weights": block, "Hessians": hessians, "boundaries": 2 * boundary,
                  "GPTQ working set": 4 * (2 * largest[1] ** 2 + 3 * largest[0] * largest[1]),
                  "block temporaries": activation_bytes(shapes, seqlen, b, grad=False)},
    })


def fix_mmap_threshold(nbytes: int = 64 * 1024) -> bool:
    """Pin glibc's mmap threshold at `nbytes` for this process (see the module docstring); returns
    False where the C library is not glibc (nothing is changed there)."""
    import ctypes
    import ctypes.util

    if not isinstance(nbytes, int) or not 0 < nbytes <= 32 * 2**20:
        raise ValueError(f"nbytes={nbytes!r}: use a positive number of bytes up to 32 MiB (glibc's maximum)")
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return False
    if libc is None or not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, nbytes))
