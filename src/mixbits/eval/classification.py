"""Accuracy of a sequence classifier, and how much two classifiers' accuracies really differ.

    accuracy = (1/N) Σ_i [argmax_c logits_i,c = y_i]

Texts are tokenized once (`encode`: padded to the longest text, truncated at `max_length`) and
run in batches on any device; the logits come back as float32 on the CPU. Every model compared
in one experiment sees the very same token tensors and batches, so a difference in accuracy is
the models' and never the padding's.

A small test set makes accuracies coarse: one example is worth 1/N, and the binomial standard
error of an accuracy p is √(p(1−p)/N). Two models scored on the same examples are compared by
their disagreements only (McNemar): `lost` = examples the reference gets right and the other
wrong, `gained` = the reverse. Under "equally accurate" each disagreement is a fair coin, so

    p = min(1, 2 · Σ_{k ≤ min(lost, gained)} C(n, k) / 2ⁿ),    n = lost + gained,

the exact two-sided McNemar test (McNemar 1947; exact binomial form as in Dietterich 1998).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn


def encode(tokenizer, texts: Sequence[str], *, max_length: int = 128) -> dict[str, torch.Tensor]:
    """Token tensors [N, L] (input_ids, attention_mask, ...) of all texts, padded to the longest."""
    if not texts:
        raise ValueError("no texts to encode; pass at least one")
    return dict(tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt"))


@torch.no_grad()
def classifier_logits(model: nn.Module, inputs: Mapping[str, torch.Tensor], *, device: torch.device,
                      batch_size: int = 32) -> torch.Tensor:
    """[N, C] float32 logits on the CPU; `model(**batch).logits` must be [B, C]."""
    n = len(next(iter(inputs.values())))
    if any(len(v) != n for v in inputs.values()):
        raise ValueError(f"input tensors have different numbers of rows: { {k: len(v) for k, v in inputs.items()} }")
    out = []
    for start in range(0, n, batch_size):
        batch = {k: v[start:start + batch_size].to(device) for k, v in inputs.items()}
        out.append(model(**batch).logits.float().cpu())
    return torch.cat(out)


def accuracy_of(logits: torch.Tensor, labels: Sequence[int] | torch.Tensor) -> float:
    """Fraction of rows whose argmax is the label."""
    labels = torch.as_tensor(labels)
    if logits.shape[0] != labels.shape[0]:
        raise ValueError(f"{logits.shape[0]} rows of logits but {labels.shape[0]} labels")
    return float((logits.argmax(-1) == labels).float().mean())


def accuracy(model: nn.Module, tokenizer, texts: Sequence[str], labels: Sequence[int], *,
             device: torch.device | str = "cpu", batch_size: int = 32, max_length: int = 128) -> float:
    """Accuracy of a sequence classifier on labelled texts (see the module docstring)."""
    if len(texts) != len(labels):
        raise ValueError(f"{len(texts)} texts but {len(labels)} labels; give one label per text")
    inputs = encode(tokenizer, texts, max_length=max_length)
    logits = classifier_logits(model, inputs, device=torch.device(device), batch_size=batch_size)
    return accuracy_of(logits, labels)


def disagreements(reference: torch.Tensor, other: torch.Tensor, labels: Sequence[int] | torch.Tensor) -> tuple[int, int]:
    """(lost, gained): examples the reference predicts right and `other` wrong, and the reverse."""
    labels = torch.as_tensor(labels)
    ref_ok, other_ok = reference == labels, other == labels
    return int((ref_ok & ~other_ok).sum()), int((~ref_ok & other_ok).sum())


def mcnemar_p(lost: int, gained: int) -> float:
    """Exact two-sided McNemar p-value of `lost` vs `gained` disagreements (1.0 when none)."""
    n = lost + gained
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(lost, gained) + 1))
    return min(1.0, 2.0 * tail / 2.0 ** n)


def standard_error(p: float, n: int) -> float:
    """Binomial standard error √(p(1−p)/n) of an accuracy p measured on n examples."""
    if n < 1:
        raise ValueError(f"n={n}; an accuracy needs at least one example")
    return math.sqrt(max(p * (1.0 - p), 0.0) / n)
