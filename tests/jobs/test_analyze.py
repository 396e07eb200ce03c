import json
import logging

import numpy as np
import pytest

from mixbits.jobs.analyze import AnalyzeConfig, analyze, whole_model_reasons
from mixbits.model.lazy import LazyCheckpoint
from mixbits.sensitivity.seedfile import write_seed_file
from mixbits.sensitivity.table import DamageTable
from tests.conftest import make_tokenizer, tiny_llama


def config(tiny_model_dir, tiny_text_file, tmp_path, **kw):
    base = dict(model=str(tiny_model_dir), dataset=str(tiny_text_file), methods=("fisher", "gradient", "output_error"),
                calib_windows=2, seqlen=16, bits=(2, 4), group_sizes=(64,), validate_configs=("w2g64", "w4g64"),
                validate_windows=2, output_dir=tmp_path / "out", device="cpu", progress=False)
    return AnalyzeConfig(**{**base, **kw})


def test_analyze_writes_tables_validation_and_plots(tiny_model_dir, tiny_text_file, tmp_path, monkeypatch):
    monkeypatch.setenv("MIXBITS_HOME", str(tmp_path / "home"))
    cfg = config(tiny_model_dir, tiny_text_file, tmp_path)
    summary = analyze(cfg)
    out = tmp_path / "out"
    table = DamageTable.load(out / "sensitivity.json")
    assert table.method == summary["best_method"] in cfg.methods
    assert {"fisher_trace", "gradient_l1", "output_error"} <= set(table.scores)
    run = table.meta["run"]  # what produced the table: config, data hashes, versions
    assert run["config"]["methods"] == list(cfg.methods) and len(run["data"]["calibration_sha256"]) == 64
    assert {"torch", "transformers", "mixbits"} <= set(run["environment"])
    validation = json.loads((out / "validation.json").read_text())
    assert set(validation["methods"]) == set(cfg.methods) and validation["measured_method"] == "divergence"
    assert (out / "plots" / "scores.png").stat().st_size > 0 and (out / "plots" / "validation.png").stat().st_size > 0
    assert len(summary["ranking"]) == summary["model"]["linears"]
    again = analyze(cfg)  # every table from the cache now
    assert all(m["cached"] for m in again["methods"].values())


def test_seed_file_at_block_granularity(tiny_model_dir, tiny_text_file, tmp_path, monkeypatch):
    monkeypatch.setenv("MIXBITS_HOME", str(tmp_path / "home"))
    seed = write_seed_file(tmp_path / "seed.json", [1.0, 2.0])
    cfg = config(tiny_model_dir, tiny_text_file, tmp_path, methods=("output_error",), granularity="block",
                 sensitivity_file=seed, use_cache=False)
    summary = analyze(cfg)
    assert set(summary["validation"]["methods"]) == {"output_error", "seed"}
    assert summary["model"]["blocks"] == 2 and len(summary["ranking"]) == 2


def test_bad_config_is_refused_at_once(tmp_path):
    with pytest.raises(ValueError, match="fishr"):
        AnalyzeConfig(methods=("fishr",))
    with pytest.raises(ValueError, match="float8"):
        AnalyzeConfig(compute_dtype="float8")
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ValueError, match="--offload-dir .*a-file.* is a file"):
        AnalyzeConfig(offload_dir=tmp_path / "a-file")
    with pytest.raises(ValueError, match="validate-with"):
        AnalyzeConfig(validate_with="fisher")
    with pytest.raises(ValueError, match="w9"):
        AnalyzeConfig(validate_configs=("w9g128",))


# ---- streamed block by block (issue 15) -------------------------------------------------------------------------

FISHER_ONLY = dict(methods=("fisher",), validate=False, use_cache=False)  # use_cache False: both paths compute


@pytest.fixture
def sharded_model_dir(tmp_path, tiny_text):
    """The tiny Llama (tied embeddings) in several safetensors shards, with its tokenizer."""
    tokenizer = make_tokenizer(tiny_text)
    folder = tmp_path / "sharded"
    tiny_llama(vocab=len(tokenizer)).save_pretrained(folder, max_shard_size="100KB")
    tokenizer.save_pretrained(folder)
    assert len(list(folder.glob("*.safetensors"))) > 1
    return folder


@pytest.mark.parametrize("methods", [("fisher",), ("fisher", "gradient", "output_error")])
def test_streamed_analysis_equals_the_whole_model_one(methods, sharded_model_dir, tiny_text_file, tmp_path,
                                                      monkeypatch, materialized):
    monkeypatch.setenv("MIXBITS_HOME", str(tmp_path / "home"))
    settings = {**FISHER_ONLY, "methods": methods}
    whole = analyze(config(sharded_model_dir, tiny_text_file, tmp_path / "w", output_dir=tmp_path / "whole",
                           stream=False, **settings))

    def no_whole_model(*args, **kwargs):
        raise AssertionError("the streamed analysis loaded the whole model")

    monkeypatch.setattr("mixbits.jobs.analyze.load_model", no_whole_model)
    live, counts = materialized  # pieces materialized now; after each read, how many were live
    streamed = analyze(config(sharded_model_dir, tiny_text_file, tmp_path / "s", output_dir=tmp_path / "streamed",
                              **settings))
    assert len(counts) >= 2 * len(methods) and max(counts) == 1 and not live  # one piece at a time, all released

    want, got = (DamageTable.load(tmp_path / out / "sensitivity.json") for out in ("whole", "streamed"))
    assert got.units == want.units and got.configs == want.configs
    assert np.allclose(got.damage, want.damage, rtol=1e-4, atol=0) and (want.damage[:, 0] > 0).all()
    assert np.allclose(got.scores["fisher_trace"], want.scores["fisher_trace"], rtol=1e-4, atol=0)
    for score in ("output_error", "gradient_l1") if len(methods) > 1 else ():  # every method's scores ride along
        assert np.allclose(got.scores[score], want.scores[score], rtol=1e-4, atol=0) and (want.scores[score] > 0).all()
    assert got.meta["streamed"] is True and "streamed" not in want.meta
    assert streamed["model"] == {**whole["model"], "streamed": True} and whole["model"]["streamed"] is False
    vocab = json.loads((sharded_model_dir / "config.json").read_text())["vocab_size"]
    assert streamed["model"]["parameters"] == sum(p.numel() for p in tiny_llama(vocab=vocab).parameters())  # tied once
    assert [u for u, _ in streamed["ranking"]] == [u for u, _ in whole["ranking"]]


def test_streamed_fisher_boundaries_on_disk_give_the_same_table(sharded_model_dir, tiny_text_file, tmp_path,
                                                                 monkeypatch):
    monkeypatch.setenv("MIXBITS_HOME", str(tmp_path / "home"))
    analyze(config(sharded_model_dir, tiny_text_file, tmp_path, output_dir=tmp_path / "memory", **FISHER_ONLY))
    analyze(config(sharded_model_dir, tiny_text_file, tmp_path, output_dir=tmp_path / "disk",
                   offload_dir=tmp_path / "offload", **FISHER_ONLY))
    in_memory, on_disk = (DamageTable.load(tmp_path / out / "sensitivity.json") for out in ("memory", "disk"))
    assert np.array_equal(on_disk.damage, in_memory.damage) and on_disk.meta["streamed"] is True
    assert list((tmp_path / "offload").iterdir()) == []  # this analysis's boundary files are removed


def test_the_hessian_streams_with_the_whole_models_numbers(sharded_model_dir, tiny_text_file, tmp_path, monkeypatch,
                                                          materialized):
    monkeypatch.setenv("MIXBITS_HOME", str(tmp_path / "home"))
    settings = {**FISHER_ONLY, "methods": ("hessian",)}
    analyze(config(sharded_model_dir, tiny_text_file, tmp_path, output_dir=tmp_path / "whole", stream=False,
                   **settings))
    monkeypatch.setattr("mixbits.jobs.analyze.load_model", lambda *a, **k: pytest.fail("the whole model was loaded"))
    live, counts = materialized
    streamed = analyze(config(sharded_model_dir, tiny_text_file, tmp_path, output_dir=tmp_path / "streamed",
                              offload_dir=tmp_path / "offload", **settings))
    assert counts and max(counts) == 1 and not live and streamed["model"]["streamed"] is True
    assert list((tmp_path / "offload").iterdir()) == []  # this analysis's boundary files are removed
    want, got = (DamageTable.load(tmp_path / out / "sensitivity.json") for out in ("whole", "streamed"))
    assert got.method == want.method == "hessian" and got.meta["streamed"] is True
    floor = 1e-5 * float(np.abs(want.damage).max())
    assert np.allclose(got.damage, want.damage, rtol=1e-4, atol=floor) and want.damage.max() > 0
    trace, trace_floor = want.scores["hessian_trace"], 1e-5 * float(np.abs(want.scores["hessian_trace"]).max())
    assert np.allclose(got.scores["hessian_trace"], trace, rtol=1e-4, atol=trace_floor)


def test_options_that_need_the_whole_model_load_it_and_say_why(tiny_model_dir, tiny_text_file, tmp_path,
                                                               monkeypatch, caplog):
    assert whole_model_reasons(AnalyzeConfig(methods=("fisher",), validate=False)) == []
    assert whole_model_reasons(AnalyzeConfig()) == ["--validate (measured damage)"]
    assert whole_model_reasons(AnalyzeConfig(methods=("fisher", "hessian"), validate=False)) == []
    assert whole_model_reasons(AnalyzeConfig(methods=("fisher", "divergence"), validate=False)) == [
        "--methods divergence"]
    assert whole_model_reasons(AnalyzeConfig(methods=("fisher",), validate=False, granularity="block")) == [
        "--granularity block"]
    monkeypatch.setenv("MIXBITS_HOME", str(tmp_path / "home"))

    def no_lazy_read(*args, **kwargs):
        raise AssertionError("a streamed read in a whole-model analysis")

    monkeypatch.setattr(LazyCheckpoint, "materialize", no_lazy_read)
    with caplog.at_level(logging.INFO, logger="mixbits.jobs.analyze"):
        summary = analyze(config(tiny_model_dir, tiny_text_file, tmp_path, methods=("fisher",), granularity="block",
                                 validate=False, use_cache=False))
    assert summary["model"]["streamed"] is False
    assert "--granularity block: not streamed yet; this analysis loads the whole model" in caplog.text


# ---- over ggml types (issue 16) --------------------------------------------------------------------------------

def test_analyze_over_ggml_types_measures_what_each_row_can_store_and_allocate_plans_from_it(
        tiny_model_dir, tiny_text_file, tmp_path, monkeypatch):
    """Rows of 64 and 128 weights: the legacy types and IQ4_NL are measured, the K-quants (blocks of 256) are
    not (NaN, as a run's Fisher table writes them); validation runs on ggml configs; the table plans a GGUF."""
    from mixbits.jobs.allocate import allocate_from_table
    from mixbits.quant.spec import GGML_TYPES, GGMLSpec

    monkeypatch.setenv("MIXBITS_HOME", str(tmp_path / "home"))
    cfg = config(tiny_model_dir, tiny_text_file, tmp_path, methods=("fisher", "output_error"), candidates="gguf",
                 validate_configs=("q4_0", "iq4_nl"))
    summary = analyze(cfg)
    table = DamageTable.load(tmp_path / "out" / "sensitivity.json")
    assert [c for c in table.configs if not c.keep] == list(GGML_TYPES.values())
    for j, spec in enumerate(table.configs):
        column = table.damage[:, j]
        if spec.keep:
            continue
        if spec.block == 256:
            assert np.isnan(column).all(), spec.name
        else:
            assert np.isfinite(column).all() and (column > 0).all(), spec.name
    q40, iq4, q80 = (table.configs.index(GGML_TYPES[n]) for n in ("Q4_0", "IQ4_NL", "Q8_0"))
    assert (table.damage[:, q80] < table.damage[:, q40]).all()
    assert summary["validation"]["methods"] and set(summary["validation"]["methods"]) == {"fisher", "output_error"}
    streamed = analyze(config(tiny_model_dir, tiny_text_file, tmp_path, methods=("fisher",), candidates="gguf",
                              validate=False, use_cache=False, output_dir=tmp_path / "streamed"))
    assert streamed["model"]["streamed"] is True
    fisher = DamageTable.load(tmp_path / "streamed" / "sensitivity.json")
    whole = analyze(config(tiny_model_dir, tiny_text_file, tmp_path, methods=("fisher",), candidates="gguf",
                           validate=False, use_cache=False, stream=False, output_dir=tmp_path / "whole"))
    assert whole["model"]["streamed"] is False
    want = DamageTable.load(tmp_path / "whole" / "sensitivity.json").damage
    assert np.array_equal(np.isnan(fisher.damage), np.isnan(want))
    assert np.allclose(fisher.damage[~np.isnan(want)], want[~np.isnan(want)], rtol=1e-4, atol=0)
    done = allocate_from_table(tmp_path / "out" / "sensitivity.json", strategy="optimal", target_bpw=5.0,
                               candidates="gguf")
    specs = done.results["optimal"].specs
    assert all(isinstance(s, GGMLSpec) and s.block == 32 for s in specs.values())
    assert done.results["optimal"].bpw <= 5.0


def test_analyze_refuses_an_unknown_candidate_set():
    with pytest.raises(ValueError, match="--candidates 'ggml' is not known"):
        AnalyzeConfig(candidates="ggml")
