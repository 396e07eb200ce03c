"""bench/quality.py end to end in --quick mode (a tiny random Llama), so the script cannot rot.

Nothing about quality or time is asserted: the test checks that every requested row is there and
ran, that its perplexities are finite, that a mixbits row's bytes and bpw are those of the plan it
saved, and that a rerun measures nothing again. The llama.cpp rows join only where
llama-cpp-python imports and llama.cpp's tools are already built (CI has neither).
"""

from __future__ import annotations

import importlib.util
import json
import math

import pytest

from tests.bench import load_bench_script

MIXBITS_ARMS = ("uniform-rtn", "optimal-rtn", "heuristics")


def _llamacpp_ready() -> bool:
    if importlib.util.find_spec("llama_cpp") is None:
        return False
    from quality_llamacpp import tools
    from quality_rows import NotRun

    try:
        tools(build=False)
    except NotRun:
        return False
    return True


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    quality = load_bench_script("quality")
    arms = MIXBITS_ARMS + (("llamacpp", "llamacpp-imatrix") if _llamacpp_ready() else ())
    out = tmp_path_factory.mktemp("quality")
    argv = ["--quick", "--out", str(out), "--arms", ",".join(arms), "--no-build-llamacpp"]
    return quality, quality.main(argv), out, argv, arms


def test_every_requested_arm_has_rows_that_ran(quick):
    _, data, out, _, arms = quick
    rows = data["rows"].values()
    assert {r["arm"] for r in rows} >= set(arms)
    assert all(r["status"] == "ok" for r in rows), [(r["label"], r["status"]) for r in rows if r["status"] != "ok"]
    assert {r["label"] for r in rows if r["arm"] == "optimal-rtn"} == {"2.5 bpw", "3.5 bpw", "4.5 bpw"}
    assert (out / "quality.md").read_text().count("## Every row on `") == 2 and (out / "quality.png").stat().st_size > 0


def test_every_row_has_a_finite_perplexity_on_both_domains(quick):
    _, data, _, _, _ = quick
    domains = set(data["meta"]["windows"])
    assert len(domains) == 2 and set(data["meta"]["original"]) == domains
    for r in data["rows"].values():
        assert set(r["domains"]) == domains, r["label"]
        for d in r["domains"].values():
            assert math.isfinite(d["ppl"]) and d["ppl"] > 1 and d["kl"] >= -1e-6, r["label"]


def test_bytes_and_bpw_are_those_of_the_saved_plan(quick):
    _, data, out, _, _ = quick
    from mixbits.model.arch import find_linears
    from mixbits.model.load import load_model
    from mixbits.plan import Plan

    model, _ = load_model(str(out / "quick-data" / "tiny-llama"))
    shapes = {n: (i.out_features, i.in_features) for n, i in find_linears(model).items()}
    n_weights = sum(o * i for o, i in shapes.values())
    for r in data["rows"].values():
        assert r["bpw"] == pytest.approx(8 * r["linear_bytes"] / n_weights), r["label"]
        if r["arm"] in MIXBITS_ARMS:
            plan = Plan.load(out / r["plan_file"])
            assert r["linear_bytes"] == plan.storage_bytes(shapes), r["label"]
            assert sum(r["plan"].values()) == len(shapes)
        if r["arm"] == "optimal-rtn":
            assert r["bpw"] <= r["settings"]["budget_bpw"] + 1e-9


def test_a_rerun_measures_nothing_again(quick):
    quality, data, _, argv, _ = quick
    again = quality.main(argv)
    assert again["rows"] == json.loads(json.dumps(data["rows"]))
