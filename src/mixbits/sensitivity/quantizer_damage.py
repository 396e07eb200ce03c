"""Output-error damage tables that follow the quantizer actually used (rtn, clip or gptq).

Idea: `output_error.py` scores a config by the output error of round-to-nearest, but if the
model will be quantized by GPTQ or a clip search, the allocator should weigh what *that*
quantizer leaves behind: GPTQ at 3 bits often errs like RTN at 4, and not equally on every
layer. With H = XᵀX the Gram matrix of the layer's calibration inputs (T tokens) and Q_c the
weight the quantizer returns at config c,

    damage(u, c) = (1/T) tr((W − Q_c) H (W − Q_c)ᵀ),        damage(u, keep) = 0,

the mean squared output error per token, in the units of `output_error_table` (for rtn the
two tables are equal). The quantizer is `model.quantize.quantize_weight`, the very function
`quantize_model` calls: rtn (min-max), clip (search weighted by diag H, the imatrix) or gptq
(whose `GPTQResult.error` is this trace, at no extra cost).

Approximation: H is collected from the ORIGINAL model in one forward pass (`collect_gram`),
whereas `quantize_model` quantizes block i on the outputs of the already quantized blocks
< i; the inputs differ slightly, by the upstream quantization noise, so the table scores each
layer as if it were quantized alone, which is also what the allocator assumes.

Cost: one run of the quantizer per layer and config. GPTQ is O(in³ + out·in²) with a Python
loop over columns; measured per layer at 3 bits: on an H100 ~0.1 s (576×576) to 0.3 s
(576×1536), 0.75 s at 4096×4096, 2.2 s at 4096×11008; on 2 CPU cores 1-6 s at SmolLM2-135M
sizes. So SmolLM2-135M (210 linears) × 12 configs ≈ 5 min on a GPU but ~1.5 h on a small
CPU, and a 7B model (224 linears) × 12 configs ≈ 1 h on a GPU. clip ≈ 60 fake-quantizations
per layer and config; rtn one. Memory: H of every linear of a chunk at once, as in
`output_error_table`.

Source: Frantar et al. 2022 (GPTQ); ExLlamaV2 measures the quantizer's own error per layer
and bit width the same way to choose its mix.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from mixbits.model.arch import LinearInfo, get_weight
from mixbits.model.quantize import check_quantizer, quantize_weight
from mixbits.quant.gptq import GPTQConfig
from mixbits.quant.spec import QuantSpec
from mixbits.sensitivity.capture import collect_gram
from mixbits.sensitivity.output_error import DEFAULT_MAX_GRAM_BYTES, _chunks, reference_config

log = logging.getLogger(__name__)

__all__ = ["quantizer_damage", "quantizer_damage_table"]


def quantizer_damage(
    weight: torch.Tensor,
    gram: torch.Tensor,
    n_tokens: int,
    configs: Sequence[QuantSpec],
    *,
    quantizer: str,
    gptq: GPTQConfig = GPTQConfig(),
) -> np.ndarray:
    """tr((W − Q_c) H (W − Q_c)ᵀ) / T per config c, Q_c from `quantizer`; weight [out, in], gram H [in, in]."""
    check_quantizer(quantizer)
    if n_tokens <= 0:
        raise ValueError(f"n_tokens={n_tokens}; the Gram matrix must sum at least one token")
    w = weight.detach().to(gram.device, torch.float32)
    out = np.zeros(len(configs))
    for j, spec in enumerate(configs):
        if not spec.keep:
            out[j] = quantize_weight(w, spec, quantizer, H=gram, gptq=gptq).error / n_tokens
    return out


def quantizer_damage_table(
    model: nn.Module,
    windows: torch.Tensor,
    linears: Mapping[str, LinearInfo],
    configs: Sequence[QuantSpec],
    *,
    quantizer: str,
    device: torch.device,
    progress: bool = True,
    gptq: GPTQConfig = GPTQConfig(),
    reference: QuantSpec | None = None,
    max_gram_bytes: int | None = DEFAULT_MAX_GRAM_BYTES,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Damage [U, C] (output error per token of `quantizer`) and scores.

    scores[f"output_error_{quantizer}"] [U] is each unit's damage at `reference` (default: the
    first quantizing config). Record `quantizer` in the DamageTable meta; it is also the suffix
    of the score name. One forward pass per chunk of linears whose Gram matrices fit in
    `max_gram_bytes` (None: one pass).
    """
    check_quantizer(quantizer)
    ref = reference_config(configs, reference)
    columns = list(configs) if ref in configs else [*configs, ref]
    names = list(linears)
    row = {name: u for u, name in enumerate(names)}
    damage = np.zeros((len(names), len(configs)))
    score = np.zeros(len(names))
    chunks = _chunks(linears, max_gram_bytes)
    log.info("%s damage table: %d layers x %d configs, %d forward pass(es)",
             quantizer, len(names), sum(not c.keep for c in configs), len(chunks))
    for chunk in chunks:
        grams, n_tokens = collect_gram(model, windows, {n: linears[n] for n in chunk}, device=device, progress=progress)
        for name in tqdm(chunk, desc=f"{quantizer} damage", disable=not progress, leave=False):
            weight = get_weight(model.get_submodule(name))
            values = quantizer_damage(weight, grams[name], n_tokens, columns, quantizer=quantizer, gptq=gptq)
            damage[row[name]] = values[: len(configs)]
            score[row[name]] = values[columns.index(ref)]
        del grams
    return damage, {f"output_error_{quantizer}": score}
