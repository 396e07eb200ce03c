"""Plans, sensitivity tables and seed files: validated field by field with strict types, read with
limits on YAML aliases and nesting; every refusal names the file, the layer and the field."""

from __future__ import annotations

import json
import time

import pytest

from tests.reliability.conftest import invoke, one_line_error

LAYER = "model.layers.0.self_attn.q_proj"


def write_plan(tmp_path, layers, name="plan.json", **top):
    path = tmp_path / name
    path.write_text(json.dumps({"format": "mixbits.plan/1", "layers": layers, **top}))
    return path


# ---------------------------------------------------------------- strict types


@pytest.mark.parametrize(
    "spec, field, shown, accepted",
    [
        ({"bits": 4.5}, "'bits'", "4.5", "an integer"),
        ({"bits": "4"}, "'bits'", "'4'", "an integer"),
        ({"bits": True}, "'bits'", "True", "an integer"),
        ({"bits": 4, "symmetric": "false"}, "'symmetric'", "'false'", "true or false"),
        ({"bits": 4, "symmetric": 0}, "'symmetric'", "0", "true or false"),
        ({"bits": 4, "group_size": 64.0}, "'group_size'", "64.0", "null for per-channel"),
        ({"bits": 4, "group_size": "128"}, "'group_size'", "'128'", "null for per-channel"),
    ],
)
def test_a_field_of_the_wrong_type_is_refused_not_cast(tmp_path, spec, field, shown, accepted):
    from mixbits.plan import Plan

    path = write_plan(tmp_path, {LAYER: spec})
    with pytest.raises(ValueError) as err:
        Plan.load(path)
    message = str(err.value)
    for word in (str(path), LAYER, field, shown, accepted):
        assert word in message, (word, message)


def test_the_cli_refuses_a_mistyped_plan_before_the_model_loads(tiny_model_dir, tiny_text_file, tmp_path,
                                                               no_model_load):
    plan = write_plan(tmp_path, {LAYER: {"bits": 4.5, "group_size": 128}})
    r = invoke("run", "--no-verbose", "--model", str(tiny_model_dir), "--dataset", str(tiny_text_file),
               "--plan", str(plan), "--output-dir", str(tmp_path / "out"))
    one_line_error(r, "plan.json", LAYER, "'bits'", "4.5")


def test_unknown_top_level_keys_and_a_non_mapping_meta_are_refused(tmp_path):
    from mixbits.plan import Plan

    with pytest.raises(ValueError, match=r"unknown top-level key.*'layer'"):
        Plan.load(write_plan(tmp_path, {LAYER: "w4g128"}, layer={LAYER: "w2g128"}))
    with pytest.raises(ValueError, match=r"'meta' is list"):
        Plan.load(write_plan(tmp_path, {LAYER: "w4g128"}, meta=[1, 2]))


@pytest.mark.parametrize("layers", [{}, {LAYER: "fp16"}, {LAYER: {"bits": 16, "group_size": None}}])
def test_an_empty_plan_is_refused_with_the_fix(tmp_path, layers):
    from mixbits.plan import Plan

    with pytest.raises(ValueError, match=r"quantizes no layer.*w4g128.*without --plan"):
        Plan.load(write_plan(tmp_path, layers))


def test_the_cli_refuses_an_empty_plan_before_the_model_loads(tiny_model_dir, tiny_text_file, tmp_path,
                                                             no_model_load):
    plan = write_plan(tmp_path, {LAYER: "fp16"})
    r = invoke("run", "--no-verbose", "--model", str(tiny_model_dir), "--dataset", str(tiny_text_file),
               "--plan", str(plan), "--output-dir", str(tmp_path / "out"))
    one_line_error(r, "plan.json", "quantizes no layer")


def test_well_typed_plans_still_load(tmp_path):
    from mixbits.plan import Plan
    from mixbits.quant.spec import QuantSpec

    plan = Plan.load(write_plan(tmp_path, {LAYER: {"bits": 3, "group_size": None, "symmetric": True},
                                           "b": "w4g64", "c": "fp16"}, meta={"strategy": "hand"}))
    assert plan.specs[LAYER] == QuantSpec(3, None, True) and plan.specs["b"] == QuantSpec(4, 64)
    assert dict(plan.meta) == {"strategy": "hand"}


# ---------------------------------------------------------------- YAML and JSON limits


def alias_bomb(levels: int = 9) -> str:
    """Nine levels of nine aliases each: under 1 kB of YAML, 9**9 (387 million) values expanded."""
    lines = ["  l0: &l0 [1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    for i in range(1, levels):
        lines.append(f"  l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]")
    return "format: mixbits.plan/1\nlayers:\n  a.q: w4g128\nmeta:\n" + "\n".join(lines) + "\n"


def test_a_yaml_alias_bomb_in_a_plan_is_refused_at_once(tmp_path):
    from mixbits.plan import Plan

    path = tmp_path / "plan.yaml"
    path.write_text(alias_bomb())
    assert path.stat().st_size < 1000
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"plan\.yaml.*(alias|expands)"):
        Plan.load(path)
    assert time.perf_counter() - start < 5


def test_yaml_with_a_few_aliases_still_loads(tmp_path):
    from mixbits.plan import Plan

    path = tmp_path / "plan.yaml"
    path.write_text("layers:\n  a.q: &spec w4g128\n  a.k: *spec\nmeta:\n  note: &n hand\n  again: *n\n")
    plan = Plan.load(path)
    assert plan.specs["a.k"].label == "w4g128" and plan.meta["again"] == "hand"


@pytest.mark.parametrize("suffix, text", [
    (".yaml", "layers:\n  a.q: w4g128\nmeta:\n  deep: " + "[" * 5000 + "]" * 5000 + "\n"),
    (".json", '{"layers": {"a.q": "w4g128"}, "meta": {"deep": ' + "[" * 100000 + "]" * 100000 + "}}"),
])
def test_deep_nesting_is_refused_naming_the_file(tmp_path, suffix, text):
    from mixbits.plan import Plan

    path = tmp_path / f"plan{suffix}"
    path.write_text(text)
    with pytest.raises(ValueError, match=rf"plan\{suffix}.*nests deeper than 64"):
        Plan.load(path)


def test_a_seed_file_nested_too_deeply_is_refused_naming_it(tmp_path):
    from mixbits.sensitivity.seedfile import read_seed_file

    path = tmp_path / "seed.json"
    path.write_text('{"sensitivity_scores": ' + "[" * 100000 + "]" * 100000 + "}")
    with pytest.raises(ValueError, match=r"seed\.json.*nests deeper"):
        read_seed_file(path, 2)


# ---------------------------------------------------------------- sensitivity tables


def saved_table(tmp_path):
    import numpy as np

    from mixbits.quant.spec import KEEP, QuantSpec
    from mixbits.sensitivity.table import DamageTable

    table = DamageTable(("m.l0.q", "m.l0.k"), ((8, 8), (8, 8)), (QuantSpec(4), QuantSpec(3), KEEP),
                        np.array([[0.1, 0.3, 0.0], [0.2, 0.5, 0.0]]), "fisher", {"fisher": np.array([1.0, 2.0])})
    path = tmp_path / "sensitivity.json"
    table.save(path)
    return path, json.loads(path.read_text())


@pytest.mark.parametrize("damage, words", [
    ({"w4g128": "0.1", "w3g128": 0.3, "fp16": 0.0}, ["'damage.w4g128'", "'0.1'"]),
    ({"w4g128": True, "w3g128": 0.3, "fp16": 0.0}, ["'damage.w4g128'", "True"]),
    ({"w4g128": 0.1, "fp16": 0.0}, ["w3g128"]),
])
def test_a_malformed_table_names_the_file_the_layer_and_the_field(tmp_path, damage, words):
    from mixbits.sensitivity.table import DamageTable

    path, data = saved_table(tmp_path)
    data["units"][1]["damage"] = damage
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError) as err:
        DamageTable.load(path)
    message = str(err.value)
    for word in ["sensitivity.json", "'m.l0.k'", *words]:
        assert word in message, (word, message)


def test_a_table_shape_of_the_wrong_type_is_named(tmp_path):
    from mixbits.sensitivity.table import DamageTable

    path, data = saved_table(tmp_path)
    data["units"][0]["shape"] = [8.5, 8]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"sensitivity\.json.*'m\.l0\.q'.*shape"):
        DamageTable.load(path)


def test_the_allocate_command_names_a_malformed_table(tmp_path):
    path, data = saved_table(tmp_path)
    data["units"][0]["damage"]["w3g128"] = "high"
    path.write_text(json.dumps(data))
    r = invoke("allocate", str(path), "--target-bpw", "4")
    one_line_error(r, "sensitivity.json", "'m.l0.q'", "damage.w3g128")
