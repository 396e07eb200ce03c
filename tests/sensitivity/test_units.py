import numpy as np
import pytest
import torch

from mixbits.model.arch import find_linears
from mixbits.quant.cost import layer_storage_bytes
from mixbits.quant.spec import KEEP, QuantSpec
from mixbits.sensitivity.table import DamageTable
from mixbits.sensitivity.units import (
    BlockDamageTable, as_block_table, block_units, expand_specs, quantized_in_place, to_block_table, units_of,
)
from tests.conftest import tiny_gpt2, tiny_llama

CONFIGS = (QuantSpec(2, 64), QuantSpec(4, None), KEEP)


def layer_table(linears, seed=0):
    rng = np.random.default_rng(seed)
    damage = rng.random((len(linears), len(CONFIGS)))
    damage[:, -1] = 0
    return DamageTable(tuple(linears), tuple((i.out_features, i.in_features) for i in linears.values()), CONFIGS,
                       damage, "fisher", {"fisher_trace": rng.random(len(linears)),
                                          "hessian_trace": rng.random(len(linears))}, {"granularity": "layer"})


@pytest.mark.parametrize("build, path", [(tiny_llama, "model.layers"), (tiny_gpt2, "transformer.h")])
def test_block_units_group_linears_by_block(build, path):
    linears = find_linears(build())
    units = block_units(linears)
    assert list(units) == [f"{path}.0", f"{path}.1"]
    assert sum(len(v) for v in units.values()) == len(linears)
    assert all(n.startswith(b + ".") for b, names in units.items() for n in names)
    assert units_of(linears, "layer") == {n: (n,) for n in linears}
    with pytest.raises(ValueError, match="granularity"):
        units_of(linears, "row")


def test_block_table_sums_damage_and_costs_like_its_members(tmp_path):
    linears = find_linears(tiny_llama())
    table = layer_table(linears)
    blocks = to_block_table(table, linears)
    units = block_units(linears)
    index = table.index()
    for b, names in enumerate(units.values()):
        rows = [index[n] for n in names]
        np.testing.assert_allclose(blocks.damage[b], table.damage[rows].sum(0))
        np.testing.assert_allclose(blocks.cost_bits()[b], table.cost_bits()[rows].sum(0))
        assert blocks.numels()[b] == table.numels()[rows].sum()
        assert blocks.scores["fisher_trace"][b] == pytest.approx(table.scores["fisher_trace"][rows].sum())
        mean = (table.scores["hessian_trace"][rows] * table.numels()[rows]).sum() / table.numels()[rows].sum()
        assert blocks.scores["hessian_trace"][b] == pytest.approx(mean)
    # per-channel overhead: a flat [1, numel] shape would cost one scale per block
    bits = [8 * sum(layer_storage_bytes(linears[n].out_features, linears[n].in_features, CONFIGS[1]) for n in names)
            for names in units.values()]
    np.testing.assert_allclose(blocks.cost_bits()[:, 1], bits)
    blocks.save(tmp_path / "s.json")
    back = as_block_table(DamageTable.load(tmp_path / "s.json"))
    assert isinstance(back, BlockDamageTable)
    np.testing.assert_array_equal(back.cost_bits(), blocks.cost_bits())
    with pytest.raises(ValueError, match="already"):
        to_block_table(blocks, linears)


def test_expand_specs_gives_every_member_its_blocks_spec():
    linears = find_linears(tiny_llama())
    units = block_units(linears)
    specs = expand_specs({"model.layers.1": CONFIGS[0]}, units)
    assert set(specs) == set(units["model.layers.1"]) and set(specs.values()) == {CONFIGS[0]}


def test_quantized_in_place_restores_even_on_error():
    model = tiny_gpt2()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    name = next(iter(find_linears(model)))
    with pytest.raises(RuntimeError):
        with quantized_in_place(model, [name], QuantSpec(2, 64)):
            assert not torch.equal(model.get_submodule(name).weight, before[name + ".weight"])
            raise RuntimeError("boom")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
