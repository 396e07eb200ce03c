"""bench/memory.py on its tiny size, so the script cannot rot.

No figure is asserted beyond being measured: the test checks that the checkpoint is built shard by
shard with the embedded tokenizer, that each stage ran as its own process with a peak RSS, wall time
and (where the budget module covers it) a prediction, and that the checkpoints are deleted unless kept.
"""

from __future__ import annotations

import json
import sys

import pytest
from safetensors import safe_open

from tests.bench import load_bench_script


@pytest.fixture(scope="module")
def bench():
    return load_bench_script("memory")


def test_checkpoint_is_built_shard_by_shard(bench, tmp_path):
    shape = bench.SIZES["tiny"]
    nbytes = bench.build_checkpoint(tmp_path, shape)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) == shape.blocks + 2  # embeddings, each block, final norm + head
    assert index["metadata"]["total_size"] == nbytes == 2 * shape.params()  # bf16
    with safe_open(str(tmp_path / index["weight_map"]["model.layers.1.mlp.down_proj.weight"]), "pt") as f:
        assert sorted(f.keys()) == sorted(k for k in index["weight_map"] if k.startswith("model.layers.1."))
        assert f.get_tensor("model.layers.1.mlp.down_proj.weight").dtype.is_floating_point
    assert (tmp_path / "tokenizer.json").is_file()
    from transformers import AutoConfig, AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(tmp_path)) == bench.VOCAB
    assert AutoConfig.from_pretrained(tmp_path).num_hidden_layers == shape.blocks


def test_tiny_run_measures_each_stage_and_deletes_the_checkpoint(bench, tmp_path):
    data = bench.main(["--sizes", "tiny", "--stages", "export-gguf,train,train-e2e,run-rtn-ram", "--out", str(tmp_path),
                       "--threads", "1", "--seqlen", "64", "--bits", "4,8", "--group-sizes", "32", "--bpw", "5",
                       "--timeout", "300"])
    rows = {r["stage"]: r for r in data["rows"]}
    assert list(rows) == ["run-rtn", "run-rtn-ram", "train", "train-e2e", "export-gguf"]  # train, export: run-rtn's folder
    for row in rows.values():
        assert row["status"] == "ok", row
        assert row["rc"] == 0 and row["peak_mib"] > 100 and row["wall_s"] > 0
    assert rows["run-rtn"]["predicted_mib"] > 0 and rows["export-gguf"]["predicted_mib"] > 0  # from run-rtn's folder
    assert rows["train-e2e"]["predicted_mib"] >= rows["train"]["predicted_mib"] > 0  # + an E2E stage
    assert json.loads((tmp_path / "tiny" / "train-e2e" / "train_report.json").read_text())["streamed"] is True
    assert rows["run-rtn-ram"]["predicted_mib"] > rows["run-rtn"]["predicted_mib"]  # + the checkpoint's bytes
    assert "--preload" in (tmp_path / "tiny" / "logs" / "run-rtn-ram.log").read_text().splitlines()[0]
    assert (tmp_path / "tiny" / "export-gguf" / "model.gguf").is_file()
    text = (tmp_path / "memory.md").read_text()
    assert "Random weights measure memory and time only" in text and "| tiny | " in text
    assert not (tmp_path / "checkpoints").exists()


def test_unknown_stage_is_refused(bench, tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--stages", "run-rtn,quantize", "--out", str(tmp_path)])
    assert "unknown sizes or stages ['quantize']" in capsys.readouterr().err


def test_keep_checkpoints_keeps_them(bench, tmp_path):
    data = bench.main(["--sizes", "tiny", "--stages", "", "--out", str(tmp_path), "--keep-checkpoints"])
    assert data["rows"] == [] and (tmp_path / "checkpoints" / "tiny" / "model.safetensors.index.json").is_file()


def test_the_hessian_stage_runs_on_request_only(bench, tmp_path):
    assert "analyze-hessian" not in bench.parse_args(["--out", str(tmp_path)]).stages  # not by default
    args = bench.parse_args(["--stages", "analyze-hessian,analyze", "--out", str(tmp_path), "--no-stream"])
    assert args.stages == ["analyze", "analyze-hessian"]
    argv = bench.stage_argv("analyze-hessian", tmp_path / "m", tmp_path, args)
    assert argv[argv.index("--methods") + 1] == "hessian" and "--no-stream" in argv
    fisher = bench.stage_argv("analyze", tmp_path / "m", tmp_path, args)
    assert fisher[fisher.index("--methods") + 1] == "fisher" and "--no-stream" not in fisher


def test_a_stage_peak_is_its_own_not_this_processs(bench, tmp_path):
    """Linux hands a vfork'd child the parent's resident peak at exec; the launcher keeps it out."""
    held = bytearray(512 * 2**20)
    held[::4096] = b"\1" * len(held[::4096])  # touched: this process's peak is now over 512 MiB
    del held
    script = "x = bytearray(64 * 2**20); x[::4096] = b'\\1' * len(x[::4096])"
    record = bench.run_stage([sys.executable, "-c", script], tmp_path / "logs" / "s.log", threads=1, timeout=60)
    assert record["rc"] == 0 and not record["timed_out"]
    assert 64 < record["peak_mib"] < 256, record  # the stage's 64 MiB and Python, not the 512 MiB above


def test_a_stage_killed_at_the_timeout_is_reported(bench, tmp_path):
    record = bench.run_stage([sys.executable, "-c", "import time; time.sleep(30)"], tmp_path / "s.log", threads=1,
                             timeout=1)
    assert record["timed_out"] and record["rc"] != 0 and 0 < record["peak_mib"] < 256


def test_every_streamed_stage_has_a_prediction(bench, tmp_path):
    """analyze, analyze-hessian and the exports are predicted (model/budget_stages.py); the whole-model
    Hessian (--no-stream) is not."""
    folder = tmp_path / "checkpoints" / "tiny"
    bench.build_checkpoint(folder, bench.SIZES["tiny"])
    args = bench.parse_args(["--out", str(tmp_path), "--seqlen", "64"])
    analyze, hessian = (bench.predicted_bytes(s, folder, args) for s in ("analyze", "analyze-hessian"))
    assert hessian > analyze > 0
    whole = bench.parse_args(["--out", str(tmp_path), "--stages", "analyze-hessian", "--no-stream"])
    assert bench.predicted_bytes("analyze-hessian", folder, whole) is None
