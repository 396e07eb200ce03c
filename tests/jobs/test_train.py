import hashlib
import json
import logging

import pytest

from mixbits.export.native import load_native
from mixbits.model.arch import find_linears
from mixbits.model.load import load_model
from mixbits.plan import Plan
from mixbits.quant.spec import QuantSpec
from mixbits.sensitivity.seedfile import write_seed_file
from mixbits.jobs.train import train_command
from mixbits.config import TrainConfig


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_train_command_writes_model_and_reports(tiny_model_dir, tiny_text_file, tmp_path):
    model, _ = load_model(str(tiny_model_dir))
    Plan.uniform(find_linears(model), QuantSpec(3, 32)).save(tmp_path / "plan.json")
    write_seed_file(tmp_path / "sens.json", [0.2, 0.9])
    cfg = TrainConfig(dataset=str(tiny_text_file), train_size=4, val_size=2, seqlen=32, epochs=1, schedule="linear")
    out = tmp_path / "out"
    results = train_command(model=str(tiny_model_dir), plan=tmp_path / "plan.json", output_dir=out, cfg=cfg,
                            sensitivity_file=tmp_path / "sens.json", device="cpu", eval_windows=2, progress=False)
    assert set(results["evaluation"]["models"]) == {"original", "init", "trained"} and results["streamed"]
    saved = json.loads((out / "train_report.json").read_text())
    assert saved["training"]["schedule"] == "linear" and len(saved["training"]["blocks"]) == 2
    assert [b["epochs"] for b in json.loads((out / "train_statistics.json").read_text())] == [1.0, 2.0]
    assert (out / "checkpoint" / "block_0001.json").is_file()
    load_native(out / "model")
    again = train_command(model=str(tiny_model_dir), plan=tmp_path / "plan.json", output_dir=out, cfg=cfg,
                          sensitivity_file=tmp_path / "sens.json", device="cpu", resume=True, eval_windows=2,
                          progress=False)
    assert again["training"]["resumed_blocks"] == [0, 1]
    assert again["evaluation"]["models"]["trained"] == results["evaluation"]["models"]["trained"]


def sha256(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.is_file() and not p.name.startswith(".mixbits")}


def test_streamed_and_whole_model_paths_agree(tiny_model_dir, tiny_text_file, tmp_path):
    """The job streams a safetensors folder; the whole-model path (stream=False) gives the same trained
    shards byte for byte and the same figures (streamed evaluation: relative 1e-4)."""
    model, _ = load_model(str(tiny_model_dir))
    Plan.uniform(find_linears(model), QuantSpec(3, 32)).save(tmp_path / "plan.json")
    cfg = TrainConfig(dataset=str(tiny_text_file), train_size=4, val_size=2, seqlen=32, epochs=1, init="gptq")
    runs = {}
    for stream in (True, False):
        runs[stream] = train_command(model=str(tiny_model_dir), plan=tmp_path / "plan.json",
                                     output_dir=tmp_path / str(stream), cfg=cfg, device="cpu", eval_windows=2,
                                     progress=False, stream=stream)
        assert runs[stream]["streamed"] is stream
    streamed, whole = runs[True], runs[False]
    assert streamed["training"]["blocks"] == [{**b, "seconds": s["seconds"]} for b, s in
                                              zip(whole["training"]["blocks"], streamed["training"]["blocks"])]
    assert streamed["bytes_on_disk"] == whole["bytes_on_disk"] and streamed["data"] == whole["data"]
    a, b = sha256(tmp_path / "True" / "model"), sha256(tmp_path / "False" / "model")
    shards = [f for f in a if f.endswith(".safetensors")]
    assert len(shards) == 3 and all(a[f] == b[f] for f in shards)  # two blocks and the rest
    for name, got in streamed["evaluation"]["models"].items():
        want = whole["evaluation"]["models"][name]
        for key in ("ppl", "kl", "top1"):
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-9), (name, key)
    assert streamed["evaluation"]["models"]["trained"]["kl"] > 0
    load_native(tmp_path / "True" / "model")


def test_e2e_streams_and_says_so(tiny_model_dir, tiny_text_file, tmp_path, caplog):
    model, _ = load_model(str(tiny_model_dir))
    Plan.uniform(find_linears(model), QuantSpec(4, 32)).save(tmp_path / "plan.json")
    cfg = TrainConfig(dataset=str(tiny_text_file), train_size=4, val_size=2, seqlen=32, epochs=0.5, e2e=True,
                      e2e_epochs=0.5)
    with caplog.at_level(logging.INFO, logger="mixbits.jobs.train"):
        results = train_command(model=str(tiny_model_dir), plan=tmp_path / "plan.json", output_dir=tmp_path / "out",
                                cfg=cfg, device="cpu", eval_windows=2, progress=False)
    assert results["streamed"] is True and results["training"]["e2e"] is not None
    assert any("streams" in r.getMessage() and "E2E-QP" in r.getMessage() for r in caplog.records)


def test_a_plan_of_ggml_types_trains_streamed_and_whole_alike_and_e2e_is_refused(tiny_model_dir, tiny_text_file,
                                                                                 tmp_path):
    """`mixbits train` on a plan of ggml types (rows of 64: the 32-blocks) trains their grids (Block-AP), on both
    paths to the same shards; --e2e, which trains affine step sizes only, is refused before any work."""
    from mixbits.errors import UserError
    from mixbits.quant.ggml_linear import GGMLLinear
    from mixbits.quant.spec import GGMLSpec

    model, _ = load_model(str(tiny_model_dir))
    types = [GGMLSpec.parse(t) for t in ("Q4_0", "IQ4_NL", "Q4_1", "Q5_1")]
    Plan({n: types[i % len(types)] for i, n in enumerate(find_linears(model))}).save(tmp_path / "plan.json")
    cfg = TrainConfig(dataset=str(tiny_text_file), train_size=4, val_size=2, seqlen=32, epochs=1, init="clip")
    runs = {stream: train_command(model=str(tiny_model_dir), plan=tmp_path / "plan.json", output_dir=tmp_path / str(stream),
                                  cfg=cfg, device="cpu", eval_windows=2, progress=False, stream=stream)
            for stream in (True, False)}
    a, b = sha256(tmp_path / "True" / "model"), sha256(tmp_path / "False" / "model")
    assert all(a[f] == b[f] for f in a if f.endswith(".safetensors"))
    native = load_native(tmp_path / "True" / "model")
    assert all(isinstance(native.get_submodule(n), GGMLLinear) for n in find_linears(model))
    assert runs[True]["evaluation"]["models"]["trained"]["kl"] > 0
    e2e = TrainConfig(**{**cfg.to_dict(), "e2e": True})
    with pytest.raises(UserError, match="E2E-QP trains affine step sizes.*Q4_0.*drop --e2e"):
        train_command(model=str(tiny_model_dir), plan=tmp_path / "plan.json", output_dir=tmp_path / "e2e", cfg=e2e,
                      device="cpu", eval_windows=2, progress=False)
    assert not (tmp_path / "e2e").exists()
