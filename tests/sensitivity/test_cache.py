import logging

import numpy as np
import pytest

from mixbits.data.cache import package_dir
from mixbits.model.arch import find_linears
from mixbits.quant.spec import KEEP, QuantSpec
from mixbits.sensitivity.cache import cache_key_parts, cache_path, cached_table
from mixbits.sensitivity.table import DamageTable
from mixbits.sensitivity.units import BlockDamageTable, block_table, block_units
from tests.conftest import tiny_gpt2

CONFIGS = (QuantSpec(2, 64), KEEP)


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("MIXBITS_HOME", str(tmp_path))
    monkeypatch.delenv("MIXBITS_CACHE_DIR")  # the suite's own folder (tests/conftest.py): back to the default
    return tmp_path


def parts(model, method="fisher", calib="abc"):
    return cache_key_parts(model_name="tiny", model=model, linears=find_linears(model), calibration_sha256=calib,
                           configs=CONFIGS, method=method, granularity="block", options={"probes": 2})


def make_table(model, calls):
    calls.append(1)
    linears = find_linears(model)
    units = block_units(linears)
    damage = np.array([[1.5, 0.0], [np.nan, 0.0]])
    return block_table(units, linears, CONFIGS, damage, "fisher", {"fisher_trace": np.array([2.0, 1.0])}, {"seconds": 3.0})


def test_second_call_is_served_from_the_cache(home):
    model, calls = tiny_gpt2(), []
    first = cached_table(parts(model), lambda: make_table(model, calls))
    second = cached_table(parts(model), lambda: make_table(model, calls))
    assert calls == [1] and cache_path(parts(model)).parent == home / "cache" / "sensitivity"
    assert isinstance(second, BlockDamageTable) and second.units == first.units
    np.testing.assert_array_equal(second.damage, first.damage)  # NaN survives the round trip
    np.testing.assert_array_equal(second.cost_bits(), first.cost_bits())
    cached_table(parts(model, method="gradient"), lambda: make_table(model, calls))
    cached_table(parts(model, calib="other"), lambda: make_table(model, calls))
    assert len(calls) == 3


def test_changed_weights_miss_the_cache(home):
    model = tiny_gpt2()
    before = parts(model)
    with __import__("torch").no_grad():
        model.transformer.h[-1].mlp.c_proj.weight.mul_(1.01)
    assert cache_path(parts(model)) != cache_path(before)


def test_a_corrupt_file_is_recomputed_with_a_warning(home, caplog):
    model, calls = tiny_gpt2(), []
    cached_table(parts(model), lambda: make_table(model, calls))
    cache_path(parts(model)).write_text('{"format": "mixbits.sensitivity-cache/1", "tab')
    with caplog.at_level(logging.WARNING):
        table = cached_table(parts(model), lambda: make_table(model, calls))
    assert calls == [1, 1] and "unreadable" in caplog.text and isinstance(table, DamageTable)
    assert cached_table(parts(model), lambda: make_table(model, calls)) is not None and calls == [1, 1]


def test_mixbits_cache_dir_moves_computed_caches_only(home, tmp_path, monkeypatch):
    monkeypatch.setenv("MIXBITS_CACHE_DIR", str(tmp_path / "computed"))
    model = tiny_gpt2()
    assert cache_path(parts(model)).parent == tmp_path / "computed" / "sensitivity"
    assert package_dir("x==1").parent == home / "packages"  # downloads stay in MIXBITS_HOME
