"""model/dispatch.py: whole models placed by accelerate within a budget, the rest on disk; same logits."""

import logging

import pytest
import torch

from mixbits.errors import UserError
from mixbits.export.native import save_native
from mixbits.model.arch import find_linears
from mixbits.jobs.zeroshot import load_mixed
from mixbits.model.dispatch import accelerate_budget, is_placed, load_original
from mixbits.model.quantize import quantize_model
from mixbits.plan import Plan
from mixbits.quant.spec import QuantSpec
from tests.conftest import tiny_llama

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny Llama's checkpoint and its 4-bit native model."""
    root = tmp_path_factory.mktemp("dispatch")
    model = tiny_llama()
    model.save_pretrained(root / "original")
    shapes = {n: (i.out_features, i.in_features) for n, i in find_linears(model).items()}
    plan = Plan.uniform(shapes, QuantSpec(4, 32))
    quantized, report = quantize_model(model, plan, quantizer="rtn", device=CPU, progress=False)
    save_native(quantized, plan, root / "mixed", qparams=report.qparams)
    return root


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_the_budget_is_accelerates_with_the_reserve_taken_off_the_host():
    assert accelerate_budget(None, CPU) is None
    assert accelerate_budget("cpu=1GiB", CPU, reserve=2**29) == {"cpu": 2**29}
    assert accelerate_budget("cpu=1KiB", CPU, reserve=2**20) == {"cpu": 1}  # nothing left: all on disk
    with pytest.raises(UserError, match="--max-memory"):
        accelerate_budget("cpu=lots", CPU)


@pytest.mark.parametrize("load, source, part", [(load_original, "original", 300 * 2**10),
                                                (load_mixed, "mixed", 90 * 2**10)])
def test_models_over_the_budget_go_to_disk_with_the_same_logits(saved, tmp_path, load, source, part, caplog):
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    whole = load(saved / source, device=CPU, dtype=torch.float32, budget=None, offload_dir=tmp_path / "unused")
    assert not is_placed(whole)
    for budget, where in ((part, {"cpu", "disk"}), (1, {"disk"})):  # embeddings and head kept, blocks on disk; all
        with caplog.at_level(logging.INFO, logger="mixbits.model.dispatch"):
            placed = load(saved / source, device=CPU, dtype=torch.float32, budget={"cpu": budget},
                          offload_dir=tmp_path / str(budget))
        assert is_placed(placed) and set(map(str, placed.hf_device_map.values())) == where
        assert torch.equal(logits(placed, ids), logits(whole, ids))
    assert sum("placed by accelerate" in r.getMessage() for r in caplog.records) == 2
    assert not (tmp_path / "unused").exists()  # no budget: nothing offloaded
