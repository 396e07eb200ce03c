"""Output error of each linear under quantization: the GPTQ / EXL2 view of damage.

Idea: what a quantized linear gets wrong is its output, not its weights. With X [T, in] the
inputs the layer sees on T calibration tokens and Δ = W − Q [out, in] the weight error,

    damage(u, c) = (1/T) ‖X Δᵀ‖²_F = (1/T) tr(Δ H Δᵀ),        H = XᵀX = Σ_tokens xᵀx,

the mean over tokens of the squared output error. H is gathered once per linear in one
forward pass (`capture.collect_gram`); every config then costs one fake-quantization and one
[out, in]·[in, in] product, no further passes.

Trade-off: it measures each layer's own output error, blind to how much the rest of the
network amplifies or forgets it (the loss-based methods in `fisher.py`, `hessian.py` and
`gradient.py` see that), so damages of layers at different depths are in different units of
"loss". It needs no labels and no backward pass. Memory: H holds in² float32 values per
linear (64 MiB at in = 4096, 484 MiB at 11008); `max_gram_bytes` splits the linears into
chunks, one forward pass per chunk, so that the matrices held at once stay under it.

Source: Frantar et al. 2022 (GPTQ), whose layer objective ‖WX − QX‖² has Hessian 2XᵀX;
turboderp's ExLlamaV2 measures per-layer output error the same way to pick bit widths.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from mixbits.model.arch import LinearInfo, get_weight
from mixbits.quant.fake import fake_quantize, storable
from mixbits.quant.spec import QuantSpec
from mixbits.sensitivity.capture import collect_gram

log = logging.getLogger(__name__)

DEFAULT_MAX_GRAM_BYTES = 8 << 30


def output_damage(weight: torch.Tensor, gram: torch.Tensor, n_tokens: int, configs: Sequence[QuantSpec]) -> np.ndarray:
    """tr((W − Q_c) H (W − Q_c)ᵀ) / T for every config c; weight [out, in], gram H [in, in] float32."""
    if n_tokens <= 0:
        raise ValueError(f"n_tokens={n_tokens}; the Gram matrix must sum at least one token")
    w = weight.detach().to(gram.device, torch.float32)
    out = np.zeros(len(configs))
    for j, spec in enumerate(configs):
        if spec.keep:
            continue
        if not storable(spec, w.shape[1]):
            out[j] = np.nan  # a ggml type this row length cannot take
            continue
        delta = fake_quantize(w, spec) - w
        out[j] = float(((delta @ gram) * delta).sum()) / n_tokens
    return out


def reference_config(configs: Sequence[QuantSpec], reference: QuantSpec | None = None) -> QuantSpec:
    """The config whose damage is the scalar score: `reference`, else the first quantizing config."""
    if reference is not None:
        if reference.keep:
            raise ValueError(
                f"reference={reference.label} keeps the layer, so every score would be 0; pick a quantizing spec"
            )
        return reference
    for spec in configs:
        if not spec.keep:
            return spec
    raise ValueError(f"configs {[c.label for c in configs]} hold no quantizing spec; pass reference=QuantSpec(...)")


def _chunks(linears: Mapping[str, LinearInfo], max_bytes: int | None) -> list[list[str]]:
    """Linears in model order, split so each chunk's Gram matrices fit in max_bytes (None: one chunk)."""
    if max_bytes is None:
        return [list(linears)]
    chunks: list[list[str]] = [[]]
    used = 0
    for name, info in linears.items():
        size = 4 * info.in_features**2
        if chunks[-1] and used + size > max_bytes:
            chunks.append([])
            used = 0
        chunks[-1].append(name)
        used += size
    return chunks


def output_error_table(
    model: nn.Module,
    windows: torch.Tensor,
    linears: Mapping[str, LinearInfo],
    configs: Sequence[QuantSpec],
    *,
    device: torch.device,
    progress: bool = True,
    reference: QuantSpec | None = None,
    max_gram_bytes: int | None = DEFAULT_MAX_GRAM_BYTES,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Damage [U, C] (mean squared output error per token) and scores["output_error"] [U].

    The score is each unit's damage at `reference` (default: the first quantizing config).
    One forward pass when every Gram matrix fits in `max_gram_bytes` (None: no limit), else
    one per chunk of linears.
    """
    ref = reference_config(configs, reference)
    names = list(linears)
    row = {name: u for u, name in enumerate(names)}
    damage = np.zeros((len(names), len(configs)))
    score = np.zeros(len(names))
    chunks = _chunks(linears, max_gram_bytes)
    if len(chunks) > 1:
        log.info("output error: %d forward passes to keep Gram matrices under %d MiB",
                 len(chunks), max_gram_bytes >> 20)
    for chunk in chunks:
        grams, n_tokens = collect_gram(model, windows, {n: linears[n] for n in chunk}, device=device, progress=progress)
        for name in tqdm(chunk, desc="damage table", disable=not progress, leave=False):
            weight = get_weight(model.get_submodule(name))
            damage[row[name]] = output_damage(weight, grams[name], n_tokens, configs)
            if ref in configs:
                score[row[name]] = damage[row[name], list(configs).index(ref)]
            else:
                score[row[name]] = output_damage(weight, grams[name], n_tokens, (ref,))[0]
        del grams
    return damage, {"output_error": score}
