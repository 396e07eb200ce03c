"""Recipes as data (mixbits.recipe): strict reading into the configs, round trips, field paths."""

from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from mixbits.config import AllocationConfig, DataConfig, IterativeConfig, RunConfig, TrainConfig
from mixbits.errors import UserError
from mixbits.quant.spec import QuantSpec
from mixbits.recipe import (OUTPUT_ONLY, config_from, field_paths, load_recipe, recipe_dict, recipe_yaml,
                            save_recipe, with_fields)

RICH = RunConfig(
    model="some/model", device="cpu", quantizer="rtn", damage="rtn", plan=None, tasks=("bb_arith",), task_limit=3,
    data=DataConfig(dataset="wiki", seqlen=64, calib_windows=2, eval_windows=0, seed=7),
    allocation=AllocationConfig(target_size_mb=12.5, bits=(2, 4), group_sizes=(32, None), keep=r"layers\.0\.",
                                pins=("down_proj=w4g64", "o_proj=4")),
    train=TrainConfig(epochs=0.5, init="rtn", patience=2, offload_dir=Path("/tmp/x")),
    max_memory="cpu=1GiB", stream=False,
)


def write(tmp_path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_resolved_recipe_round_trips_to_the_same_config(tmp_path):
    cfg = replace(RICH, output_dir=tmp_path / "out")
    path = save_recipe(cfg, tmp_path / "r.yaml")
    back = load_recipe(path)
    assert back == replace(cfg, output_dir=RunConfig().output_dir)
    assert not set(OUTPUT_ONLY) & set(recipe_dict(cfg))
    it = replace(RunConfig(), iterative=IterativeConfig(spec=QuantSpec(3, 64), windows=2))
    assert config_from(yaml.safe_load(recipe_yaml(it))) == it


def test_a_short_recipe_fills_the_nested_configs(tmp_path):
    path = write(tmp_path, """
data: {seqlen: 128, calib_windows: 4}
allocation:
  target_bpw: 3     # an integer is a number
  pins: {down_proj: w4g64, o_proj: 4}
  keep: 'layers\\.0\\.'
  group_sizes: [64, null]
quantizer: clip
train: {epochs: 1}
""")
    cfg = load_recipe(path)
    assert cfg.data == DataConfig(seqlen=128, calib_windows=4)
    assert cfg.allocation.target_bpw == 3.0 and isinstance(cfg.allocation.target_bpw, float)
    assert cfg.allocation.pins == ("down_proj=w4g64", "o_proj=4")
    assert cfg.allocation.keep == r"layers\.0\." and cfg.allocation.group_sizes == (64, None)
    assert cfg.train == TrainConfig(epochs=1.0, init="clip")  # init follows the run's quantizer


def test_empty_and_json_recipes(tmp_path):
    assert load_recipe(write(tmp_path, "")) == RunConfig()
    assert load_recipe(write(tmp_path, '{"data": {"seed": 3}}', "r.json")).data.seed == 3


@pytest.mark.parametrize("text, words", [
    ("allocation: {target_bwp: 3}", ["allocation.target_bwp", "did you mean allocation.target_bpw"]),
    ("tie: false", ["unknown field tie", "did you mean allocation.tie"]),
    ("data: {seqlen: '256'}", ["data.seqlen = '256'", "expected an integer"]),
    ("data: {seqlen: true}", ["data.seqlen = True", "expected an integer"]),
    ("allocation: {bits: [2, x]}", ["allocation.bits[1] = 'x'", "expected an integer"]),
    ("allocation: {bits: 4}", ["allocation.bits = 4", "a list of integers"]),
    ("allocation: {target_bpw: '3.5'}", ["allocation.target_bpw = '3.5'", "a number or null"]),
    ("allocation: {pins: {down_proj: [4]}}", ["allocation.pins", "down_proj"]),
    ("iterative: {spec: w9g1}", ["iterative.spec = 'w9g1'", "w4g128"]),
    ("data: 5", ["data must be a mapping"]),
    ("- a\n- b", ["the top level must be a mapping"]),
    ("data: {seqlen: 4}", ["data.seqlen 4 is too short"]),  # the config's own check: the field, not a flag
    ("train: {epochs: 0}", ["train: epochs=0"]),  # a check that names no section: the section is added
])
def test_bad_recipes_name_file_field_value_and_what_is_accepted(tmp_path, text, words):
    path = write(tmp_path, text)
    with pytest.raises(UserError) as err:
        load_recipe(path)
    message = str(err.value)
    assert message.startswith(f"recipe {str(path)!r}: "), message
    for word in words:
        assert word in message, message


def test_an_alias_bomb_is_refused_naming_the_file(tmp_path):
    lines = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
              f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]"
              for i in range(8)]
    path = write(tmp_path, "\n".join(lines))
    with pytest.raises(UserError, match="recipe .*(alias bomb|aliases)"):
        load_recipe(path)


def test_with_fields_replaces_by_path_and_keeps_the_rules():
    cfg = with_fields(RunConfig(), {"data.seqlen": 64, "allocation.target_size_mb": 10.0})
    assert cfg.data.seqlen == 64 and cfg.allocation.target_bpw is None  # one of the two budgets
    on = with_fields(cfg, {"train": True, "quantizer": "rtn"})
    assert on.train == TrainConfig(init="rtn")
    assert with_fields(on, {"quantizer": "clip"}).train.init == "clip"  # train.init follows quantizer
    assert with_fields(on, {"train": None}).train is None
    with pytest.raises(UserError, match="need `train`, which is off: `train.epochs`"):
        with_fields(RunConfig(), {"train.epochs": 3.0})
    with pytest.raises(UserError, match="`data.nope` is not a config field"):
        with_fields(RunConfig(), {"data.nope": 1})


def test_field_paths_walk_every_dataclass_field():
    paths = field_paths()
    assert {"data.seqlen", "allocation.pins", "gptq.damp", "train", "train.e2e_lr", "iterative.spec",
            "stream"} <= set(paths)
    for path in paths:
        head = path.split(".")[0]
        assert hasattr(RunConfig(), head)
