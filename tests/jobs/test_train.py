import json

import pytest
import torch

from mixbits.export.native import load_native
from mixbits.model.arch import find_linears
from mixbits.model.load import load_model
from mixbits.plan import Plan
from mixbits.quant.spec import QuantSpec
from mixbits.sensitivity.seedfile import write_seed_file
from mixbits.jobs.train import train_command
from mixbits.config import TrainConfig


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_train_command_writes_model_and_reports(tiny_model_dir, tiny_text_file, tmp_path):
    model, _ = load_model(str(tiny_model_dir))
    Plan.uniform(find_linears(model), QuantSpec(3, 32)).save(tmp_path / "plan.json")
    write_seed_file(tmp_path / "sens.json", [0.2, 0.9])
    cfg = TrainConfig(dataset=str(tiny_text_file), train_size=4, val_size=2, seqlen=32, epochs=1, schedule="linear")
    out = tmp_path / "out"
    results = train_command(model=str(tiny_model_dir), plan=tmp_path / "plan.json", output_dir=out, cfg=cfg,
                            sensitivity_file=tmp_path / "sens.json", device="cpu", eval_windows=2, progress=False)
    assert set(results["evaluation"]["models"]) == {"original", "init", "trained"}
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
