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
(576×1536), 0.75 s at 4096×4096, 2.2 s at 4096×11008; on 2 idle CPU cores 0.1-0.45 s at
SmolLM2-135M sizes. So SmolLM2-135M (210 linears) × 12 configs took 6.7 min on this project's
2-core CPU (shared with another job; `bench/quantizers.sh`), and a 7B model (224 linears) × 12
configs ≈ 1 h on a GPU. clip ≈ 60 fake-quantizations per layer and config (3.7 min for
SmolLM2-135M on the same CPU); rtn one. Memory: H of every linear of a chunk at once, as in
`output_error_table`. Two savings cut this for GPTQ (`quantizer_errors`), neither changing a
result: the configs share one factorisation of H and one column loop per group size
(`quant.gptq.gptq_sweep`), and `rows` measures a strided sample of output rows (below), so the
out·in² part shrinks by out/rows; the cost per layer then hardly grows with out.

The gain. Output errors are per-layer quantities: they say how much a layer's output moves,
not how much the loss cares (the block validation of `mixbits analyze` ranks blocks by output
error with Spearman 0.65, by Fisher with 0.90). So what `mixbits run` allocates with when the
quantizer is not rtn is the Fisher table scaled, per layer and config, by what the quantizer
saves over round-to-nearest on that layer's own inputs:

    gain(u, c) = tr((W − Q_c) H (W − Q_c)ᵀ) / tr((W − R_c) H (W − R_c)ᵀ),     R_c = min-max RTN,

    damage_q(u, c) = damage_fisher(u, c) · gain(u, c)                (`sensitivity.follow`).

Both traces come out of the same quantizer call (GPTQ reports its RTN error as well), so the
gain costs exactly what the output-error table of the quantizer costs.

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
from mixbits.quant.fake import storable
from mixbits.quant.affine import fake_quantize
from mixbits.quant.gptq import GPTQConfig, gptq_factor, gptq_sweep
from mixbits.quant.gram import output_error
from mixbits.quant.spec import GGMLSpec, QuantSpec
from mixbits.sensitivity.capture import collect_gram
from mixbits.sensitivity.output_error import DEFAULT_MAX_GRAM_BYTES, _chunks, reference_config

log = logging.getLogger(__name__)

SWEEP_ROWS = 4096  # most rows GPTQ stacks in one sweep (configs x layers sharing H x sampled rows)

__all__ = ["quantizer_damage", "quantizer_damage_table", "quantizer_errors", "quantizer_errors_table",
           "quantizer_gain", "sample_rows", "shared_input_errors"]


def sample_rows(out_features: int, rows: int | None) -> torch.Tensor | None:
    """Indices of `rows` output rows evenly strided over [0, out_features) (row k·out // rows, so the
    first row is always in), or None for every row: rows None or 0, or not fewer than out_features."""
    if rows is not None and (isinstance(rows, bool) or not isinstance(rows, int) or rows < 0):
        raise ValueError(f"rows={rows!r} must be a non-negative integer (0 or None: every row)")
    if not rows or rows >= out_features:
        return None
    return torch.arange(rows, dtype=torch.int64) * out_features // rows


def quantizer_errors(
    weight: torch.Tensor,
    gram: torch.Tensor,
    configs: Sequence[QuantSpec],
    *,
    quantizer: str,
    gptq: GPTQConfig = GPTQConfig(),
    rows: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(tr((W − Q_c) H (W − Q_c)ᵀ), tr((W − R_c) H (W − R_c)ᵀ)) per config c: the quantizer's output
    error and min-max RTN's, both sums over the tokens H sums; 0 for keep. weight [out, in], H [in, in].

    rows: measure only these many output rows (`sample_rows`; None or 0: all). Every quantizer here
    treats rows independently given H, so the two traces are exactly those of the full weight's
    quantization restricted to the sampled rows; their ratio (the gain) estimates the layer's.
    GPTQ's affine configs run through `quant.gptq.gptq_sweep` (what `quantize_weight`'s
    `gptq_quantize` runs, bit for bit): H factored once per layer, the column loop once per group
    size over the configs' rows stacked (at most SWEEP_ROWS rows at a time)."""
    return shared_input_errors([weight], gram, configs, quantizer=quantizer, gptq=gptq, rows=rows)[0]


def shared_input_errors(
    weights: Sequence[torch.Tensor],
    gram: torch.Tensor,
    configs: Sequence[QuantSpec],
    *,
    quantizer: str,
    gptq: GPTQConfig = GPTQConfig(),
    rows: int | None = None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """`quantizer_errors` of every weight [out_i, in] fed the same input (q/k/v, gate/up: one H),
    the same numbers; GPTQ stacks their (sampled) rows into one sweep, so the layers sharing H pay
    one column loop per group size between them."""
    check_quantizer(quantizer)
    ws = []
    for weight in weights:
        w = weight.detach().to(gram.device, torch.float32)
        idx = sample_rows(w.shape[0], rows)
        ws.append(w if idx is None else w[idx.to(w.device)])
    n_in = ws[0].shape[1]
    out = [(np.zeros(len(configs)), np.zeros(len(configs))) for _ in ws]
    swept = []  # affine configs GPTQ runs together (`quant.gptq.gptq_sweep`), the others one by one
    for j, spec in enumerate(configs):
        if not storable(spec, n_in):
            for err, rtn in out:
                err[j] = rtn[j] = np.nan  # a ggml type this row length cannot take: not measured (gain 1)
        elif spec.keep:
            continue
        elif quantizer == "gptq" and not isinstance(spec, GGMLSpec):
            swept.append(j)
        else:
            for w, (err, rtn) in zip(ws, out):
                q = quantize_weight(w, spec, quantizer, H=gram, gptq=gptq)
                err[j], rtn[j] = q.error, q.rtn_error
    if swept:
        _sweep(ws, gram, configs, swept, gptq, out)
    return out


def _sweep(ws: list[torch.Tensor], gram: torch.Tensor, configs: Sequence[QuantSpec], swept: list[int],
           gptq: GPTQConfig, out: list[tuple[np.ndarray, np.ndarray]]) -> None:
    """GPTQ's errors of configs[swept] for every weight of `ws` (one H), written into `out`."""
    factor = gptq_factor(gram, gptq, device=ws[0].device)
    stacked = ws[0] if len(ws) == 1 else torch.cat(ws)
    bounds = np.cumsum([0] + [w.shape[0] for w in ws])
    per_call = max(1, SWEEP_ROWS // stacked.shape[0])  # bounds the stacked weight: every row of a wide layer
    for start in range(0, len(swept), per_call):
        js = swept[start:start + per_call]
        results = gptq_sweep(stacked, gram, [configs[j] for j in js], gptq, factor, errors=len(ws) == 1)
        for j, res in zip(js, results):
            if len(ws) == 1:
                out[0][0][j], out[0][1][j] = res.error, res.rtn_error
                continue
            for i, w in enumerate(ws):  # each layer's traces, as gptq_sweep computes them for one weight
                out[i][0][j] = output_error(w, res.weight[bounds[i]:bounds[i + 1]], factor.H)
                out[i][1][j] = output_error(w, fake_quantize(w, configs[j]), factor.H)


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
    return quantizer_errors(weight, gram, configs, quantizer=quantizer, gptq=gptq)[0] / n_tokens


def quantizer_gain(errors: np.ndarray, rtn_errors: np.ndarray) -> np.ndarray:
    """errors / rtn_errors elementwise; 1 where RTN's error is 0 (keep, or a layer RTN stores exactly)."""
    errors, rtn_errors = np.asarray(errors, np.float64), np.asarray(rtn_errors, np.float64)
    if errors.shape != rtn_errors.shape:
        raise ValueError(f"errors {errors.shape} and rtn_errors {rtn_errors.shape} must have one shape")
    safe = np.where(rtn_errors > 0, rtn_errors, 1.0)
    return np.where(rtn_errors > 0, errors / safe, 1.0)


def quantizer_errors_table(
    model: nn.Module,
    windows: torch.Tensor,
    linears: Mapping[str, LinearInfo],
    configs: Sequence[QuantSpec],
    *,
    quantizer: str,
    device: torch.device,
    progress: bool = True,
    gptq: GPTQConfig = GPTQConfig(),
    max_gram_bytes: int | None = DEFAULT_MAX_GRAM_BYTES,
) -> tuple[np.ndarray, np.ndarray, int]:
    """(errors [U, C], rtn_errors [U, C], tokens): `quantizer_errors` of every linear, on Gram
    matrices of the original model's inputs, one forward pass per chunk of linears whose Gram
    matrices fit in `max_gram_bytes` (None: one pass)."""
    check_quantizer(quantizer)
    names = list(linears)
    row = {name: u for u, name in enumerate(names)}
    errors, rtn = np.zeros((len(names), len(configs))), np.zeros((len(names), len(configs)))
    chunks = _chunks(linears, max_gram_bytes)
    log.info("%s output errors: %d layers x %d configs, %d forward pass(es)",
             quantizer, len(names), sum(not c.keep for c in configs), len(chunks))
    n_tokens = 0
    for chunk in chunks:
        grams, n_tokens = collect_gram(model, windows, {n: linears[n] for n in chunk}, device=device, progress=progress)
        for name in tqdm(chunk, desc=f"{quantizer} errors", disable=not progress, leave=False):
            weight = get_weight(model.get_submodule(name))
            errors[row[name]], rtn[row[name]] = quantizer_errors(weight, grams[name], configs, quantizer=quantizer,
                                                                 gptq=gptq)
        del grams
    return errors, rtn, n_tokens


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
    of the score name.
    """
    ref = reference_config(configs, reference)
    columns = list(configs) if ref in configs else [*configs, ref]
    errors, _, n_tokens = quantizer_errors_table(model, windows, linears, columns, quantizer=quantizer, device=device,
                                                 progress=progress, gptq=gptq, max_gram_bytes=max_gram_bytes)
    damage = errors / max(n_tokens, 1)
    return damage[:, : len(configs)], {f"output_error_{quantizer}": damage[:, columns.index(ref)]}
