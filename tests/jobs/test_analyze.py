import json

import pytest

from mixbits.jobs.analyze import AnalyzeConfig, analyze
from mixbits.sensitivity.seedfile import write_seed_file
from mixbits.sensitivity.table import DamageTable


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
    with pytest.raises(ValueError, match="validate-with"):
        AnalyzeConfig(validate_with="fisher")
    with pytest.raises(ValueError, match="w9"):
        AnalyzeConfig(validate_configs=("w9g128",))
