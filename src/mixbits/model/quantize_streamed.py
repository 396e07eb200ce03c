"""Quantize one variant block by block and score it in the same pass, without a copy of the model.

Idea: a variant (the mixed plan, a uniform baseline) is the source model with its planned linears
replaced by quantized weights and every other tensor rounded through the storage dtype (float16,
as the native export stores it). Both changes are local to a block, so one pass over the blocks of
a `BlockSource` (a lazy checkpoint or a loaded model) does all the work of that variant:

    capture    X_0 (calibration windows) and E_0 (evaluation windows) from the embeddings
    block i    materialize; H = Σ xᵀx of its planned linears over X_i (`model.hooks`), quantize each
               linear with `quantize_layer` (rtn, clip, gptq: the whole-model path's own math),
               hand the packed tensors to the sink, then X_{i+1} = block_i(X_i), E_{i+1} = block_i(E_i)
               with the quantized weights; release
    head       perplexity, KL and top-1 of E_L against the original's kept log-probs (`eval.streamed.Scorer`)

This is `model.quantize.quantize_model` (block i calibrated on the outputs of the already quantized
blocks < i) followed by `evaluate_models`, in the same order of operations, so the same numbers;
the quantized weights live in swapped-in tensors that are dropped with the block, never written
into the source's own parameters (a loaded model is left as it was).

Resume: a block the sink reports done (`done_blocks()`) is not quantized again; its written packed
tensors are read back (`read_block`) and dequantized, and X and E pass through those weights, which
are the very weights the first run used, so the blocks after it get the same inputs and a resumed
run writes the same bytes.

Peak memory: one block's weights in the compute dtype, plus its quantized weights (one more copy of
the planned linears) and the rounded copies of its other tensors; the calibration and evaluation
hidden states at one block boundary, twice while a block runs (input and output:
2 · (n_calib + n_eval) · S · H in the compute dtype, on `store`); one block's Gram matrices (in²
float32 per distinct input, q/k/v and gate/up sharing one); outside the blocks, during capture and
the head only: embeddings, final norm and head (a lazy source holds the embedding and head rounded
in the storage dtype, 16 bits, computing in the compute dtype: model/upcast.py; a loaded model's are
rounded into copies) and one batch's logits;
the reference's kept log-probs (see `eval.streamed`).

Trade-off: every variant reads the weights once more (V variants: V passes over the checkpoint)
instead of holding V models; the Gram matrices are recomputed per variant, as the whole-model path
does. Source: the sequential loop of IST-DASLab/gptq and llm-compressor's sequential pipeline.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from mixbits.model.arch import LinearInfo, find_linears, get_bias, get_weight
from mixbits.model.blockwise import BlockInputs, block_forward, capture_block_inputs
from mixbits.model.quantize import (
    LayerQuant,
    LayerReport,
    QuantizeReport,
    block_grams,
    check_quantizer,
    params_on_cpu,
    quantize_layer,
)
from mixbits.model.stream import BlockSource, call_block
from mixbits.plan import Plan
from mixbits.quant.affine import QParams
from mixbits.quant.gptq import GPTQConfig
from mixbits.quant.packed import layer_from_state, packed_tensors
from mixbits.quant.spec import QuantSpec

log = logging.getLogger(__name__)

__all__ = ["BlockSink", "Scorer", "StreamedVariant", "dequantized_block", "quantize_streamed"]


class BlockSink(Protocol):
    """Where the packed blocks go (`export.native_shards.NativeWriter`); durable when a call returns."""

    def done_blocks(self) -> set[int]: ...

    def write_block(self, index: int, tensors: dict[str, Tensor]) -> None: ...

    def read_block(self, index: int) -> dict[str, Tensor]: ...

    def write_rest(self, tensors: dict[str, Tensor], tied: dict[str, str]) -> None: ...


class Scorer(Protocol):
    """What scores a variant's final hidden states (`eval.streamed.Scorer`, which holds the reference)."""

    windows: Tensor  # LongTensor [n, seqlen]
    batch_size: int

    def score(self, model: nn.Module, hidden, as_tuple: bool, name: str): ...


@dataclass(frozen=True, eq=False)
class StreamedVariant:
    """What one streamed pass made: the quantizer's report and the evaluation (None without a scorer)."""

    report: QuantizeReport
    evaluation: object | None  # the scorer's result (`eval.perplexity.EvalResult`)
    resumed: tuple[int, ...] = ()  # blocks read back from the sink instead of quantized


def dequantized_block(tensors: Mapping[str, Tensor], specs: Mapping[str, QuantSpec],
                      linears: Mapping[str, LinearInfo]) -> dict[str, tuple[Tensor, QParams]]:
    """(weight [out, in] float32, stored QParams or GGMLParams) of each planned linear, from a block's
    packed tensors."""
    out = {}
    for name, spec in specs.items():
        prefix, info = f"{name}.", linears[name]
        own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        layer = layer_from_state(own, spec, info.in_features, info.out_features)
        out[name] = (layer.dequantized_weight(torch.float32), layer.qparams())
    return out


def _split(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    owner, _, leaf = name.rpartition(".")
    return (model.get_submodule(owner) if owner else model), leaf


@contextlib.contextmanager
def swapped(model: nn.Module, scope: nn.Module, new: Mapping[str, Tensor]) -> Iterator[None]:
    """The tensors named in `new` (full names in `model`) replaced under `scope` for the duration,
    every alias of a tied tensor with them; the original tensor objects are put back (not copied)."""
    by_id: dict[int, Tensor] = {}
    for name, value in new.items():
        owner, leaf = _split(model, name)
        table = owner._parameters if leaf in owner._parameters else owner._buffers
        old = table[leaf]
        by_id[id(old)] = nn.Parameter(value, requires_grad=False) if isinstance(old, nn.Parameter) else value
    kept = []
    try:
        for module in scope.modules():
            for table in (module._parameters, module._buffers):
                for leaf, old in list(table.items()):
                    if old is not None and id(old) in by_id:
                        kept.append((table, leaf, old))
                        table[leaf] = by_id[id(old)]
        yield
    finally:
        for table, leaf, old in reversed(kept):
            table[leaf] = old


def rounded(model: nn.Module, names, dtype: torch.dtype | None) -> dict[str, Tensor]:
    """Each named float tensor rounded through `dtype` (as `apply.round_to_storage` does in place);
    tensors already held in `dtype` (a lazy source's `resident(hold=dtype)`) are rounded as they are."""
    if dtype is None:
        return {}
    out = {}
    for name in names:
        owner, leaf = _split(model, name)
        tensor = owner._parameters.get(leaf) if leaf in owner._parameters else owner._buffers.get(leaf)
        if tensor is not None and tensor.is_floating_point() and tensor.dtype != dtype:
            out[name] = tensor.detach().to(dtype).to(tensor.dtype)
    return out


def stored_form(model: nn.Module, names, skip: set[str]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The stored form (16-bit floats, CPU) of the named tensors not in `skip`, tied ones once, and
    the tied names left out -> the name they equal."""
    out, first, tied = {}, {}, {}
    for name in names:
        if name in skip:
            continue
        owner, leaf = _split(model, name)
        tensor = owner._parameters.get(leaf) if leaf in owner._parameters else owner._buffers.get(leaf)
        if tensor is None:
            continue
        if id(tensor) in first:
            tied[name] = first[id(tensor)]
            continue
        first[id(tensor)] = name
        value = tensor.detach().cpu()
        out[name] = (value.half() if value.is_floating_point() else value).contiguous()
    return out, tied


@dataclass
class _Pass:
    """The state one variant's pass carries from block to block."""

    source: BlockSource
    specs: dict[str, QuantSpec]
    linears: dict[str, LinearInfo]
    state: list[str]  # state-dict names of the model (what the export stores), in order
    quantizer: str
    gptq: GPTQConfig
    storage_dtype: torch.dtype | None
    true_sequential: bool
    calib: BlockInputs | None = None
    evals: BlockInputs | None = None
    as_tuple: bool = False
    tokens: int = 0

    def block_state(self, index: int) -> list[str]:
        prefix = f"{self.source.block_path}.{index}."
        return [n for n in self.state if n.startswith(prefix)]

    def outside_state(self) -> list[str]:
        prefix = f"{self.source.block_path}."
        return [n for n in self.state if not n.startswith(prefix)]


def quantize_streamed(
    source: BlockSource,
    plan: Plan,
    *,
    quantizer: str = "rtn",
    windows: Tensor | None = None,
    scorer: Scorer | None = None,
    name: str = "variant",
    sink: BlockSink | None = None,
    gptq: GPTQConfig = GPTQConfig(),
    batch_size: int = 1,
    true_sequential: bool = False,
    store: torch.device | str = "cpu",
    storage_dtype: torch.dtype | None = torch.float16,
    after_block: Callable[[int], None] | None = None,
    progress: bool = True,
) -> StreamedVariant:
    """Quantize `source` by `plan` block by block (module docstring), writing packed blocks to `sink`
    and scoring the variant on `scorer`'s windows in the same pass (the scorer must hold the
    original's reference already). Arguments as `quantize_model`; `after_block(i)` is called when
    block i is done (written, and its hidden states pushed through)."""
    check_quantizer(quantizer)
    if quantizer == "gptq" and windows is None:
        raise ValueError("quantizer='gptq' needs calibration windows (LongTensor [n, seqlen]); pass windows=")
    linears = find_linears(source.model)
    plan.validate({n: (i.out_features, i.in_features) for n, i in linears.items()})
    start, store = time.perf_counter(), torch.device(store)
    p = _Pass(source, plan.quantized(), linears, list(source.model.state_dict()), quantizer, gptq, storage_dtype,
              true_sequential)
    with source.resident(storage_dtype) as model, swapped(model, model, rounded(model, p.outside_state(), storage_dtype)):
        if windows is not None:
            p.calib = capture_block_inputs(model, windows, batch_size=batch_size, store=store, progress=False)
            p.tokens = p.calib.n_tokens
        if scorer is not None:
            p.evals = capture_block_inputs(model, scorer.windows, batch_size=scorer.batch_size, store=store,
                                           progress=False)
    done = sink.done_blocks() if sink is not None else set()
    layers, qparams, g_idx = {}, {}, {}
    for i in tqdm(range(source.n_blocks), desc=f"{quantizer} {name}", disable=not progress, leave=False):
        with source.block(i) as block:
            reports = _block(p, i, block, sink, resumed=i in done)
        for n, (report, qp, gi) in reports.items():
            layers[n], qparams[n] = report, qp
            if gi is not None:
                g_idx[n] = gi
        if after_block is not None:
            after_block(i)
    evaluation = None
    with source.resident(storage_dtype) as model, swapped(model, model, rounded(model, p.outside_state(), storage_dtype)):
        if sink is not None:
            sink.write_rest(*stored_form(model, p.outside_state(), set()))
        if scorer is not None:
            evaluation = scorer.score(model, p.evals.hidden, p.as_tuple, name)
    if g_idx:
        log.warning("%d layer(s) were quantized with act-order groups (g_idx); their QParams do not describe "
                    "them and the native export re-rounds them; use act_order=False or static_groups=True", len(g_idx))
    report = QuantizeReport(quantizer, {n: layers[n] for n in p.specs}, {n: qparams[n] for n in p.specs}, g_idx,
                            p.tokens, time.perf_counter() - start)
    return StreamedVariant(report, evaluation, tuple(sorted(done & set(range(source.n_blocks)))))


def _block(p: _Pass, i: int, block: nn.Module, sink: BlockSink | None, *, resumed: bool) -> dict:
    """Quantize (or read back) block i, write it, push the hidden states through it; its reports."""
    model = p.source.model
    names = [n for n in p.specs if p.linears[n].block == i]
    quantized = {f"{n}.weight" for n in names}
    state = p.block_state(i)
    with swapped(model, block, rounded(model, [n for n in state if n not in quantized], p.storage_dtype)):
        with contextlib.ExitStack() as stack:
            if resumed:
                made = _read_back(p, i, names, sink, stack)
            else:
                made = _quantize_block(p, block, names, stack)
                if sink is not None:
                    sink.write_block(i, _packed(p, names, made, state))
            _push(p, i, block)
    return {n: (report, params_on_cpu(lq.qparams),
                None if lq.g_idx is None else lq.g_idx.cpu()) for n, (lq, report) in made.items()}


def _put(p: _Pass, name: str, weight: Tensor, stack: contextlib.ExitStack) -> None:
    """Swap layer `name`'s weight for `weight` [out, in] (in the module's layout and dtype) until `stack` closes."""
    module = p.source.model.get_submodule(name)
    stored = weight.t() if p.linears[name].transposed else weight
    stack.enter_context(swapped(p.source.model, module, {f"{name}.weight": stored.to(module.weight.device,
                                                                                        module.weight.dtype)}))


def _quantize_block(p: _Pass, block: nn.Module, names: list[str], stack: contextlib.ExitStack) -> dict:
    """Every planned linear of the block quantized (with H over the calibration inputs when there are
    some, stage by stage with true_sequential) and swapped in; name -> (LayerQuant, LayerReport)."""
    model, device, made = p.source.model, p.source.device, {}
    if p.calib is None:
        stages = [names] if names else []
    elif names and p.true_sequential:
        stages = block_grams(model, block, names, p.calib, device, limit=1).groups()
    else:
        stages = [names] if names else []
    for stage in stages:
        grams = block_grams(model, block, stage, p.calib, device) if p.calib is not None else None
        for name in stage:
            weight = get_weight(model.get_submodule(name))
            made[name] = quantize_layer(weight, p.specs[name], p.quantizer, device,
                                        H=None if grams is None else grams.H(name), tokens=p.tokens, gptq=p.gptq)
        del grams
        for name in stage:  # after the stage's Gram matrices: later stages see these quantized
            _put(p, name, made[name][0].weight, stack)
    return made


def _read_back(p: _Pass, i: int, names: list[str], sink: BlockSink, stack: contextlib.ExitStack) -> dict:
    """A finished block's planned weights dequantized from what the sink holds, swapped in."""
    stored = dequantized_block(sink.read_block(i), {n: p.specs[n] for n in names}, p.linears)
    made = {}
    for name in names:
        weight, qp = stored[name]
        _put(p, name, weight.to(p.source.device), stack)
        made[name] = (LayerQuant(weight, qp), LayerReport(p.specs[name].label, None, None, 0.0))
    return made


def _packed(p: _Pass, names: list[str], made: dict, state: list[str]) -> dict[str, Tensor]:
    """Block tensors as stored: packed planned linears (`packed_tensors`), every other tensor in 16 bit."""
    model, tensors, skip = p.source.model, {}, set()
    for name in names:
        lq = made[name][0]
        module = model.get_submodule(name)
        tensors.update(packed_tensors(name, lq.weight, p.specs[name], lq.qparams, get_bias(module)))
        skip.update({f"{name}.weight", f"{name}.bias"})
    return tensors | stored_form(model, state, skip)[0]


@torch.no_grad()
def _push(p: _Pass, i: int, block: nn.Module) -> None:
    """The calibration and evaluation hidden states through block i, as it now is."""
    device = p.source.device
    if p.calib is not None and i < p.source.n_blocks - 1:
        p.calib = p.calib.with_hidden(block_forward(block, p.calib, device=device))
    if p.evals is not None:
        outs = []
        for h, args, kwargs in zip(p.evals.hidden, p.evals.args, p.evals.kwargs):
            out, p.as_tuple = call_block(block, h.to(device), args, kwargs)
            outs.append(out.to(h.device))
        p.evals = p.evals.with_hidden(outs)
