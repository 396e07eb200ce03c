"""The predicted damage of the ggml types on a sample of each layer's output rows, scaled to all of them.

Idea: the Fisher and gradient damage are sums over the output rows r of a layer [out, in],

    damage(u, c) = Σ_r d_r(c),    d_r(c) = ½ Σ_i F_ri (w_ri − q_c(w)_ri)²     (Fisher; Σ_i |ḡ_ri δ_ri| for
                                                                              the gradient)

and a ggml type quantizes each row on its own (its grid is chosen per block of a row with uniform
importance, `quant.fake.fake_quantize`), so q_c of R rows alone is q_c(w) on those rows. Measured on
R evenly strided rows S (`quantizer_damage.sample_rows`, the rows `--gain-rows` samples too) and
scaled by the layer's rows,

    damage_R(u, c) = (out / R) Σ_{r ∈ S} d_r(c),

the estimate is exact on the sampled rows, equals the full damage when R ≥ out, and is the
systematic-sample estimate of the layer's sum otherwise (bench/quality_gguf.py's `table` does the
same with `--gguf-damage-rows`).

Why only ggml types: their grid search (importance-weighted scale search per block, quant/kquant.py,
quant/iq4nl.py) costs per row and per type; on SmolLM2-135M it was most of the sensitivity stage
of a GGUF-sized run (docs/gguf.md, "Planning a run for the format"). An affine fake-quantization is
one min/max pass, cheaper than indexing the sample, so affine configs stay exact.

Trade-off: the sampled damage carries sampling noise (rows of a layer do not err alike), so two
types whose damage differs by less than that noise may swap in the plan; R = `damage_rows`
(`mixbits run --damage-rows`, `mixbits analyze --damage-rows`; 0: every row) sets the cost and the
noise, and the table records it (meta options and cache key).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import torch

from mixbits.quant.fake import fake_quantize, storable
from mixbits.quant.spec import GGMLSpec, QuantSpec
from mixbits.sensitivity.quantizer_damage import sample_rows

__all__ = ["ROW_SAMPLED", "config_deltas", "damage_row_options", "rows_of", "unmeasured"]

ROW_SAMPLED = ("fisher", "gradient")  # the methods whose ggml damage `damage_rows` samples


def unmeasured(in_features: int, configs: Sequence[QuantSpec | GGMLSpec]) -> np.ndarray:
    """A damage row before measuring: 0 everywhere (keep stays 0), NaN where a ggml type cannot split a row
    of `in_features` (not measured; allocation masks it)."""
    return np.array([0.0 if storable(spec, in_features) else np.nan for spec in configs])


def config_deltas(w: torch.Tensor, configs: Sequence[QuantSpec | GGMLSpec], rows: int | None = None
                  ) -> Iterator[tuple[int, torch.Tensor | None, torch.Tensor, float]]:
    """(j, S, δ, scale) for each quantizing config j that a row of w [out, in] can store: δ = q_j(w_S) − w_S
    on the rows S (None: every row, δ [out, in]) and the factor out / |S| that scales a sum over S to
    the layer. ggml types are measured on `sample_rows(out, rows)`; affine configs on every row."""
    idx = sample_rows(w.shape[0], rows)
    sampled = w if idx is None else w[idx.to(w.device)]
    for j, spec in enumerate(configs):
        if spec.keep or not storable(spec, w.shape[1]):
            continue
        if idx is not None and isinstance(spec, GGMLSpec):
            yield j, idx, fake_quantize(sampled, spec) - sampled, w.shape[0] / len(idx)
        else:
            yield j, None, fake_quantize(w, spec) - w, 1.0


def rows_of(stat: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    """stat [out, in] on the rows idx (all rows for None)."""
    return stat if idx is None else stat[idx.to(stat.device)]


def damage_row_options(methods: Sequence[str], configs: Sequence[QuantSpec | GGMLSpec], rows: int | None
                       ) -> dict[str, Mapping[str, object]]:
    """`cached_tables` options that sample the ggml damage of `methods` on `rows` rows: {method: {"damage_rows":
    rows}} for the methods of ROW_SAMPLED, or {} when nothing is sampled (rows 0 / None, or no ggml type among
    `configs`), so every-row and affine tables keep their cache keys and metadata."""
    if not rows or not any(isinstance(c, GGMLSpec) for c in configs):
        return {}
    return {m: {"damage_rows": rows} for m in methods if m in ROW_SAMPLED}
