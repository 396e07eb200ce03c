import numpy as np
import pytest
import torch

import mixbits.sensitivity.methods as methods_mod
from mixbits.model.arch import find_linears
from mixbits.quant.spec import KEEP, QuantSpec
from mixbits.sensitivity.divergence import divergence_table
from mixbits.sensitivity.methods import METHODS, compute_tables, primary_score
from mixbits.sensitivity.units import BlockDamageTable, block_units, to_block_table
from tests.conftest import tiny_llama

CPU = torch.device("cpu")
W2, W4 = QuantSpec(2, 64), QuantSpec(4, 64)
CONFIGS = (W2, W4, KEEP)


def windows(n=2):
    return torch.randint(0, 256, (n, 12), generator=torch.Generator().manual_seed(0))


def test_registry_is_data():
    assert METHODS["fisher"].needs_gradients and METHODS["fisher"].kind == "predicted"
    assert METHODS["divergence"].kind == "measured" and not METHODS["ablation"].needs_gradients


def test_fisher_and_gradient_share_one_pass_and_meta_is_recorded(monkeypatch):
    calls = []
    real = methods_mod.gradient_fisher_tables
    monkeypatch.setattr(methods_mod, "gradient_fisher_tables", lambda *a, **k: calls.append(1) or real(*a, **k))
    model, wins = tiny_llama(), windows()
    linears = find_linears(model)
    tables = compute_tables(["gradient", "fisher", "output_error"], model, wins, linears, CONFIGS, device=CPU, progress=False)
    assert calls == [1] and list(tables) == ["gradient", "fisher", "output_error"]
    for name, t in tables.items():
        assert t.method == name and t.units == tuple(linears) and t.meta["quantizer"] == "rtn"
        assert t.meta["granularity"] == "layer" and t.meta["configs_measured"] == ["w2g64", "w4g64", "fp16"]
        assert t.meta["seconds"] > 0 and primary_score(t) in t.scores
    assert tables["fisher"].meta["shared_pass_with"] == "gradient"


def test_block_granularity_sums_predicted_and_measures_blocks_together():
    model, wins = tiny_llama(), windows(1)
    linears = find_linears(model)
    layer = compute_tables(["fisher"], model, wins, linears, CONFIGS, device=CPU, progress=False)["fisher"]
    tables = compute_tables(["fisher", "divergence"], model, wins, linears, CONFIGS, granularity="block",
                            device=CPU, progress=False, measure_configs=[W2])
    blocks = block_units(linears)
    for t in tables.values():
        assert isinstance(t, BlockDamageTable) and t.units == tuple(blocks) and t.meta["granularity"] == "block"
    np.testing.assert_allclose(tables["fisher"].damage, to_block_table(layer, linears).damage, rtol=1e-6)
    direct, _ = divergence_table(model, wins, blocks, CONFIGS, device=CPU, progress=False, measure_configs=[W2])
    np.testing.assert_array_equal(tables["divergence"].damage, direct)
    assert tables["divergence"].meta["configs_measured"] == ["w2g64"]


def test_bad_inputs_are_refused_before_compute():
    model = tiny_llama()
    linears = find_linears(model)
    with pytest.raises(ValueError, match="fishr"):
        compute_tables(["fishr"], model, windows(), linears, CONFIGS, device=CPU)
    with pytest.raises(ValueError, match="granularity"):
        compute_tables(["fisher"], model, windows(), linears, CONFIGS, granularity="row", device=CPU)
    with pytest.raises(ValueError, match="hessian"):
        compute_tables(["fisher"], model, windows(), linears, CONFIGS, device=CPU, options={"hessian": {"probes": 2}})
