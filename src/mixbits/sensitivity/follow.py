"""Damage tables that follow the quantizer: Fisher's loss weighting times the quantizer's gain.

The Fisher table (`sensitivity.fisher`) predicts the loss increase of min-max round-to-nearest:
damage_F(u, c) = ½ Σ F ⊙ (W − R_c)². When the model will be quantized by `clip` or `gptq`, the
weights that will really be stored are not R_c, and GPTQ's error is deliberately large in
weight space and small in output space (it lives where the inputs do not), so ½ΣF·(W − Q)² would
misjudge it. The output error ‖X(W − Q)ᵀ‖² judges the quantizer correctly on one layer but is
not comparable across layers (it ignores how much the loss cares about that layer's output).
Their product keeps what each gets right:

    damage_q(u, c) = damage_F(u, c) · gain_q(u, c),
    gain_q(u, c)   = tr((W − Q_c) H (W − Q_c)ᵀ) / tr((W − R_c) H (W − R_c)ᵀ),     H = XᵀX,

the fraction of RTN's output error that quantizer q leaves on layer u at config c
(`quantizer_damage.quantizer_gain`; 1 for rtn and for keep). The allocator then trades bits where
the real quantizer leaves damage: a layer GPTQ repairs well at 3 bits no longer needs 4.

Cost: one run of the quantizer per layer and config on the original model's Gram matrices,
cached like every other table. The Gram matrices are collected block by block over a
`BlockSource` (`streamed_quantizer_errors`): the calibration hidden states of the ORIGINAL model
enter block i, its linears' H = Σ xᵀx are accumulated (`model.hooks`), every linear of the block
is quantized at every config, then the states move on through the unchanged block; the same
Gram matrices as `collect_gram`'s whole-model forward, with one block materialized. Peak: one
block's weights, the calibration hidden states at one boundary (twice while the block runs),
the Gram matrices of one block (in² float32 per distinct input) and one quantizer run. The gain is
measured with every earlier layer unquantized; `quantize_model` runs GPTQ on inputs that
already carry upstream quantization noise, so the gain is the layer-alone estimate the
allocator's additive model assumes anyway.

Sampled rows (`gain_rows`, `mixbits run --gain-rows`). GPTQ, clip and RTN treat the output rows of W
independently given H (the factor of H and the column order depend on H alone; group scales and
the clip search are per row), and tr(ΔHΔᵀ) is a sum over rows; so the two traces over an evenly
strided sample of rows are exactly what the full run gives on those rows, and their ratio
estimates the layer's gain at out/rows of the O(out·in²) cost. The factor of H is computed once
per layer and shared by the configs (`quant.gptq.gptq_factor`). Measured on SmolLM2-135M in
bench/README.md ("End to end"): the time, the gains' agreement with every row, and the plans' quality.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import nn

from mixbits.config import DAMAGE_MODES
from tqdm.auto import tqdm

from mixbits.model.arch import LinearInfo, get_weight
from mixbits.model.blockwise import block_forward, capture_block_inputs
from mixbits.model.quantize import block_grams, check_quantizer
from mixbits.model.stream import BlockSource, as_source
from mixbits.quant.gptq import GPTQConfig
from mixbits.quant.spec import QuantSpec
from mixbits.sensitivity.quantizer_damage import quantizer_gain, sample_rows, shared_input_errors
from mixbits.sensitivity.table import DamageTable

__all__ = ["DAMAGE_MODES", "follow_quantizer", "gain_cache_options", "gain_table", "streamed_quantizer_errors"]


@torch.no_grad()
def streamed_quantizer_errors(
    model: nn.Module | BlockSource, windows: torch.Tensor, linears: dict[str, LinearInfo],
    configs: tuple[QuantSpec, ...], *, quantizer: str, device: torch.device | None = None,
    progress: bool = True, gptq: GPTQConfig = GPTQConfig(), store: torch.device | str = "cpu",
    rows: int | None = None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """(errors [U, C], rtn_errors [U, C], tokens) as `quantizer_damage.quantizer_errors_table` gives
    them, block by block over `model` (a loaded model, whose blocks then run on `device`, or a
    `LazyCheckpoint`); see the module docstring for the order of work and the peak. rows: output
    rows measured per layer (`quantizer_damage.sample_rows`; None or 0: all); the errors are then
    sums over those rows only."""
    check_quantizer(quantizer)
    source = as_source(model, device)
    row = {name: u for u, name in enumerate(linears)}
    errors, rtn = np.zeros((len(linears), len(configs))), np.zeros((len(linears), len(configs)))
    with source.resident() as loaded:
        inputs = capture_block_inputs(loaded, windows, batch_size=1, store=store, progress=False)
    by_block: dict[int, list[str]] = {}
    for name, info in linears.items():
        by_block.setdefault(info.block, []).append(name)
    for i in tqdm(range(source.n_blocks), desc=f"{quantizer} errors", disable=not progress, leave=False):
        with source.block(i) as block:
            names = by_block.get(i, [])
            if names:
                grams = block_grams(source.model, block, names, inputs, source.device)
                for group in _by_input(grams, names):  # q/k/v, gate/up: one H, one GPTQ sweep
                    weights = [get_weight(source.model.get_submodule(name)) for name in group]
                    found = shared_input_errors(weights, grams.H(group[0]), configs, quantizer=quantizer, gptq=gptq,
                                                rows=rows)
                    for name, (err, rt) in zip(group, found):
                        errors[row[name]], rtn[row[name]] = err, rt
                del grams
            if i < source.n_blocks - 1:
                inputs = inputs.with_hidden(block_forward(block, inputs, device=source.device))
    return errors, rtn, int(windows.numel())


def _by_input(grams, names: list[str]) -> list[list[str]]:
    """`names` grouped by the Gram matrix they share (one tensor per distinct input), in order."""
    groups: dict[int, list[str]] = {}
    for name in names:
        groups.setdefault(id(grams.H(name)), []).append(name)
    return list(groups.values())


def gain_table(model: nn.Module | BlockSource, windows: torch.Tensor, linears: dict[str, LinearInfo],
               configs: tuple[QuantSpec, ...], *, quantizer: str, device: torch.device | None = None,
               progress: bool = True, gptq: GPTQConfig = GPTQConfig(), meta: dict | None = None,
               rows: int | None = None) -> DamageTable:
    """gain_q(u, c) for every linear and config, as a DamageTable (method `gain_<quantizer>`, so the
    sensitivity cache stores it); scores hold the gain at the first quantizing config. `model`: a
    loaded model (blocks run on `device`) or a `LazyCheckpoint`; computed block by block either way.
    rows: output rows measured per layer (None or 0: all; see the module docstring); the meta's
    output errors per token are then the sampled rows' scaled by out / rows, an estimate."""
    errors, rtn, tokens = streamed_quantizer_errors(model, windows, linears, configs, quantizer=quantizer,
                                                    device=device, progress=progress, gptq=gptq, rows=rows)
    gain = quantizer_gain(errors, rtn)
    counts = [(i.out_features, i.out_features if (idx := sample_rows(i.out_features, rows)) is None else len(idx))
              for i in linears.values()]
    per_row = np.array([[out / measured] for out, measured in counts]) if counts else np.ones((0, 1))
    sampled = {"gain_rows": rows} if rows else {}
    first = next(j for j, c in enumerate(configs) if not c.keep)
    shapes = tuple((i.out_features, i.in_features) for i in linears.values())
    return DamageTable(units=tuple(linears), shapes=shapes, configs=configs, damage=gain,
                       method=f"gain_{quantizer}", scores={f"gain_{quantizer}": gain[:, first]},
                       meta={**(meta or {}), "quantizer": quantizer, "tokens": tokens, **sampled,
                             "output_error_per_token": (errors * per_row / max(tokens, 1)).tolist()})


def gain_cache_options(quantizer: str, gptq: GPTQConfig, rows: int | None) -> dict:
    """The options a cached `gain_<quantizer>` table depends on beyond model, data and configs: GPTQ's
    settings (gptq only) and the sampled rows (left out for every row, so such a table keeps its old key)."""
    options: dict = {"gptq": dataclasses.asdict(gptq)} if check_quantizer(quantizer) == "gptq" else {}
    return options | ({"gain_rows": rows} if rows else {})


def follow_quantizer(table: DamageTable, gain: DamageTable) -> DamageTable:
    """`table` (a loss-weighted damage of min-max RTN, e.g. Fisher) scaled by `gain`, with the
    quantizer recorded in its meta. Units and configs must match exactly."""
    if table.units != gain.units or table.configs != gain.configs:
        raise ValueError("the gain table's units or configs differ from the damage table's; compute both on the "
                         "same model and candidate configs")
    if np.any(~np.isfinite(gain.damage)) or np.any(gain.damage < 0):
        raise ValueError(f"{gain.method}: gains must be finite and >= 0")
    quantizer = str(gain.meta.get("quantizer", gain.method.removeprefix("gain_")))
    scores = dict(table.scores) | dict(gain.scores)
    meta = dict(table.meta) | {
        "quantizer": quantizer,
        "damage_rule": f"{table.method} damage of min-max RTN x gain_{quantizer} (output error of {quantizer} / "
                       "output error of RTN, per layer and config)",
    }
    return DamageTable(units=table.units, shapes=table.shapes, configs=table.configs,
                       damage=table.damage * gain.damage, method=table.method, scores=scores, meta=meta)
