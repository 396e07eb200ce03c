import json

import pytest

from mixbits.plan import Plan, PlanError
from mixbits.quant.spec import QuantSpec

SHAPES = {"a.q": (64, 64), "a.k": (32, 64), "b.down": (64, 128)}


def test_save_load_round_trip_json_and_yaml(tmp_path):
    plan = Plan({"a.q": QuantSpec(3, 128), "a.k": QuantSpec(4, 64, True), "b.down": QuantSpec(16, None)}, {"strategy": "x"})
    for suffix in (".json", ".yaml"):
        plan.save(tmp_path / f"plan{suffix}")
        again = Plan.load(tmp_path / f"plan{suffix}")
        assert dict(again.specs) == dict(plan.specs) and again.meta["strategy"] == "x"


def test_mapping_values_are_accepted(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"layers": {"a.q": {"bits": 5, "group_size": None}}}))
    assert Plan.load(path).specs["a.q"] == QuantSpec(5, None)


@pytest.mark.parametrize(
    "layers, match",
    [
        ({"a.q": "w7g128"}, "bits=7"),
        ({"a.q": "w4g100"}, "group_size=100"),
        ({"a.q": "int4"}, "cannot read"),
        ({"a.q": {"bits": 4, "groupsize": 128}}, "unknown keys"),
    ],
)
def test_malformed_plans_are_rejected_with_the_fix(tmp_path, layers, match):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"layers": layers}))
    with pytest.raises(PlanError, match=match):
        Plan.load(path)


def test_unknown_layers_are_rejected():
    with pytest.raises(PlanError, match="does not have"):
        Plan({"a.v": QuantSpec(4)}).validate(SHAPES)


def test_not_a_plan_and_bad_json(tmp_path):
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(PlanError, match="not valid"):
        Plan.load(tmp_path / "x.json")
    (tmp_path / "y.json").write_text("[1, 2]")
    with pytest.raises(PlanError, match="not a plan"):
        Plan.load(tmp_path / "y.json")
    with pytest.raises(PlanError, match="does not exist"):
        Plan.load(tmp_path / "missing.json")


def test_bits_per_weight_counts_overhead_and_kept_layers():
    plan = Plan({"a.q": QuantSpec(4, 64), "a.k": QuantSpec(4, 64)})
    bpw = plan.bits_per_weight(SHAPES)
    quant_bits = (64 * 64 + 32 * 64) * (4 + (16 + 4) / 64)
    assert bpw == pytest.approx((quant_bits + 64 * 128 * 16) / (64 * 64 + 32 * 64 + 64 * 128))


GGML_SHAPES = {"w.wide": (8, 512), "w.odd": (8, 576)}


def test_ggml_labels_round_trip_json_and_yaml(tmp_path):
    from mixbits.quant.spec import GGML_TYPES

    plan = Plan({"w.wide": GGML_TYPES["Q4_K"], "w.odd": GGML_TYPES["Q8_0"]}, {"strategy": "x"})
    plan.validate(GGML_SHAPES)
    for suffix in (".json", ".yaml"):
        plan.save(tmp_path / f"plan{suffix}")
        assert json.loads(json.dumps(plan.to_dict()))["layers"] == {"w.wide": "q4_k", "w.odd": "q8_0"}
        again = Plan.load(tmp_path / f"plan{suffix}")
        assert dict(again.specs) == dict(plan.specs)
    # 8 rows x 2 blocks x 144 bytes (Q4_K) + 8 rows x 18 blocks x 34 bytes (Q8_0)
    assert plan.storage_bytes(GGML_SHAPES) == 8 * 2 * 144 + 8 * 18 * 34


@pytest.mark.parametrize("label, match", [("q4_x", "q4_k"), ("Q9_K", "cannot read"), ("q4k", "ggml type")])
def test_bad_ggml_labels_are_refused_naming_the_layer(tmp_path, label, match):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"layers": {"w.wide": label}}))
    with pytest.raises(PlanError, match=match) as err:
        Plan.load(path)
    assert "'w.wide'" in str(err.value)


def test_a_k_quant_on_a_row_it_cannot_split_is_refused():
    plan = Plan.from_dict({"layers": {"w.wide": "q4_k", "w.odd": "q3_k"}})
    with pytest.raises(PlanError, match="'w.odd'.*576.*blocks of 256.*q8_0") as err:
        plan.validate(GGML_SHAPES)
    assert "q3_k" not in str(err.value).split("allows")[1]


def test_exporters_can_check_names_alone():
    plan = Plan.from_dict({"layers": {"w.odd": "q4_k"}})
    plan.validate(GGML_SHAPES, rows=False)  # export.rules lists the row problems with the nearest spec
    with pytest.raises(PlanError, match="does not have"):
        Plan.from_dict({"layers": {"w.none": "q4_k"}}).validate(GGML_SHAPES, rows=False)
