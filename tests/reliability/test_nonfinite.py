"""Non-finite values stop the run, saying where they came from; results files are strict JSON."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from tests.conftest import tiny_llama
from tests.reliability.conftest import invoke, one_line_error


def strict_json(path):
    """Parse `path` refusing NaN / Infinity tokens, as strict parsers (RFC 8259) do."""

    def refuse(token):
        raise AssertionError(f"{path} holds the non-JSON token {token}")

    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.fixture
def nan_model_dir(model_copy):
    """The tiny model with 10 NaN and 3 inf weights in one projection."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_copy)
    with torch.no_grad():
        w = model.model.layers[1].mlp.down_proj.weight
        w.view(-1)[:10] = float("nan")
        w.view(-1)[10:13] = float("inf")
    model.save_pretrained(model_copy)
    return model_copy


def test_nan_weights_are_refused_at_load_naming_the_tensor(nan_model_dir):
    from mixbits.model.load import load_model

    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj\.weight \(10 NaN, 3 inf"):
        load_model(str(nan_model_dir))


def test_the_reported_case_a_nan_model_run_with_a_plan_does_not_exit_0(nan_model_dir, tiny_text_file, tmp_path):
    """Before: exit 0, every perplexity NaN, top-1 agreement "100 %", bare NaN tokens in results.json."""
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"layers": {f"model.layers.0.mlp.{p}": "w4g32"  # the NaN layer stays 16 bit
                                           for p in ("gate_proj", "up_proj", "down_proj")}}))
    out = tmp_path / "out"
    r = invoke("run", "--no-verbose", "--model", str(nan_model_dir), "--dataset", str(tiny_text_file),
               "--plan", str(plan), "--output-dir", str(out), "--seqlen", "32", "--calib-windows", "2",
               "--eval-windows", "2", "--no-baselines")
    one_line_error(r, "model.layers.1.mlp.down_proj.weight", "NaN")
    assert "100 %" not in r.output and "100.0 %" not in r.output
    assert not (out / "results.json").exists()


def test_nan_damage_names_the_layer_and_the_config():
    from mixbits.allocate.optimal import Constraints, allocate_optimal
    from mixbits.quant.spec import KEEP, QuantSpec
    from mixbits.sensitivity.table import DamageTable

    damage = np.array([[0.1, 0.3, 0.0], [0.2, np.nan, 0.0]])
    table = DamageTable(("m.l0.q", "m.l0.k"), ((8, 8), (8, 8)), (QuantSpec(4), QuantSpec(3), KEEP), damage,
                        "fisher", meta={"model": "tiny"})
    with pytest.raises(Exception, match=r"'m\.l0\.k' at config w3g128") as err:
        allocate_optimal(table, [("m.l0.q",), ("m.l0.k",)], 8 * 64 * 4.5, Constraints())
    assert "damage[" not in str(err.value) and "tiny" in str(err.value)


def test_a_nan_evaluation_names_the_variant():
    from mixbits.eval.perplexity import evaluate_models

    good, broken = tiny_llama(), tiny_llama()
    with torch.no_grad():
        broken.model.layers[0].self_attn.o_proj.weight.fill_(float("nan"))
    windows = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with pytest.raises(Exception, match=r"'mixed w3'.*NaN.*window 0") as err:
        evaluate_models({"original": good, "mixed w3": broken}, windows, device=torch.device("cpu"),
                        reference="original", progress=False)
    assert "Traceback" not in str(err.value)


def test_an_infinite_perplexity_is_written_as_null_with_a_note(tmp_path):
    from mixbits.eval.perplexity import EvalResult
    from mixbits.io import atomic_write_json

    result = EvalResult(ppl=math.inf, nll=800.0, kl=math.inf, top1=0.0, tokens=10, windows=1, seqlen=11)
    atomic_write_json(tmp_path / "results.json", {"mixed": result.to_dict()})
    data = strict_json(tmp_path / "results.json")["mixed"]
    assert data["ppl"] is None and data["kl"] is None and data["infinite"] == ["ppl", "kl"]
    assert data["nll"] == 800.0


def test_an_nll_beyond_the_double_range_gives_inf_not_overflow():
    from mixbits.eval.perplexity import evaluate_models

    class Certain(torch.nn.Module):  # gives every target token probability ~e**-2000
        def forward(self, input_ids):
            logits = torch.full((*input_ids.shape, 8), -1000.0)
            logits[..., 0] = 1000.0
            return type("Out", (), {"logits": logits})()

    windows = torch.ones(1, 6, dtype=torch.long)
    result = evaluate_models({"m": Certain()}, windows, device=torch.device("cpu"), progress=False)["m"]
    assert result.ppl == math.inf and result.nll > 709


def test_results_files_are_strict_json(tmp_path):
    from mixbits.io import atomic_write_json

    atomic_write_json(tmp_path / "r.json", {"corr": float("nan"), "row": np.array([1.0, np.inf]),
                                            "n": np.float32(2.5)})
    assert strict_json(tmp_path / "r.json") == {"corr": None, "row": [1.0, None], "n": 2.5}


def test_a_table_with_unmeasured_cells_round_trips_as_strict_json(tmp_path):
    from mixbits.quant.spec import KEEP, QuantSpec
    from mixbits.sensitivity.table import DamageTable

    damage = np.array([[0.1, np.nan, 0.0]])
    table = DamageTable(("m.l0.q",), ((8, 8),), (QuantSpec(4), QuantSpec(3), KEEP), damage, "ablation")
    table.save(tmp_path / "sensitivity.json")
    strict_json(tmp_path / "sensitivity.json")
    back = DamageTable.load(tmp_path / "sensitivity.json")
    assert back.damage[0, 0] == 0.1 and math.isnan(back.damage[0, 1])
