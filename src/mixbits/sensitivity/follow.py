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

Cost: one run of the quantizer per layer and config on the original model's Gram matrices
(`quantizer_damage.quantizer_errors_table`), cached like every other table. The gain is
measured with every earlier layer unquantized; `quantize_model` runs GPTQ on inputs that
already carry upstream quantization noise, so the gain is the layer-alone estimate the
allocator's additive model assumes anyway.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from mixbits.config import DAMAGE_MODES
from mixbits.model.arch import LinearInfo
from mixbits.quant.gptq import GPTQConfig
from mixbits.quant.spec import QuantSpec
from mixbits.sensitivity.quantizer_damage import quantizer_errors_table, quantizer_gain
from mixbits.sensitivity.table import DamageTable

__all__ = ["DAMAGE_MODES", "follow_quantizer", "gain_table"]


def gain_table(model: nn.Module, windows: torch.Tensor, linears: dict[str, LinearInfo],
               configs: tuple[QuantSpec, ...], *, quantizer: str, device: torch.device, progress: bool = True,
               gptq: GPTQConfig = GPTQConfig(), meta: dict | None = None) -> DamageTable:
    """gain_q(u, c) for every linear and config, as a DamageTable (method `gain_<quantizer>`, so the
    sensitivity cache stores it); scores hold the gain at the first quantizing config."""
    errors, rtn, tokens = quantizer_errors_table(model, windows, linears, configs, quantizer=quantizer,
                                                 device=device, progress=progress, gptq=gptq)
    gain = quantizer_gain(errors, rtn)
    first = next(j for j, c in enumerate(configs) if not c.keep)
    shapes = tuple((i.out_features, i.in_features) for i in linears.values())
    return DamageTable(units=tuple(linears), shapes=shapes, configs=configs, damage=gain,
                       method=f"gain_{quantizer}", scores={f"gain_{quantizer}": gain[:, first]},
                       meta={**(meta or {}), "quantizer": quantizer, "tokens": tokens,
                             "output_error_per_token": (errors / max(tokens, 1)).tolist()})


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
