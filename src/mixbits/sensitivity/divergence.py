"""Measured damage: how far the next-token distribution moves when ONE unit is quantized.

For every unit u and config c, the unit's linears are fake-quantized in place (everything else
untouched), the profiling windows are run, and the next-token distribution q is compared with
the original model's p at every position t (n windows of S tokens give T = n·(S−1) positions):

    KL(u, c) = (1/T) Σ_t Σ_v p_t(v) · (log p_t(v) − log q_t(v))                   (nats/token)
    JS(u, c) = (1/T) Σ_t [ ½ KL(p_t ‖ m_t) + ½ KL(q_t ‖ m_t) ],   m_t = ½ (p_t + q_t)

Damage is the KL, the same divergence `eval.perplexity` reports for a whole quantized model;
JS is bounded (≤ log 2) and symmetric, the score the earlier divergence tools ranked by. A
kept config (bits 16) has damage 0 by definition and is never run. Weights are restored bit
for bit after every measurement (`units.quantized_in_place`).

Cost: U·C forward passes over the windows (no backward), against one pass for the predicted
methods; `measure_configs` limits the configs run (the others are NaN in the table).
Memory: the original logits are computed once per window and kept, (S−1)·V float32 per
window (log-probs and divergences are then taken in float64, one window at a time); windows are processed in chunks whose cache stays under `max_cache_bytes` (each chunk
re-quantizes every unit once, which costs far less than its forward passes).

Trade-off: exact for "this unit alone at this config" on these windows, but blind to how
errors of several quantized units interact, and U·C times costlier than one gradient pass.

Source: the divergence method of the "sensitivity-aware quantizer" seed project (per-layer JS
of output distributions); KL to the original as in Hinton et al. 2015 and llama.cpp's KLD.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from mixbits.quant.spec import QuantSpec
from mixbits.sensitivity.units import measured_columns, quantized_in_place, reference_column

log = logging.getLogger(__name__)

DEFAULT_MAX_CACHE_BYTES = 2 << 30


def check_windows(windows: torch.Tensor) -> None:
    if windows.dim() != 2 or len(windows) == 0 or windows.shape[1] < 2:
        raise ValueError(f"windows has shape {tuple(windows.shape)}; pass a LongTensor [n >= 1, seqlen >= 2]")


def batches(windows: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}; use at least 1 window per forward pass")
    return list(torch.split(windows, batch_size))


@torch.no_grad()
def next_token_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Logits for the next token at every position but the last: float32 [b, S−1, V]."""
    return model(input_ids=ids).logits[:, :-1, :].float()


def exact_dtype(device: torch.device) -> torch.dtype:
    """float64 for divergences and NLL sums; MPS has no float64, so float32 there."""
    return torch.float32 if device.type == "mps" else torch.float64


def kl_js_sums(ref_logits: torch.Tensor, logits: torch.Tensor) -> tuple[float, float]:
    """Σ over positions of KL(p‖q) and JS(p, q) from logits [..., V], p from `ref_logits`.

    Done in float64 (`exact_dtype`), one window at a time: a single unit's KL can be 1e-7
    nats, below the rounding of float32 log-probs, while the float32 logits of the two runs
    differ by exactly what the quantized weights change.
    """
    kl = js = 0.0
    for a, b in zip(ref_logits.reshape(-1, *ref_logits.shape[-2:]), logits.reshape(-1, *logits.shape[-2:])):
        dtype = exact_dtype(a.device)
        logp = torch.log_softmax(a.to(dtype), dim=-1)
        logq = torch.log_softmax(b.to(dtype), dim=-1)
        p, q = logp.exp(), logq.exp()
        logm = torch.logaddexp(logp, logq) - math.log(2.0)
        kl += float((p * (logp - logq)).sum())
        js += float(0.5 * (p * (logp - logm)).sum() + 0.5 * (q * (logq - logm)).sum())
    return kl, js


def _chunks(windows: torch.Tensor, vocab: int, max_bytes: int | None) -> list[torch.Tensor]:
    per_window = 4 * (windows.shape[1] - 1) * vocab
    size = len(windows) if max_bytes is None else max(1, max_bytes // per_window)
    chunks = list(torch.split(windows, size))
    if len(chunks) > 1:
        log.info("divergence: %d chunks of %d windows keep the reference logits under %d MiB",
                 len(chunks), size, max_bytes >> 20)
    return chunks


def divergence_matrices(
    model: nn.Module,
    windows: torch.Tensor,
    units: Mapping[str, Sequence[str]],
    configs: Sequence[QuantSpec],
    *,
    device: torch.device,
    progress: bool = True,
    measure_configs: Sequence[QuantSpec] | None = None,
    batch_size: int = 8,
    max_cache_bytes: int | None = DEFAULT_MAX_CACHE_BYTES,
) -> tuple[np.ndarray, np.ndarray]:
    """(KL [U, C], JS [U, C]) in nats per predicted token; NaN for configs not measured."""
    check_windows(windows)
    cols = measured_columns(configs, measure_configs)
    kl = np.full((len(units), len(configs)), np.nan)
    js = np.full_like(kl, np.nan)
    for j in cols:
        if configs[j].keep:
            kl[:, j] = js[:, j] = 0.0
    pairs = [(u, j) for u in range(len(units)) for j in cols if not configs[j].keep]
    names = list(units.values())
    vocab = next_token_logits(model, windows[:1, :2].to(device)).shape[-1]
    chunks = _chunks(windows, vocab, max_cache_bytes)
    positions = len(windows) * (windows.shape[1] - 1)
    sums = np.zeros((len(units), len(configs), 2))
    log.info("divergence: %d units x %d configs, %d forward passes of %d windows each",
             len(units), len(cols), len(pairs), len(windows))
    bar = tqdm(total=len(chunks) * len(pairs), desc="divergence", disable=not progress, leave=False)
    for chunk in chunks:
        parts = [b.to(device) for b in batches(chunk, batch_size)]
        refs = [next_token_logits(model, ids) for ids in parts]  # once per window per chunk
        for u, j in pairs:
            with quantized_in_place(model, names[u], configs[j]):
                for ids, ref in zip(parts, refs):
                    sums[u, j] += kl_js_sums(ref, next_token_logits(model, ids))
            bar.update()
        del refs
    bar.close()
    for u, j in pairs:
        kl[u, j], js[u, j] = sums[u, j] / positions
    return kl, js


def divergence_table(
    model: nn.Module,
    windows: torch.Tensor,
    units: Mapping[str, Sequence[str]],
    configs: Sequence[QuantSpec],
    *,
    device: torch.device,
    progress: bool = True,
    measure_configs: Sequence[QuantSpec] | None = None,
    batch_size: int = 8,
    max_cache_bytes: int | None = DEFAULT_MAX_CACHE_BYTES,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Damage [U, C] = KL(original ‖ unit u quantized at c), NaN where not measured; scores
    "kl" and "js" [U] at the reference config (the first quantizing config measured).

    `units` maps a unit name to the linears quantized together (see `units.units_of`).
    """
    cols = measured_columns(configs, measure_configs)
    r = reference_column(configs, cols)
    kl, js = divergence_matrices(model, windows, units, configs, device=device, progress=progress,
                                 measure_configs=measure_configs, batch_size=batch_size,
                                 max_cache_bytes=max_cache_bytes)
    return kl, {"kl": kl[:, r].copy(), "js": js[:, r].copy()}
