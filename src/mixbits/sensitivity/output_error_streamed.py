"""The output-error table block by block (`output_error.output_error_table` without the whole model).

damage(u, c) = (1/T) tr((W − R_c) H (W − R_c)ᵀ) with H = Σ xᵀx the Gram matrix of the layer's inputs on
the calibration windows and R_c min-max round-to-nearest: exactly what the quantizer-gain pass
(`follow.streamed_quantizer_errors` with quantizer "rtn") measures, one block materialized at a time,
the original model's hidden states carried from block to block. So the streamed table is the loaded
model's table (the same Gram accumulator, the same rounding), and the peak is one block, its Gram
matrices and the calibration hidden states at one block boundary.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from mixbits.model.arch import LinearInfo
from mixbits.model.stream import BlockSource
from mixbits.quant.spec import QuantSpec
from mixbits.sensitivity.follow import streamed_quantizer_errors
from mixbits.sensitivity.output_error import reference_config

__all__ = ["streamed_output_error_table"]


def streamed_output_error_table(
    source: BlockSource, windows: torch.Tensor, linears: Mapping[str, LinearInfo], configs: Sequence[QuantSpec], *,
    device: torch.device | None = None, progress: bool = True, reference: QuantSpec | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Damage [U, C] and scores["output_error"] [U], as `output_error_table` returns them."""
    ref = reference_config(configs, reference)
    columns = list(configs) if ref in configs else [*configs, ref]
    errors, _, tokens = streamed_quantizer_errors(source, windows, dict(linears), tuple(columns), quantizer="rtn",
                                                  device=device, progress=progress)
    damage = errors / max(tokens, 1)
    return damage[:, : len(configs)], {"output_error": damage[:, columns.index(ref)]}
