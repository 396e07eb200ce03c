"""Measured damage by ablation: quantize ONE unit, measure the task metric, restore.

Language models: the increase in perplexity on the profiling windows, in the convention of
`eval.perplexity` (each window scored on its own, T = n·(S−1) predicted tokens),

    ΔPPL(u, c) = exp(NLL_{u,c} / T) − exp(NLL / T),    NLL = Σ_t −log p(x_{t+1} | x_≤t),

with NLL_{u,c} the same sum when unit u alone is fake-quantized at config c. Sequence
classifiers (BERT, DistilBERT): the drop in accuracy (fraction of examples, original minus
quantized), the per-layer experiment of the DistilBERT SST-2 seed project.

A kept config (bits 16) has damage 0 by definition and is never run; `measure_configs` limits
the configs run (the others are NaN). Weights are restored bit for bit after every
measurement (`units.quantized_in_place`).

Trade-off: this is the ground truth the predicted methods approximate — for one unit at a
time, on these windows. It costs U·C forward passes, is noisy when the windows are few (a
ΔPPL can even be slightly negative), and, as any one-at-a-time measure, ignores interactions.

Source: layer-wise ablation as in Dettmers et al. 2022 (LLM.int8() outlier study) and the
seed projects' per-layer sensitivity experiments.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from mixbits.eval.classification import accuracy_of, classifier_logits
from mixbits.quant.spec import QuantSpec
from mixbits.sensitivity.divergence import batches, check_windows, exact_dtype, next_token_logits
from mixbits.sensitivity.units import measured_columns, quantized_in_place, reference_column

log = logging.getLogger(__name__)


@torch.no_grad()
def total_nll(model: nn.Module, windows: torch.Tensor, *, device: torch.device, batch_size: int = 8) -> float:
    """Σ over windows and positions of −log p(next token), nats.

    −log p = logsumexp(logits) − logit[target], in float64 window by window: one unit's ΔNLL
    can be far below the rounding of float32 log-probs.
    """
    total = 0.0
    for ids in batches(windows, batch_size):
        ids = ids.to(device)
        for logits, target in zip(next_token_logits(model, ids), ids[:, 1:]):
            logits = logits.to(exact_dtype(logits.device))
            total += float((torch.logsumexp(logits, -1) - logits.gather(-1, target[:, None])[:, 0]).sum())
    return total


@torch.no_grad()
def accuracy(model: nn.Module, inputs: Mapping[str, torch.Tensor], labels: torch.Tensor, *,
             device: torch.device, batch_size: int = 32) -> float:
    """Fraction of examples whose argmax logit equals the label; `inputs` are [N, L] tensors."""
    return accuracy_of(classifier_logits(model, inputs, device=device, batch_size=batch_size), labels.cpu())


def _sweep(model, units, configs, measure_configs, metric, progress: bool, desc: str) -> np.ndarray:
    """metric() with each unit quantized at each measured config; NaN where not measured, keep = 0."""
    cols = measured_columns(configs, measure_configs)
    out = np.full((len(units), len(configs)), np.nan)
    names = list(units.values())
    pairs = [(u, j) for u in range(len(units)) for j in cols]
    for u, j in tqdm(pairs, desc=desc, disable=not progress, leave=False):
        if configs[j].keep:
            out[u, j] = 0.0
            continue
        with quantized_in_place(model, names[u], configs[j]):
            out[u, j] = metric()
    return out


def ablation_table(
    model: nn.Module,
    windows: torch.Tensor,
    units: Mapping[str, Sequence[str]],
    configs: Sequence[QuantSpec],
    *,
    device: torch.device,
    progress: bool = True,
    measure_configs: Sequence[QuantSpec] | None = None,
    batch_size: int = 8,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Damage [U, C] = ΔPPL when unit u alone is quantized at c (NaN where not measured);
    scores "delta_ppl" and "delta_nll" (nats/token) [U] at the reference config."""
    check_windows(windows)
    cols = measured_columns(configs, measure_configs)
    r = reference_column(configs, cols)
    tokens = len(windows) * (windows.shape[1] - 1)
    base = total_nll(model, windows, device=device, batch_size=batch_size) / tokens
    log.info("ablation: base perplexity %.4f on %d tokens; %d units x %d configs", math.exp(base), tokens,
             len(units), len(cols))
    nll = _sweep(model, units, configs, measure_configs,
                 lambda: total_nll(model, windows, device=device, batch_size=batch_size) / tokens,
                 progress, "ablation")
    nll[:, [j for j in cols if configs[j].keep]] = base
    damage = np.exp(nll) - math.exp(base)
    return damage, {"delta_ppl": damage[:, r].copy(), "delta_nll": nll[:, r] - base}


def classifier_ablation(
    model: nn.Module,
    inputs: Mapping[str, torch.Tensor],
    labels: torch.Tensor,
    units: Mapping[str, Sequence[str]],
    configs: Sequence[QuantSpec],
    *,
    device: torch.device,
    progress: bool = True,
    measure_configs: Sequence[QuantSpec] | None = None,
    batch_size: int = 32,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Damage [U, C] = accuracy(original) − accuracy(unit u quantized at c), as fractions;
    scores "accuracy_drop" and "accuracy" (of the quantized model) [U] at the reference config.

    `inputs`: keyword tensors of the classifier, each [N, L] (input_ids, attention_mask, ...);
    `labels`: [N] class indices.
    """
    n = len(labels)
    if n == 0 or any(len(v) != n for v in inputs.values()):
        raise ValueError(f"labels has {n} rows and inputs {({k: len(v) for k, v in inputs.items()})}; "
                         "pass the same number (>= 1) of examples in each")
    cols = measured_columns(configs, measure_configs)
    r = reference_column(configs, cols)
    base = accuracy(model, inputs, labels, device=device, batch_size=batch_size)
    log.info("classifier ablation: base accuracy %.4f on %d examples", base, n)
    acc = _sweep(model, units, configs, measure_configs,
                 lambda: accuracy(model, inputs, labels, device=device, batch_size=batch_size),
                 progress, "classifier ablation")
    acc[:, [j for j in cols if configs[j].keep]] = base
    damage = base - acc
    return damage, {"accuracy_drop": damage[:, r].copy(), "accuracy": acc[:, r].copy()}
