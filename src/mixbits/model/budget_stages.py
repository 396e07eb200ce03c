"""Will `mixbits analyze` or `mixbits export` fit? Their peaks predicted before any weight is read.

Same composition as `budget.predict_run` (`mixbits run`): a stage's peak is its largest phase, the
command's peak the largest stage plus what the process holds throughout (the runtime, the read buffer):

    peak(analyze) = max_method peak(method) + runtime + read buffer
    peak(export)  = max_part  peak(part)    + export runtime

    analyze, streamed (jobs/analyze.py; the whole-model path, --validate or a measured method, is not
    predicted here)
      fisher, gradient   one backward pass block by block (`memory.predict_fisher`), as run's Fisher stage
      output_error       the rtn quantizer's error per layer x config on the calibration boundaries:
                         one block, its Gram matrices, two boundaries (`memory.predict_gptq`, an upper
                         bound: rtn keeps no GPTQ working set)
      hessian            `sensitivity/hessian_streamed.py`, reverse mode over forward mode, block by
                         block: the boundaries X_i of the N windows and their tangents Ẋ_i of the N·probes
                         samples at every block (on disk with --offload-dir), one window's jvp through one
                         block forward (twice a forward's temporaries) and its vjp backward (`_vjp_of_jvp`:
                         8x a training step's linear activations, 12 attention matrices), the block's
                         probes v and products Hv, G and Ġ at one boundary, the head's double backward
                         on one window's logits
    export (export/streamed.py, gptq.write_gptq_from, gguf.write_gguf_from), one part at a time from the
    run's native folder (`StoredPart`: the bytes each part's stored tensors take, from the headers)
      a block            its stored tensors read (safetensors maps them: their pages, once, as they are
                         touched); every planned layer rebuilt (`from_native.stored_source`): uint8
                         codes, float32 W_hat and float32 scales and zero-points (at most two per 16
                         weights, K-quants' sub-blocks); dequantizing the largest layer (three float32
                         copies); the block converted to the format (at most 8 bits and one fp16 scale
                         per 32 weights: 1.0625 bytes a weight)
      outside the blocks the embeddings, or the final norm and head, as stored (fp16, mapped)
    export runtime       python, torch, transformers, gguf, the tokenizer: 0.47 GiB measured for
                         `mixbits export` on bench/memory.py's tiny size, counted as 490 MiB

Trade-off as in `budget`: closed form and cheap, checked against the live tensor bytes torch's profiler
records on tiny models (tests/model/test_budget.py) and against the resident peaks bench/memory.py
measures on checkpoints of 0.2-2.2 B parameters.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from types import MappingProxyType

import torch

from mixbits.devices import compute_torch_dtype
from mixbits.model.budget import RUNTIME_BYTES, RunMemory, renamed
from mixbits.model.memory import (
    MemoryPrediction,
    ModelShapes,
    activation_bytes,
    block_linear_params,
    peak_of,
    weight_bytes,
    predict_fisher,
    predict_gptq,
)

__all__ = ["EXPORT_RUNTIME_BYTES", "StoredPart", "predict_analyze", "predict_export", "predict_hessian"]

EXPORT_RUNTIME_BYTES = 490 * 2**20  # `mixbits export` of a tiny model with a 49152-token tokenizer: 0.47 GiB
_GENERATOR_STATE = 5056  # bytes of one saved CPU generator state (hessian_streamed._Probes)
_HEAD_TEMPORARIES = 6  # one window's float32 logits and what a double backward of the loss keeps of them
_CONVERTED_PER_WEIGHT = 1.0625  # an exported weight: at most 8 bits and one fp16 scale per 32 weights
_ATTENTION_MATRICES = 12  # heads x S x S tensors the Hessian's vjp of a jvp keeps for one window (`_vjp_of_jvp`)
_LINEAR_IO = 8  # S x (in + out) tensors per linear it keeps, in units of a training step's
_QPARAMS_PER_WEIGHT = 0.5  # float32 scale and zero-point (or a K-quant's d, dmin, sc, mn) per 16 weights


def _vjp_of_jvp(shapes: ModelShapes, seqlen: int, size: int) -> int:
    """One window's vjp of a jvp through the largest block: the primals, tangents and cotangents of every
    op between the linears (norms, rotary, residuals, activations): 8x a training step's linear inputs and
    outputs, and 12 attention-sized matrices (scores, mask, softmax and their tangents and cotangents).
    Counted at the profiler's peak on a tiny Llama (hidden 64, 64-256 tokens): 128 hidden-sized tensors
    per window (8 x the linears' in + out) and 11-12 attention matrices; the two are added here, though
    their peaks need not coincide (an over-estimate of up to 1.4x measured at 256 tokens)."""
    io = max((sum(i + o for o, i in block) for block in shapes.block_linears), default=0)
    return _LINEAR_IO * seqlen * io * size + _ATTENTION_MATRICES * shapes.heads * seqlen * seqlen * size


def predict_hessian(shapes: ModelShapes, *, windows: int, seqlen: int, probes: int = 1,
                    dtype: torch.dtype = torch.float32, offload: bool = False,
                    held: int | None = None) -> MemoryPrediction:
    """`sensitivity/hessian_streamed.py`'s peak (module docstring): per block boundary the N windows'
    hidden states and the N·probes samples' tangents, kept for every block unless `offload`."""
    b = dtype.itemsize
    block, outside = weight_bytes(shapes, b, True, held)
    boundary = windows * seqlen * shapes.hidden * b
    pair = (1 + probes) * boundary  # X and Ẋ at one boundary
    saved = 0 if offload else shapes.n_blocks * pair
    probes_v = block_linear_params(shapes) * b  # one sample's v for the block's linears
    states = windows * probes * shapes.n_blocks * _GENERATOR_STATE
    return peak_of("hessian", {
        "capture": {"outside weights": outside, "boundaries": boundary, "probe generator states": states},
        "block forward": {"block weights": block, "boundaries": saved + (3 if offload else 2) * pair,
                          "probes v": probes_v, "probe generator states": states,
                          "jvp temporaries": 2 * activation_bytes(shapes, seqlen, b, grad=False)},
        "head": {"outside weights": outside, "boundaries": saved + pair, "gradients G, Ġ": pair,
                 "logits and double backward": _HEAD_TEMPORARIES * seqlen * shapes.vocab * 4,
                 "probe generator states": states},
        "block backward": {"block weights": block, "boundaries": saved or pair, "gradients G, Ġ": 2 * pair,
                           "vjp of jvp graph": _vjp_of_jvp(shapes, seqlen, b),
                           "probes v, Hv": 2 * probes_v, "probe generator states": states},
    })


def predict_analyze(
    methods: Sequence[str], shapes: ModelShapes, *, windows: int, seqlen: int, device: torch.device,
    checkpoint_dtype: torch.dtype = torch.float32, compute_dtype: str | None = None, offload: bool = False,
    probes: int = 1,
) -> RunMemory:
    """`mixbits analyze` streamed (jobs/analyze.py): one stage per method family asked for (fisher and
    gradient share one pass), plus what the process holds; dtype as `predict_run` picks it."""
    dtype = compute_torch_dtype(compute_dtype) or (checkpoint_dtype if device.type == "cuda" else torch.float32)
    stored = min(dtype.itemsize, checkpoint_dtype.itemsize if checkpoint_dtype.is_floating_point else 4)
    common = dict(windows=windows, seqlen=seqlen, dtype=dtype, held=stored)
    stages = []
    if {"fisher", "gradient"} & set(methods):
        stages.append(predict_fisher(shapes, offload=offload, **common))
    if "output_error" in methods:
        stages.append(renamed(predict_gptq(shapes, **common), "output error"))
    if "hessian" in methods:
        stages.append(predict_hessian(shapes, probes=probes, offload=offload, **common))
    if not stages:
        raise ValueError(f"methods {list(methods)}: none is streamed (fisher, gradient, output_error, hessian)")
    largest_tensor = max([shapes.vocab * shapes.hidden] + [o * i for blk in shapes.block_linears for o, i in blk])
    held = {"runtime": RUNTIME_BYTES, "read buffer": largest_tensor * checkpoint_dtype.itemsize}
    block = max(range(shapes.n_blocks), key=lambda i: shapes.block_params[i]) if shapes.n_blocks else 0
    budget_device = "cpu" if device.type == "cpu" else f"cuda:{device.index or 0}"
    return RunMemory(budget_device, dtype, tuple(stages), MappingProxyType(held), block,
                     shapes.block_params[block] * dtype.itemsize if shapes.n_blocks else 0)


@dataclass(frozen=True)
class StoredPart:
    """One part an export reads in turn (a block, or the tensors before / after the blocks)."""

    index: int | None  # the block, None outside the blocks
    stored_bytes: int  # its tensors as the native folder stores them (packed codes, fp16 scales, plain fp16)
    planned_weights: int = 0  # weights of its quantized layers (out x in summed)
    largest_planned: int = 0  # out x in of its largest quantized layer


def _export_part(part: StoredPart) -> dict[str, int]:
    read = {"stored tensors (mapped pages)": part.stored_bytes}
    if part.index is None:
        return read
    return read | {
        "codes (uint8) and W_hat (float32)": 5 * part.planned_weights,
        "scales and zero-points (float32)": int(_QPARAMS_PER_WEIGHT * part.planned_weights),
        "dequantization temporaries": 3 * 4 * part.largest_planned,
        "converted block": int(_CONVERTED_PER_WEIGHT * part.planned_weights)}


def predict_export(parts: Sequence[StoredPart], fmt: str) -> RunMemory:
    """`mixbits export --format fmt` streamed from a run's native folder (module docstring)."""
    phases = {_phase(p, n): _export_part(p) for n, p in enumerate(parts)}
    if not phases:
        raise ValueError("the native folder holds no tensors to export")
    stage = peak_of(f"export {fmt}", phases)
    blocks = [p for p in parts if p.index is not None]  # the block whose phase is the largest
    largest = max(blocks, key=lambda p: sum(_export_part(p).values()), default=StoredPart(0, 0))
    return RunMemory("cpu", torch.float32, (stage,), MappingProxyType({"runtime": EXPORT_RUNTIME_BYTES}),
                     largest.index, largest.stored_bytes)


def _phase(part: StoredPart, n: int) -> str:
    if part.index is not None:
        return f"block {part.index}"
    return "capture (embeddings)" if n == 0 else f"head (final norm, head; part {n})"
