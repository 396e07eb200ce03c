"""quant.kquant's candidate-batched grid search gives, bit for bit, the grid of the loop it replaced
(tests/quant/kquant_reference.py, kept verbatim): the same fp16 d and dmin (compared as bit patterns,
so even the sign of a zero counts), the same sub-block scale and min codes, hence the same codes."""

from __future__ import annotations

import pytest
import torch

from mixbits.quant import kquant
from mixbits.quant.spec import GGML_TYPES
from tests.quant import kquant_reference as reference

TYPES = [s for s in GGML_TYPES.values() if not s.levels]  # the uniform grids the loop searched (IQ4_NL: quant/iq4nl.py)


def _weights(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Gaussian rows of varied scale, with the cases a search can trip on: a zero block, a block of one
    repeated value, -0.0, an outlier, all-negative and all-positive sub-blocks, subnormal-sized values."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * torch.exp(torch.randn(rows, 1, generator=g))
    w[0, :32] = 0.0
    w[0, 32:64] = 0.37
    w[1, :16] = -0.0
    w[1, 40] = 25.0
    w[2, :32] = -w[2, :32].abs()
    w[2, 32:64] = w[2, 32:64].abs()
    w[3, :64] *= 1e-6
    return w


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32) if t.dtype == torch.float32 else t


def _assert_same(p, q):
    for field in ("d", "dmin", "sc", "mn"):
        a, b = getattr(p, field), getattr(q, field)
        assert a.dtype == b.dtype and torch.equal(_bits(a), _bits(b)), field


@pytest.mark.parametrize("spec", TYPES, ids=lambda s: s.name)
@pytest.mark.parametrize("with_importance", [False, True], ids=["uniform", "importance"])
def test_grid_is_the_reference_grid_bit_for_bit(spec, with_importance):
    cols = 512
    w = _weights(12, cols, seed=TYPES.index(spec))
    imp = None
    if with_importance:
        imp = torch.exp(2 * torch.randn(cols, generator=torch.Generator().manual_seed(5)))
        imp[:40] = 0.0  # dead inputs: only the floor in choose_params weighs them
    new, old = kquant.choose_params(w, spec, imp), reference.choose_params(w, spec, imp)
    _assert_same(new, old)
    assert torch.equal(kquant.quantize(w, new), kquant.quantize(w, old))
    assert torch.equal(kquant.fake_quantize(w, spec, imp).view(torch.int32),
                       kquant.dequantize(kquant.quantize(w, old), old).view(torch.int32))


@pytest.mark.parametrize("name", ["Q4_K", "Q6_K", "Q5_1"])
@pytest.mark.parametrize("knob", ["_CHUNK", "_GROUP"])
def test_chunks_and_candidate_groups_do_not_change_the_grid(name, knob, monkeypatch):
    """Memory is bounded by cutting the rows into chunks and step 1's candidates into groups; neither
    cut may matter (1: one row per chunk, one candidate per group)."""
    spec = GGML_TYPES[name]
    w = _weights(7, 256, seed=11)
    whole = kquant.choose_params(w, spec)
    assert len(kquant._groups(list(range(48)), w.reshape(7, -1, 32))) == 1  # the default: one group here
    monkeypatch.setattr(kquant, knob, 1)
    _assert_same(kquant.choose_params(w, spec), whole)
    _assert_same(reference.choose_params(w, spec), whole)
