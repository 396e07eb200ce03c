"""`mixbits zeroshot` on a tiny run folder (random Llama + its 4-bit native model) and a 6-document task."""

from __future__ import annotations

import json

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

import mixbits.cli.zeroshot  # noqa: F401  (registers the command; mixbits.cli does not import it yet)
from mixbits.cli.common import app
from mixbits.data.bigbench import convert_task_json, tasks_root, write_task
from mixbits.export.native import save_native
from mixbits.model import load as model_load
from mixbits.model.apply import layer_shapes
from mixbits.plan import Plan
from mixbits.quant.spec import QuantSpec

TASK = "bb_physical_intuition"
KEYS = {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A MIXBITS_HOME whose embedded task is 6 tiny documents (no download)."""
    monkeypatch.setenv("MIXBITS_HOME", str(tmp_path / "home"))
    words = ["the city", "a river", "music", "the war of the state", "two", "an album of the year"]
    examples = [{"input": f"Which one {i}?",
                 "target_scores": {w: int(j == i % 3) for j, w in enumerate(words[i % 3:i % 3 + 3])}}
                for i in range(6)]
    write_task(TASK, convert_task_json({"examples": examples}), tasks_root())
    return tmp_path / "home"


@pytest.fixture
def run_dir(tmp_path, tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    out = tmp_path / "run"
    save_native(model, Plan.uniform(layer_shapes(model), QuantSpec(4, 32)), out / "model",
                AutoTokenizer.from_pretrained(tiny_model_dir))
    (out / "results.json").write_text(json.dumps({"config": {"model": str(tiny_model_dir)}}))
    return out


def invoke(*args):
    return CliRunner().invoke(app, ["zeroshot", *map(str, args), "--device", "cpu", "--no-verbose"])


def test_run_dir_scores_original_and_mixed_on_the_same_documents(home, run_dir):
    r = invoke("--run-dir", run_dir, "--tasks", TASK, "--limit", 0, "--batch-size", 4)
    assert r.exit_code == 0, r.output
    result = json.loads((run_dir / "zeroshot.json").read_text())
    assert set(result) == {"lm_eval", "limit", "num_fewshot", "seed", "tasks"} and result["limit"] is None
    entry = result["tasks"][TASK]
    assert entry["docs"] == 6 and entry["source"] == "bigbench 1.0.0 (embedded)"
    assert set(entry["models"]) == {"original", "mixed"}
    assert all(set(scores) == KEYS and 0 <= scores["acc"] <= 1 for scores in entry["models"].values())
    assert TASK in r.output and "original acc" in r.output


def test_no_original_scores_only_the_quantized_model(home, run_dir, tmp_path):
    out = tmp_path / "only-mixed.json"
    r = invoke("--run-dir", run_dir, "--tasks", TASK, "--limit", 3, "--no-original", "--output", out)
    assert r.exit_code == 0, r.output
    entry = json.loads(out.read_text())["tasks"][TASK]
    assert list(entry["models"]) == ["mixed"] and entry["docs"] == 3
    assert not (run_dir / "zeroshot.json").exists()


def test_one_model_by_name(home, tiny_model_dir, tmp_path):
    out = tmp_path / "one.json"
    r = invoke("--model", tiny_model_dir, "--tasks", TASK, "--limit", 2, "--output", out)
    assert r.exit_code == 0, r.output
    assert list(json.loads(out.read_text())["tasks"][TASK]["models"]) == [str(tiny_model_dir)]


@pytest.mark.parametrize("args, words", [
    ((), "either --run-dir"),
    (("--model", "m", "--run-dir", "r"), "either --run-dir"),
    (("--model", "m"), "--output"),
    (("--model", "m", "--output", "o.json", "--no-original"), "--no-original"),
    (("--run-dir", "RUN", "--limit", -1), "--limit -1"),
    (("--run-dir", "RUN", "--batch-size", 0), "--batch-size 0"),
    (("--run-dir", "RUN", "--tasks", "bb_nope"), "bb_winowhy"),
    (("--run-dir", "RUN", "--tasks", f"{TASK},{TASK}"), "twice"),
    (("--run-dir", "NOWHERE"), "model/mixbits.json"),
])
def test_bad_flags_fail_before_any_model_is_loaded(args, words, home, run_dir, monkeypatch):
    monkeypatch.setattr(model_load, "load_model", lambda *a, **k: pytest.fail("no model may be loaded"))
    args = [str(run_dir) if a == "RUN" else a for a in args]
    r = invoke(*args)
    assert r.exit_code == 2 and words in " ".join(r.output.split()), r.output
    assert not (run_dir / "zeroshot.json").exists()
