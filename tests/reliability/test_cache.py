"""Caches you can trust (issue 18 bad item 7, issue 17 items 5 and 6): a damage table is reused only
for the very weights, tokens, configs and code that made it; run and analyze share one builder;
the suite computes its tables in its own folder."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
import torch

from mixbits.model.arch import find_linears
from mixbits.quant.spec import KEEP, QuantSpec
from mixbits.sensitivity import cache as cache_mod
from mixbits.sensitivity.cache import cache_key_parts, cache_path, cached_table
from mixbits.sensitivity.fisher import fisher_table
from mixbits.sensitivity.table import DamageTable
from tests.conftest import tiny_llama

CPU = torch.device("cpu")
CONFIGS = (QuantSpec(2, 32), QuantSpec(4, 64), KEEP)
MIDDLE = "model.layers.0.mlp.down_proj"  # neither the first nor the last linear


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MIXBITS_HOME", str(tmp_path / "home"))  # also where the cache lived before MIXBITS_CACHE_DIR
    monkeypatch.setenv("MIXBITS_CACHE_DIR", str(tmp_path / "home" / "cache"))
    return tmp_path / "home" / "cache"


def windows(n=2, seqlen=12, seed=0):
    return torch.randint(0, 256, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def fisher(model, wins):
    """The Fisher table of `model`, computed (no cache)."""
    linears = find_linears(model)
    damage, scores = fisher_table(model, wins, linears, CONFIGS, device=CPU, progress=False)
    return DamageTable(units=tuple(linears), shapes=tuple((i.out_features, i.in_features) for i in linears.values()),
                       configs=CONFIGS, damage=damage, method="fisher", scores=scores)


def parts(model, wins):
    return cache_key_parts(model_name="tiny", model=model, linears=find_linears(model),
                           calibration_sha256=hashlib.sha256(wins.numpy().tobytes()).hexdigest(), configs=CONFIGS,
                           method="fisher", granularity="layer")


def test_editing_a_middle_layer_gives_a_new_key_and_a_fresh_table(cache_dir):
    model, wins = tiny_llama(), windows()
    assert MIDDLE not in (next(iter(find_linears(model))), list(find_linears(model))[-1])
    before = cached_table(parts(model, wins), lambda: fisher(model, wins))
    with torch.no_grad():
        model.get_submodule(MIDDLE).weight.mul_(3.0)  # a "fine-tune" of one middle layer
    assert cache_path(parts(model, wins)) != cache_path(parts(tiny_llama(), wins))
    after = cached_table(parts(model, wins), lambda: fisher(model, wins))
    fresh = fisher(model, wins)
    np.testing.assert_array_equal(after.damage, fresh.damage)  # not the stale table
    assert not np.array_equal(after.damage, before.damage)


def test_every_parameter_and_buffer_is_in_the_fingerprint():
    model = tiny_llama()
    reference = cache_mod.weights_fingerprint(model)
    tensors = [*model.named_parameters(), *model.named_buffers()]
    assert any(name.endswith("norm.weight") for name, _ in tensors)  # not only linears
    for name, tensor in tensors:
        saved = tensor.detach().clone()
        with torch.no_grad():
            tensor.mul_(1.5).add_(0.25)  # every element moves, as in any fine-tune
        assert cache_mod.weights_fingerprint(model) != reference, f"{name} is not covered by the fingerprint"
        with torch.no_grad():
            tensor.copy_(saved)
    assert cache_mod.weights_fingerprint(model) == reference


def test_fingerprint_reads_samples_not_whole_tensors():
    big = torch.nn.Linear(4096, 4096, bias=False)
    sample = cache_mod._sample(big.weight)
    assert sample.numel() == cache_mod.SAMPLE_BLOCKS * cache_mod.SAMPLE_ELEMENTS < big.weight.numel() // 100
    flat = big.weight.detach().reshape(-1)
    np.testing.assert_array_equal(sample[: cache_mod.SAMPLE_ELEMENTS], flat[: cache_mod.SAMPLE_ELEMENTS])
    np.testing.assert_array_equal(sample[-cache_mod.SAMPLE_ELEMENTS:], flat[-cache_mod.SAMPLE_ELEMENTS:])
    assert cache_mod._sample(torch.ones(7, dtype=torch.bfloat16)).numel() == 7  # small tensors whole, bf16 too


def test_the_code_version_is_in_the_key(monkeypatch):
    model, wins = tiny_llama(), windows()
    before = cache_path(parts(model, wins))
    monkeypatch.setattr(cache_mod, "CACHE_VERSIONS", {**cache_mod.CACHE_VERSIONS, "fisher": 99})
    assert cache_path(parts(model, wins)) != before
    with pytest.raises(KeyError, match="CACHE_VERSIONS"):
        cache_key_parts(model_name="tiny", model=model, linears=find_linears(model), calibration_sha256="x",
                        configs=CONFIGS, method="new_method", granularity="layer")


def test_the_suite_computes_its_tables_in_its_own_folder(computed_cache):
    from mixbits.data.cache import computed_cache_dir, mixbits_home

    assert os.environ["MIXBITS_CACHE_DIR"] == str(computed_cache) == str(computed_cache_dir())
    assert mixbits_home() not in computed_cache.parents  # the user's cache is never read by the tests


# ---- the code version: a fixed tiny model's table per method, hashed -------------------------------------------

DIGEST_CONFIGS = (QuantSpec(2, 32), QuantSpec(3, 64), QuantSpec(4, None), KEEP)


def _rounded(values) -> str:
    """Values at 6 significant digits (-0 as 0): far coarser than what threads or BLAS change in float64."""
    return ",".join(f"{float(v) + 0.0:.6g}" for v in np.asarray(values, dtype=np.float64).ravel())


def table_digest(table: DamageTable) -> str:
    h = hashlib.sha256()
    h.update(f"{table.method}|{table.units}|{[c.label for c in table.configs]}|".encode())
    h.update(_rounded(table.damage).encode())
    for name in sorted(table.scores):
        h.update(f"|{name}:{_rounded(table.scores[name])}".encode())
    return h.hexdigest()[:16]


@pytest.fixture(scope="module")
def digests() -> dict[str, str]:
    """Every cached method's table on one fixed float64 tiny Llama and fixed windows."""
    from mixbits.model.quantize import QUANTIZERS
    from mixbits.sensitivity.follow import gain_table
    from mixbits.sensitivity.methods import METHODS, compute_tables

    model = tiny_llama(seed=3).double()
    wins, linears = windows(n=3, seqlen=16, seed=5), find_linears(model)
    tables = compute_tables(list(METHODS), model, wins, linears, DIGEST_CONFIGS, device=CPU, progress=False,
                            generator=torch.Generator().manual_seed(7))
    for q in QUANTIZERS:
        tables[f"gain_{q}"] = gain_table(model, wins, linears, DIGEST_CONFIGS, quantizer=q, device=CPU, progress=False)
    return {m: table_digest(t) for m, t in tables.items()}


def test_every_cached_method_has_a_version_and_a_digest(digests):
    assert set(cache_mod.CACHE_VERSIONS) == set(cache_mod.OUTPUT_DIGESTS) == set(digests)
    assert all(isinstance(v, int) and v >= 1 for v in cache_mod.CACHE_VERSIONS.values())


@pytest.mark.parametrize("method", sorted(cache_mod.CACHE_VERSIONS))
def test_the_output_of_each_method_matches_its_recorded_digest(digests, method):
    if digests[method] != cache_mod.OUTPUT_DIGESTS[method]:
        pytest.fail(f"the output of {method} changed: bump CACHE_VERSIONS[{method!r}] and update the digest in "
                    f"OUTPUT_DIGESTS (src/mixbits/sensitivity/cache.py) to {digests[method]!r}")


# ---- one Fisher-table builder for run and analyze --------------------------------------------------------------

def _cache_files(folder) -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted((folder / "sensitivity").glob("*.json"))}


def _without_timing(entry: dict) -> dict:
    """A cache file minus what says how long this computation took and what it was computed with."""
    table = dict(entry["table"], meta={k: v for k, v in entry["table"]["meta"].items()
                                       if k not in ("seconds", "shared_pass_with")})
    return {**entry, "table": table}


def test_run_and_analyze_build_the_same_cached_fisher_table(tiny_model_dir, tiny_text_file, tmp_path, monkeypatch):
    from mixbits.config import AllocationConfig, DataConfig, RunConfig
    from mixbits.jobs.analyze import AnalyzeConfig, analyze
    from mixbits.pipeline import calibrate, prepare, sensitivity
    from mixbits.timing import StageTimer

    data = dict(seqlen=16, calib_windows=3, seed=4)
    monkeypatch.setenv("MIXBITS_CACHE_DIR", str(tmp_path / "run-cache"))
    cfg = RunConfig(model=str(tiny_model_dir), output_dir=tmp_path / "run", device="cpu", progress=False,
                    quantizer="rtn", data=DataConfig(dataset=str(tiny_text_file), eval_windows=2, **data),
                    allocation=AllocationConfig(target_bpw=3.5, bits=(2, 4), group_sizes=(64,)))
    timer = StageTimer()
    prepared = prepare(cfg, timer)
    calib, _, info = calibrate(cfg, prepared, timer)
    run_table = sensitivity(cfg, prepared, calib, timer, info)

    monkeypatch.setenv("MIXBITS_CACHE_DIR", str(tmp_path / "analyze-cache"))
    summary = analyze(AnalyzeConfig(model=str(tiny_model_dir), dataset=str(tiny_text_file), methods=("gradient", "fisher"),
                                    calib_windows=data["calib_windows"], seqlen=data["seqlen"], seed=data["seed"],
                                    bits=(2, 4), group_sizes=(64,), validate=False, validate_configs=("w2g64",),
                                    output_dir=tmp_path / "analyze", device="cpu", progress=False))
    assert not summary["methods"]["fisher"]["cached"]  # computed here, in the shared fisher + gradient pass

    run_files, analyze_files = _cache_files(tmp_path / "run-cache"), _cache_files(tmp_path / "analyze-cache")
    assert len(run_files) == 1 and len(analyze_files) == 2  # run: fisher; analyze: fisher and gradient
    name = next(iter(run_files))
    assert name in analyze_files  # one key
    assert _without_timing(run_files[name]) == _without_timing(analyze_files[name])  # one table, one meta rule
    # the run's own provenance rides on its table, not on the cached one
    assert run_table.meta["other_bytes_fp16"] == prepared.fixed_bytes and "other_bytes_fp16" not in \
        run_files[name]["table"]["meta"]

    monkeypatch.setenv("MIXBITS_CACHE_DIR", str(tmp_path / "run-cache"))  # analyze reuses the run's table
    again = analyze(AnalyzeConfig(model=str(tiny_model_dir), dataset=str(tiny_text_file), methods=("fisher",),
                                  calib_windows=data["calib_windows"], seqlen=data["seqlen"], seed=data["seed"],
                                  bits=(2, 4), group_sizes=(64,), validate=False, validate_configs=("w2g64",),
                                  output_dir=tmp_path / "analyze2", device="cpu", progress=False))
    assert again["methods"]["fisher"]["cached"]
