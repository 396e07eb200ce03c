"""mixbits.commands: the jobs of the CLI as Python functions; each CLI command is a thin layer over one."""

import json

import pytest
import yaml
from typer.testing import CliRunner

from mixbits import commands
from mixbits.classify.config import ClassifyConfig
from mixbits.cli import app
from mixbits.config import RunConfig, TrainConfig
from mixbits.errors import UserError
from mixbits.jobs.analyze_config import AnalyzeConfig

runner = CliRunner()


class Called(Exception):
    pass


@pytest.fixture
def calls(monkeypatch):
    """Every commands.* function replaced by one that records its arguments and stops the command."""
    seen = {}
    for name in commands.__all__:
        def fake(*args, _name=name, **kwargs):
            seen[_name] = (args, kwargs)
            raise Called(_name)
        monkeypatch.setattr(commands, name, fake)
    return seen


def test_each_cli_command_calls_its_python_function_with_the_config_of_its_flags(calls, tmp_path):
    r = runner.invoke(app, ["run", "--no-verbose", "--seqlen", "64", "--quantizer", "rtn", "--output-dir", str(tmp_path)])
    assert isinstance(r.exception, Called)
    (cfg,), _ = calls["run"]
    assert isinstance(cfg, RunConfig) and cfg.data.seqlen == 64 and cfg.quantizer == "rtn"
    r = runner.invoke(app, ["analyze", "--no-verbose", "--methods", "fisher", "--no-validate", "--overwrite"])
    assert isinstance(r.exception, Called)
    (cfg,), kwargs = calls["analyze"]
    assert cfg == AnalyzeConfig(methods=("fisher",), validate=False, progress=False) and kwargs == {"overwrite": True}
    r = runner.invoke(app, ["train", "plan.json", "--no-verbose", "--epochs", "1", "--qat-init", "gptq"])
    assert isinstance(r.exception, Called)
    (plan, cfg), kwargs = calls["train"]
    assert str(plan) == "plan.json" and cfg == TrainConfig(epochs=1.0, init="gptq") and kwargs["resume"] is False
    r = runner.invoke(app, ["classify", "--no-verbose", "--group-size", "pc", "--head-l2", "0.5,2"])
    assert isinstance(r.exception, Called)
    (cfg,), _ = calls["classify"]
    assert cfg == ClassifyConfig(group_size=None, head_l2=(0.5, 2.0), progress=False)
    r = runner.invoke(app, ["zeroshot", "--no-verbose", "--model", "m", "--output", str(tmp_path / "z.json"),
                            "--tasks", "bb_winowhy_cloze", "--limit", "3", "--max-memory", "cpu=2GiB"])
    assert isinstance(r.exception, Called)
    (tasks,), kwargs = calls["zeroshot"]
    assert tasks == ("bb_winowhy_cloze",) and kwargs["model"] == "m" and kwargs["limit"] == 3
    assert kwargs["max_memory"] == "cpu=2GiB" and kwargs["output"] == tmp_path / "z.json"


def test_run_takes_a_config_or_a_recipe_with_fields_on_top(tiny_model_dir, tiny_text_file, tmp_path):
    base = {"model": str(tiny_model_dir), "device": "cpu", "quantizer": "rtn", "report": False, "use_cache": False,
            "progress": False, "data": {"dataset": str(tiny_text_file), "seqlen": 32, "calib_windows": 4,
                                         "eval_windows": 4},
            "allocation": {"target_bpw": 3.5, "group_sizes": [32, 64]}}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(base))
    by_recipe = commands.run(recipe, {"output_dir": tmp_path / "a", "allocation.target_bpw": 4.0})
    from mixbits.recipe import load_recipe, with_fields

    direct = commands.run(with_fields(load_recipe(recipe), {"output_dir": tmp_path / "b", "allocation.target_bpw": 4.0}))
    assert by_recipe["models"]["mixed"]["ppl"] == direct["models"]["mixed"]["ppl"]
    assert by_recipe["models"]["mixed"]["bpw"] <= 4.0
    assert json.loads((tmp_path / "a" / "plan.json").read_text()) == json.loads((tmp_path / "b" / "plan.json").read_text())
    with pytest.raises(UserError, match="allocation.target_bpw"):
        commands.run(recipe, {"output_dir": tmp_path / "c", "allocation.target_bpw": -1.0})


def test_analyze_claims_its_folder_before_any_work(tmp_path):
    (tmp_path / "mine.txt").write_text("a user's file")
    with pytest.raises(UserError, match="already holds files that mixbits did not write"):
        commands.analyze(AnalyzeConfig(output_dir=tmp_path, methods=("fisher",), validate=False))
    assert (tmp_path / "mine.txt").read_text() == "a user's file"
