"""Perplexity, KL and top-1 of any number of variants, block by block, without a copy of the model.

Idea: a variant (original, mixed plan, uniform baseline) differs from the original only in the
weights of the linears inside the blocks, so it is the original model plus a per-linear weight
override applied while a block is materialized. The evaluation windows enter block 0 once
(embeddings are shared), then each variant in turn pushes them through the blocks one at a time
and through the model's own head, window batch by window batch. The reference (the original)
goes first and leaves behind, per scored position t, a summary of its next-token distribution;
each later variant is scored against that summary:

    nll  = mean_t −log q(x_t | x_<t)                      ppl = exp(nll)
    KL   = mean_t Σ_v p(v) (log p(v) − log q(v))         (p: reference, q: variant; nats/token)
    top1 = mean_t [argmax p = argmax q]

The summary is one of three, all exact except the last:
- the reference's full log-probabilities (`topk=None`; KL exact, as `evaluate_models` computes it);
- the reference's final hidden states X_L (`topk="hidden"`): its log-probabilities are recomputed
  from them by the head, batch by batch, when each variant is scored. The head is the same for every
  variant (only block linears are quantized), so this is the same arithmetic on the same inputs: KL
  and top-1 are exact, at n · S · H floats instead of n · S · V (V/H = 85 for SmolLM2, 31 for
  Llama-2-7B), for one more head pass per variant;
- the top-k log-probabilities with the rest of the vocabulary merged into one outcome (`topk=k`),
  only when asked for:

    KL_k = Σ_{v∈top-k} p(v) (log p(v) − log q(v)) + r_p (log r_p − log r_q),   r = 1 − Σ_{top-k} mass

KL_k ≤ KL (merging outcomes never raises a KL divergence: the log-sum inequality), equal when the
top-k hold all of the reference's mass; what it misses is the divergence inside the merged tail,
which is small when the reference is peaked. Top-1 is exact either way (the argmax is kept).

Peak memory: one block's weights (plus the overridden copies of its linears), the hidden states of
all windows at one block boundary, twice (input and output: 2 · n · S · H in the compute dtype),
one batch's logits [batch, S, V] in float32 with their log-softmax, and the reference's summary:
n · (S−1) · V · 4 bytes in full, n · (S−1) · (12k + 12) bytes as top-k (values, indices, argmax,
and the tail mass r_p, summed directly rather than as 1 − Σ top-k, which would cancel to rounding
noise); as hidden states, n · S · H in the compute dtype. `topk="auto"` keeps the full log-probabilities
when they take at most 256 MiB, else the hidden states: KL is exact either way, never silently a bound.

Trade-off: each variant reads every block once (V variants: V passes over the weights) instead of
holding V models; the reference is run once and never stored whole when the vocabulary is large.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from mixbits.eval.perplexity import EvalResult, NonFiniteResult
from mixbits.model.arch import LinearInfo, find_linears, get_weight
from mixbits.model.blockwise import BlockInputs, capture_block_inputs
from mixbits.model.stream import BlockSource, as_source, call_block, head_forward

__all__ = ["AUTO_FULL_BYTES", "HIDDEN", "Scorer", "Variant", "WeightOverride", "evaluate_streamed", "overridden",
           "score_reference"]

WeightOverride = Callable[[str, torch.Tensor], "torch.Tensor | None"]
"""(linear name, weight [out, in]) -> the variant's weight [out, in], or None to keep the original."""

AUTO_FULL_BYTES = 256 * 2**20
HIDDEN = "hidden"  # keep the reference's final hidden states; its log-probs are recomputed when scoring


@dataclass(frozen=True)
class Variant:
    """A named variant of the source model: `override` gives its linears' weights (None: the original)."""

    name: str
    override: WeightOverride | None = None


@contextlib.contextmanager
def overridden(model: nn.Module, linears: Sequence[LinearInfo], override: WeightOverride | None) -> Iterator[None]:
    """The linears' weights replaced by `override`'s for the duration; the original tensors are put
    back (not copied: the original parameter objects are kept aside)."""
    kept = []
    try:
        for info in linears if override is not None else ():
            module = model.get_submodule(info.name)
            original = module.weight
            new = override(info.name, get_weight(module).detach())
            if new is None:
                continue
            if tuple(new.shape) != (info.out_features, info.in_features):
                raise ValueError(f"override for {info.name} returned shape {tuple(new.shape)}; expected "
                                 f"[{info.out_features}, {info.in_features}] ([out, in])")
            stored = (new.t() if info.transposed else new).to(original.device, original.dtype).contiguous()
            kept.append((module, original))
            module._parameters["weight"] = nn.Parameter(stored, requires_grad=False)
        yield
    finally:
        for module, original in reversed(kept):
            module._parameters["weight"] = original


@torch.no_grad()
def _through_blocks(source: BlockSource, inputs: BlockInputs, by_block, override, store, progress, desc):
    hidden, as_tuple = inputs.hidden, False
    for i in tqdm(range(source.n_blocks), desc=desc, disable=not progress, leave=False):
        with source.block(i), overridden(source.model, by_block.get(i, ()), override):
            outs = []
            for h, args, kwargs in zip(hidden, inputs.args, inputs.kwargs):
                out, as_tuple = call_block(source.model.get_submodule(f"{source.block_path}.{i}"),
                                           h.to(source.device), args, kwargs)
                outs.append(out.to(store))
        hidden = tuple(outs)
    return hidden, as_tuple


def _tail_mass(logp: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Probability outside `indices`, summed directly (1 − Σ top-k would cancel to rounding noise)."""
    return logp.exp().scatter(-1, indices, 0.0).sum(-1)


def _tail_kl(r_p: torch.Tensor, r_q: torch.Tensor) -> torch.Tensor:
    """Σ_t r_p (log r_p − log r_q): the merged tail as one outcome (0 where r_p = 0)."""
    r_q = r_q.clamp_min(torch.finfo(torch.float32).tiny)
    return (torch.xlogy(r_p, r_p) - torch.xlogy(r_p, r_q)).sum()


class _Scores:
    """Running sums for one variant, and (for the reference) the kept summary per batch."""

    def __init__(self):
        self.nll, self.kl, self.agree, self.summary = 0.0, 0.0, 0, []

    def add(self, logp: torch.Tensor, target: torch.Tensor, ref, topk: int | None) -> None:
        self.nll += float(-logp.gather(-1, target.unsqueeze(-1)).sum())
        if ref is None:
            return
        if topk is None:
            self.kl += float((ref.exp() * (ref - logp)).sum())
            self.agree += int((ref.argmax(-1) == logp.argmax(-1)).sum())
            return
        values, indices, argmax, r_p = ref
        logq = logp.gather(-1, indices)
        self.kl += float((values.exp() * (values - logq)).sum() + _tail_kl(r_p, _tail_mass(logp, indices)))
        self.agree += int((argmax == logp.argmax(-1)).sum())

    def keep(self, logp: torch.Tensor, hidden: torch.Tensor, topk: int | str | None, store) -> None:
        if topk == HIDDEN:
            self.summary.append(hidden.to(store))
        elif topk is None:
            self.summary.append(logp.to(store))
        else:
            values, indices = logp.topk(topk, dim=-1)
            kept = (values, indices, logp.argmax(-1), _tail_mass(logp, indices))
            self.summary.append(tuple(t.to(store) for t in kept))


def resolve_topk(topk, n_positions: int, vocab: int) -> int | str | None:
    """The summary kept of the reference: None (full log-probs), "hidden", or an integer k (top-k)."""
    if topk == "auto":
        return None if n_positions * vocab * 4 <= AUTO_FULL_BYTES else HIDDEN
    if topk is not None and topk != HIDDEN and not (isinstance(topk, int) and 1 <= topk <= vocab):
        raise ValueError(f"topk={topk!r}: use None (full log-probabilities), 'hidden' (final hidden states), "
                         f"'auto', or an integer in 1..{vocab} (top-k: KL becomes a lower bound)")
    return topk


def evaluate_streamed(
    model: nn.Module | BlockSource,
    windows: torch.Tensor,
    variants: Sequence[Variant],
    *,
    device: torch.device | str | None = None,
    reference: str | None = None,
    topk: int | str | None = "auto",
    batch_size: int = 1,
    store: torch.device | str = "cpu",
    progress: bool = True,
) -> dict[str, EvalResult]:
    """Score every variant on `windows` [n, seqlen] as `evaluate_models` does; KL and top-1 are against
    the variant named `reference`. `model`: a loaded model (blocks run on `device`) or a `LazyCheckpoint`.
    `topk`: None keeps the reference's full log-probabilities, "hidden" its final hidden states (both
    exact), an integer its top-k (KL_k, a lower bound), "auto" one of the exact two (module docstring)."""
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise ValueError(f"variant names must be unique; got {names}")
    if reference is not None and reference not in names:
        raise ValueError(f"reference {reference!r} is not one of the variants {names}")
    source, store = as_source(model, device), torch.device(store)
    linears = find_linears(source.model)
    by_block: dict[int, list[LinearInfo]] = {}
    for info in linears.values():
        by_block.setdefault(info.block, []).append(info)
    with source.resident() as loaded:
        inputs = capture_block_inputs(loaded, windows, batch_size=batch_size, store=store, progress=False)
    scorer = Scorer(windows, topk=topk, batch_size=batch_size, store=store, device=source.device,
                    with_reference=reference is not None)
    ordered = sorted(variants, key=lambda v: v.name != reference)  # the reference first
    results: dict[str, EvalResult] = {}
    for variant in ordered:
        hidden, as_tuple = _through_blocks(source, inputs, by_block, variant.override, store, progress,
                                           f"evaluate {variant.name}")
        with source.resident() as loaded:
            results[variant.name] = scorer.score(loaded, hidden, as_tuple, variant.name,
                                                 reference=variant.name == reference)
        del hidden
    return {v.name: results[v.name] for v in variants}


def score_reference(source: BlockSource, scorer: "Scorer", *, name: str = "original",
                    store: torch.device | str = "cpu", progress: bool = True) -> EvalResult:
    """Push the scorer's windows through the unchanged `source` and score them as the reference (kept in
    `scorer` for the variants scored after it). Peak: as `evaluate_streamed` for one variant."""
    with source.resident() as loaded:
        inputs = capture_block_inputs(loaded, scorer.windows, batch_size=scorer.batch_size, store=store,
                                      progress=False)
    hidden, as_tuple = _through_blocks(source, inputs, {}, None, torch.device(store), progress, f"evaluate {name}")
    del inputs
    with source.resident() as loaded:
        return scorer.score(loaded, hidden, as_tuple, name, reference=True)


class Scorer:
    """Perplexity, KL and top-1 of final hidden states X_L, one variant after another.

    The reference variant is scored first (`reference=True`): its summary (full log-probabilities or
    top-k, see the module docstring) stays in the scorer, and every later variant is scored against
    it. This is what lets a caller push a variant through its blocks in its own pass (e.g. while the
    variant is being quantized, `model.quantize_streamed`) and score it at the end. Memory: the
    reference's summary (module docstring) plus one batch's logits while scoring.
    """

    def __init__(self, windows: torch.Tensor, *, topk: int | str | None = "auto", batch_size: int = 1,
                 store: torch.device | str = "cpu", device: torch.device | str, with_reference: bool = True):
        self.windows, self.batch_size, self.with_reference = windows, batch_size, with_reference
        n, seqlen = windows.shape
        self.settings = _Settings(topk, n * (seqlen - 1), torch.device(store), torch.device(device))
        self.reference: _Scores | None = None

    def score(self, model: nn.Module, hidden: Sequence[torch.Tensor], as_tuple: bool, name: str, *,
              reference: bool = False) -> EvalResult:
        """Score one variant whose windows left the last block as `hidden` (one tensor per batch of
        `batch_size` windows); `model` has everything outside the blocks materialized (its head)."""
        if self.with_reference and not reference and self.reference is None:
            raise ValueError(f"{name!r} is scored before the reference; score the reference first")
        score, keep = _Scores(), reference and self.with_reference
        against = (score if keep else self.reference) if self.with_reference else None
        for b, h in enumerate(hidden):
            ids = self.windows[b * self.batch_size : (b + 1) * self.batch_size]
            _score_batch(model, h, ids, as_tuple, score, against, b, keep, self.settings)
            _check_finite(name, score, b)
        if keep:
            self.reference = score
        n, seqlen = self.windows.shape
        return _result(score, n * (seqlen - 1), n, seqlen, self.with_reference)


def _check_finite(name: str, score: _Scores, batch: int) -> None:
    if math.isnan(score.nll) or math.isnan(score.kl):
        what = "NLL" if math.isnan(score.nll) else "KL to the reference"
        raise NonFiniteResult(
            f"evaluation of {name!r} gave NaN {what} at window batch {batch}: its logits hold NaN, so its "
            "perplexity, KL and top-1 agreement would be meaningless. The quantized weights of this variant "
            "(or the original model) are broken")


@dataclass(frozen=True)
class _Settings:
    topk: int | str | None  # as requested
    positions: int  # scored positions over all windows
    store: torch.device
    device: torch.device


@torch.no_grad()
def _score_batch(model: nn.Module, hidden: torch.Tensor, ids: torch.Tensor, as_tuple: bool, score: _Scores,
                 reference: _Scores | None, b: int, is_reference: bool, settings: _Settings) -> None:
    """Score batch b of one variant (its own frame holds the logits, so they die with it)."""
    ids = ids.to(settings.device)
    logits = head_forward(model, hidden.to(settings.device), ids, as_tuple=as_tuple).logits[:, :-1]
    logp = F.log_softmax(logits.float(), dim=-1)
    del logits
    topk = resolve_topk(settings.topk, settings.positions, logp.shape[-1])
    if is_reference:
        score.keep(logp, hidden, topk, settings.store)
    kept = None if reference is None else reference.summary[b]
    if kept is not None:
        kept = kept.to(settings.device) if isinstance(kept, torch.Tensor) else tuple(t.to(settings.device) for t in kept)
    if topk == HIDDEN and kept is not None:  # the reference's log-probs, recomputed by the same head
        kept = F.log_softmax(head_forward(model, kept, ids, as_tuple=as_tuple).logits[:, :-1].float(), dim=-1)
    score.add(logp, ids[:, 1:], kept, None if topk == HIDDEN else topk)


def _result(score: _Scores, count: int, n: int, seqlen: int, with_reference: bool) -> EvalResult:
    mean = score.nll / count
    ppl = math.exp(mean) if mean < 709.0 else math.inf  # exp overflows a double beyond ~709.78
    return EvalResult(ppl=ppl, nll=mean, kl=score.kl / count if with_reference else None,
                      top1=score.agree / count if with_reference else None, tokens=count, windows=n, seqlen=seqlen)
