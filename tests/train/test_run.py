import json

import pytest
import torch

from mixbits.export.native import load_native, save_native
from mixbits.model.arch import find_linears, get_weight
from mixbits.model.quantize import quantize_model
from mixbits.plan import Plan
from mixbits.quant.affine import quantize
from mixbits.quant.spec import KEEP, QuantSpec
from mixbits.config import TrainConfig
from mixbits.train.run import train_model
from tests.conftest import tiny_gpt2, tiny_llama

CPU = torch.device("cpu")
CFG = TrainConfig(epochs=2, batch_size=2, quant_lr=3e-3, weight_lr=3e-4)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def windows(n, seed, seqlen=16):
    return torch.randint(0, 256, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def mixed_plan(model):
    """Every linear at its own spec: 2, 3, 4 bits, group 32 / 64 / per-channel, one kept, one symmetric."""
    choices = [QuantSpec(2, 32), QuantSpec(3, 64), QuantSpec(4, None), QuantSpec(3, 32, symmetric=True), KEEP]
    return Plan({n: choices[i % len(choices)] for i, n in enumerate(find_linears(model))})


@pytest.fixture(scope="module")
def llama():
    model = tiny_llama()
    return model, mixed_plan(model), windows(8, 1), windows(4, 2)


def weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_killed_run_resumed_is_bit_identical(llama, tmp_path):
    model, plan, calib, val = llama
    sens = {0: 0.3, 1: 1.2}
    cfg = TrainConfig(**{**CFG.to_dict(), "schedule": "sqrt"})
    whole, report = train_model(model, plan, calib, val, cfg, device=CPU, sensitivity=sens, progress=False)

    def crash(index):
        if index == 0:
            raise KeyboardInterrupt("killed after block 0")

    with pytest.raises(KeyboardInterrupt):
        train_model(model, plan, calib, val, cfg, device=CPU, sensitivity=sens, checkpoint_dir=tmp_path,
                    progress=False, on_block_done=crash)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["block_0000.json", "block_0000.safetensors", "run.json"]
    resumed, report2 = train_model(model, plan, calib, val, cfg, device=CPU, sensitivity=sens,
                                   checkpoint_dir=tmp_path, resume=True, progress=False)
    assert report2.resumed_blocks == (0,)
    first, second = report.blocks  # sqrt schedule: s = (0, 1) after min-max normalisation
    assert (first.sensitivity, first.epochs, first.lr_scale, first.patience) == (0.0, 2.0, 1.0, 2.0)
    assert (second.sensitivity, second.epochs, second.patience) == (1.0, 4.0, 5.0)
    assert second.lr_scale == pytest.approx(1 / 1.5) and second.quant_lr == pytest.approx(3e-3 / 1.5)
    a, b = weights(whole), weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for n in report.qparams:
        assert torch.equal(report.qparams[n].scale, report2.qparams[n].scale)
        assert torch.equal(report.qparams[n].zero, report2.qparams[n].zero)
    assert [s.loss_end for s in report.blocks] == [s.loss_end for s in report2.blocks]


def test_resume_refuses_another_run_and_a_fresh_run_refuses_a_used_folder(llama, tmp_path):
    model, plan, calib, val = llama
    cfg = TrainConfig(**{**CFG.to_dict(), "epochs": 0.5})
    train_model(model, plan, calib, val, cfg, device=CPU, checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="resume=True"):
        train_model(model, plan, calib, val, cfg, device=CPU, checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="config.epochs"):
        train_model(model, plan, calib, val, TrainConfig(**{**cfg.to_dict(), "epochs": 1.0}), device=CPU,
                    checkpoint_dir=tmp_path, resume=True, progress=False)


def test_trained_model_is_exported_with_exactly_its_codes(llama, tmp_path):
    model, plan, calib, val = llama
    trained, report = train_model(model, plan, calib, val, CFG, device=CPU, progress=False)
    start, init = quantize_model(model, plan, device=CPU, progress=False)
    changed = 0
    for n, spec in plan.quantized().items():
        w, qp = get_weight(trained.get_submodule(n)), report.qparams[n]
        assert torch.equal(qp.scale, qp.scale.half().float()) and torch.equal(qp.zero, qp.zero.round())
        w0 = get_weight(start.get_submodule(n))
        changed += not torch.equal(quantize(w, qp, spec), quantize(w0, init.qparams[n], spec))
    assert changed > 0  # training moved codes, not only scales
    save_native(trained, plan, tmp_path / "m", qparams=report.qparams)
    loaded = load_native(tmp_path / "m")
    ids = windows(1, 9)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, trained(input_ids=ids).logits)
    stats = report.to_dict()
    json.dumps(stats)
    for b in stats["blocks"]:
        assert b["loss_end"] <= b["loss_start"] and b["bits"] and b["seconds"] > 0 and b["ratio"] <= 1
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), tiny_llama().state_dict().values()))


def test_offload_to_disk_changes_nothing(llama, tmp_path):
    model, plan, calib, val = llama
    cfg = TrainConfig(**{**CFG.to_dict(), "epochs": 1.0})
    mem, _ = train_model(model, plan, calib, val, cfg, device=CPU, progress=False)
    disk, _ = train_model(model, plan, calib, val, TrainConfig(**{**cfg.to_dict(), "offload": True,
                                                                  "offload_dir": tmp_path}),
                          device=CPU, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(mem.state_dict().values(), disk.state_dict().values()))
    assert list(tmp_path.iterdir()) == []


def test_gpt2_with_gptq_init_and_e2e(tmp_path):
    model = tiny_gpt2()
    plan = Plan.uniform(find_linears(model), QuantSpec(3, 32))
    cfg = TrainConfig(epochs=1, init="gptq", e2e=True, e2e_lr=1e-3, quant_lr=3e-3, weight_lr=3e-4)
    trained, report = train_model(model, plan, windows(8, 1), windows(4, 2), cfg, device=CPU, progress=False)
    assert report.e2e is not None and report.e2e["loss_end"] <= report.e2e["loss_start"]
    save_native(trained, plan, tmp_path / "m", qparams=report.qparams)
    ids = windows(1, 9)
    with torch.no_grad():
        assert torch.equal(load_native(tmp_path / "m")(input_ids=ids).logits, trained(input_ids=ids).logits)


def test_bad_inputs_name_the_fix(llama):
    model, plan, calib, val = llama
    with pytest.raises(ValueError, match="sensitivity"):
        train_model(model, plan, calib, val, TrainConfig(schedule="joint"), device=CPU, progress=False)
    with pytest.raises(ValueError, match="missing \\[1\\]"):
        train_model(model, plan, calib, val, TrainConfig(schedule="joint"), device=CPU, sensitivity={0: 1.0},
                    progress=False)
    with pytest.raises(ValueError, match="val_windows"):
        train_model(model, plan, calib, val.float(), CFG, device=CPU, progress=False)
    with pytest.raises(ValueError, match="init="):
        TrainConfig(init="awq")
